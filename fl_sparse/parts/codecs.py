"""Communication codecs: how a :class:`~fl_sparse.core.interfaces.Message` becomes bytes and back.

Pick one per direction in a gin file, e.g. ``Experiment.downlink_codec = @FreezeAware()`` (optionally
with ``FreezeAware.inner = @SparseIndices()``; the default inner codec is ``AutoSparse()``).

=================  =================================================================================
Codec (codec id)   What a masked tensor costs (``n`` elements, ``c`` of them in the mask, ``s`` bytes/value)
=================  =================================================================================
DenseF32 (1)       dense + bitmask: ``ceil(n/8) + n*s`` (all values, +0.0 outside the mask)
SparseBitmask (2)  bitmask: ``8 + ceil(n/8) + c*s``
SparseIndices (3)  indices: ``8 + 4*c + c*s``
AutoSparse (4)     the smallest of the three, chosen per tensor; ties go to bitmask, then indices,
                   then dense + bitmask. Never larger than any single-layout codec.
FreezeAware (5)    wraps another codec and leaves frozen coordinates out (see :class:`FreezeAware`)
KnownMaskSparse    AutoSparse, except on the uplink, where a tensor whose mask is the trainable set the
(6)                client received costs only ``8 + c*s`` (see :class:`KnownMaskSparse`)
=================  =================================================================================

Every codec transmits the mask of every masked tensor, except where the receiver already holds it
(KnownMaskSparse's uplink), so the receiver always gets ``Message.masks`` back; tensors without a mask are
sent dense (``n*s``). Floating tensors travel as ``dtype``
(``"float32"`` by default, or ``"float16"`` / ``"bfloat16"``) and are decoded back to their original
dtype; other tensors (e.g. the int64 BatchNorm ``num_batches_tracked``) travel as their own dtype.

Byte layout (format version 1; all integers little-endian, no pickle):

======================  ============  ===========================================================
Field                   Type          Meaning
======================  ============  ===========================================================
magic                   4 bytes       ``b"FLSP"``
format version          uint8         1
codec id                uint8         see the table above
tensor count            uint32        number of tensor records that follow
*per tensor record:*
name length             uint16        bytes of the name
name                    bytes         UTF-8, unique within the payload
dtype code              uint8         the tensor's dtype: 0 float32, 1 float16, 2 bfloat16, 3 int64,
                                      4 int32, 5 bool, 6 float64, 7 int16, 8 int8, 9 uint8
wire dtype code         uint8         dtype of the values on the wire (same codes)
ndim                    uint8         number of dimensions (0 for a scalar)
dims                    uint32 each   the shape
encoding code           uint8         0 dense, 1 bitmask, 2 indices, 3 dense + bitmask, 4 known mask
body, dense (0)         values        all ``n`` values, row-major
body, bitmask (1)       uint64        value count ``c`` (= set bits of the mask)
                        bytes         packed mask, ``ceil(n/8)`` bytes, element ``i`` is bit ``i % 8``
                                      (least significant first, ``numpy.packbits(bitorder="little")``)
                                      of byte ``i // 8``; padding bits of the last byte are 0
                        values        the ``c`` masked values, row-major
body, indices (2)       uint64        value count ``c``
                        uint32 each   ``c`` flat row-major indices, strictly increasing
                        values        the ``c`` masked values in index order
body, dense+bitmask(3)  bytes         packed mask as in (1)
                        values        all ``n`` values, bitwise +0.0 (all bits 0) outside the mask
body, known mask (4)    uint64        value count ``c`` (= set bits of the mask the receiver holds)
                        values        the ``c`` masked values, row-major
*scores, if any:*       4 + uint32    ``b"SCOR"``, record count; then a record as above per scored masked
                                      tensor, its mask the non-zero scores (never a known mask)
======================  ============  ===========================================================

:class:`FreezeAware` frames its payload as: magic, version, codec id 5 (as above), flags (uint8; bit 0:
a frozen-part section follows), freeze version (uint32), main section length (uint64), frozen-part
section length (uint64, only when bit 0 is set), then the main section and the frozen-part section,
each a complete payload of the inner codec. With nothing frozen (``freeze_version == 0``) it writes
exactly the inner codec's payload, without framing.

Values are copied bit for bit: for float32 on the wire, -0.0, subnormals, infinities and NaN payloads
(NaN values are transmitted bitwise like any other value) come back unchanged. Masked tensors decode
with +0.0 (or integer 0) at every coordinate outside the mask.

Decoding validates everything and raises only :class:`~fl_sparse.core.errors.PayloadError`: wrong magic,
version, codec id, dtype or encoding code, truncation, trailing bytes, non-UTF-8 or duplicate names,
out-of-range or unsorted indices, bitmask popcount != value count, set padding bits, non-zero values
outside the mask, a known-mask tensor the receiver holds no mask for (or whose mask's popcount is not the
value count). Given the receiver's model as ``link.schema`` (:class:`~fl_sparse.core.interfaces.ModelSchema`), it
also refuses, before allocating anything, more records than the model has tensors, a name the model lacks,
and a dtype or shape other than the model's, so that no payload makes the receiver allocate more than a small
constant times its model's size (``docs/design.md``, "What a receiver checks before it allocates"). Without a
schema, a header claiming more than ``max_elements`` elements in one tensor is refused before allocation.
"""

from __future__ import annotations

import gin
import numpy as np
import torch

from fl_sparse.core.errors import ConfigError, PayloadError
from fl_sparse.core.interfaces import CommCodec, Link, Message
from fl_sparse.sparse.mask_ops import trainable
from fl_sparse.wire import decoding as payload_decoding
from fl_sparse.wire import layout as fmt
from fl_sparse.wire.layout import Encoding

DEFAULT_MAX_ELEMENTS = 2**28  # 1 GiB of float32 in a single tensor; far above any model trained here

# AutoSparse tie order: the first of these with the smallest body wins.
AUTO_PREFERENCE = (Encoding.BITMASK, Encoding.INDICES, Encoding.DENSE_BITMASK)


def _smallest_encoding(numel: int, count: int, itemsize: int) -> Encoding:
    candidates = AUTO_PREFERENCE if numel <= fmt.INDEX_LIMIT else (Encoding.BITMASK, Encoding.DENSE_BITMASK)
    return min(candidates, key=lambda encoding: fmt.body_size(encoding, numel, count, itemsize))


def _always(encoding: Encoding) -> fmt.EncodingChooser:
    return lambda numel, count, itemsize: encoding


# layout name -> how a masked tensor is encoded. Unmasked tensors are always dense.
LAYOUTS: dict[str, fmt.EncodingChooser] = {
    "dense": _always(Encoding.DENSE_BITMASK),
    "bitmask": _always(Encoding.BITMASK),
    "indices": _always(Encoding.INDICES),
    "auto": _smallest_encoding,
}


def _float_wire(dtype: str) -> fmt.WireDtype:
    if dtype not in fmt.FLOAT_WIRE_DTYPES:
        raise ConfigError(f"codec dtype {dtype!r} is not supported; use one of {sorted(fmt.FLOAT_WIRE_DTYPES)}")
    return fmt.FLOAT_WIRE_DTYPES[dtype]


def expected_size(message: Message, layout: str, dtype: str = "float32") -> int:
    """Exact ``len(encode(message))`` of the codec with this layout (``"dense"``, ``"bitmask"``,
    ``"indices"`` or ``"auto"``), computed from names, shapes and mask popcounts alone."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; use one of {sorted(LAYOUTS)}")
    return fmt.message_size(message, _float_wire(dtype), LAYOUTS[layout])


class _LayoutCodec(CommCodec):
    """A codec that writes one payload with a fixed rule for the encoding of masked tensors."""

    codec_id: int
    layout: str
    masked_encodings: frozenset[Encoding]

    def __init__(self, dtype: str = "float32", max_elements: int = DEFAULT_MAX_ELEMENTS):
        """``max_elements`` bounds one decoded tensor when the link carries no schema."""
        self.dtype = dtype
        self._float_wire = _float_wire(dtype)
        if not isinstance(max_elements, int) or max_elements < 1:
            raise ConfigError(f"{type(self).__name__}.max_elements must be a positive int, got {max_elements!r}")
        self.max_elements = max_elements

    def encode(self, message: Message, link: Link) -> bytes:
        return fmt.encode_message(message, self.codec_id, self._float_wire, LAYOUTS[self.layout])

    def decode(self, payload: bytes, link: Link) -> Message:
        return payload_decoding.decode_message(payload, self.codec_id, self._acceptance(link))

    def _acceptance(self, link: Link, known: fmt.KnownMasks = None) -> payload_decoding.Acceptance:
        return payload_decoding.Acceptance(self._float_wire, self.masked_encodings, self.max_elements, link.schema,
                                           known)

    def same_for_every_client(self, link: Link) -> bool:
        return True

    def closed_form_size(self, message: Message) -> int:
        """Exact ``len(self.encode(message, link))``; see :func:`expected_size`."""
        return expected_size(message, self.layout, self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dtype={self.dtype!r})"


@gin.configurable
class DenseF32(_LayoutCodec):
    """Every value sent whole. Masked tensors also carry their packed bitmask, so the receiver gets
    the mask; their values outside the mask are sent as +0.0."""

    codec_id, layout, masked_encodings = 1, "dense", frozenset({Encoding.DENSE_BITMASK})


@gin.configurable
class SparseBitmask(_LayoutCodec):
    """Masked tensors as packed bitmask + the masked values; unmasked tensors dense."""

    codec_id, layout, masked_encodings = 2, "bitmask", frozenset({Encoding.BITMASK})


@gin.configurable
class SparseIndices(_LayoutCodec):
    """Masked tensors as uint32 flat indices + the masked values; unmasked tensors dense."""

    codec_id, layout, masked_encodings = 3, "indices", frozenset({Encoding.INDICES})


@gin.configurable
class AutoSparse(_LayoutCodec):
    """Per masked tensor, the smallest of dense + bitmask, bitmask and indices (ties: bitmask, indices,
    dense + bitmask). The choice is recorded per tensor, so the decoder needs no side information."""

    codec_id, layout, masked_encodings = 4, "auto", frozenset(AUTO_PREFERENCE)


# Mask arithmetic goes through numpy: torch's CPU kernels for bool tensors are several times slower.
def _bool_numpy(mask: torch.Tensor) -> np.ndarray:
    return mask.detach().cpu().numpy()


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bits as an integer numpy array (works for bfloat16 and bool too)."""
    return tensor.detach().cpu().contiguous().view(_SAME_SIZE_INT[tensor.element_size()]).numpy()


def _check_link(link: Link) -> None:
    if link.direction not in ("down", "up"):
        raise ValueError(f"link.direction must be 'down' or 'up', got {link.direction!r}")
    if not 0 <= link.freeze_version < 2**32:
        raise ValueError(f"link.freeze_version must be in [0, 2**32), got {link.freeze_version}")


@gin.configurable
class KnownMaskSparse(AutoSparse):
    """AutoSparse that, on the uplink, leaves out the masks the server already holds.

    A client that trains under the mask it received and sends that mask back (PFFDST, RandomMask, FedDST
    outside readjustment rounds) repeats what the server sent it. On the uplink, a masked tensor whose mask
    equals ``link.mask & ~link.frozen`` (the trainable set the client received) is sent as its values alone,
    with encoding 4. Other tensors, such as a FedDST client's readjusted mask, fall back to AutoSparse's
    choice. Inside ``FreezeAware`` the frozen part is left out before this comparison, so stage-2 PFFDST
    uplinks match too. The downlink is AutoSparse byte for byte, apart from the codec id: a client holds no
    state between rounds.

    This is how the paper counts bytes (non-zero values only). It is a separate codec because it changes
    measured totals, and with them where a communication budget stops a run.
    """

    codec_id = 6
    masked_encodings = frozenset(AUTO_PREFERENCE) | {Encoding.KNOWN_MASK}

    @staticmethod
    def _known(link: Link) -> dict[str, torch.Tensor] | None:
        return trainable(link.mask, link.frozen) if link.direction == "up" else None

    def encode(self, message: Message, link: Link) -> bytes:
        _check_link(link)
        return fmt.encode_message(message, self.codec_id, self._float_wire, LAYOUTS[self.layout], self._known(link))

    def decode(self, payload: bytes, link: Link) -> Message:
        _check_link(link)
        return payload_decoding.decode_message(payload, self.codec_id, self._acceptance(link, self._known(link)))

    def closed_form_size(self, message: Message, link: Link | None = None) -> int:
        """Exact ``len(self.encode(message, link))``; without a link, as on the downlink."""
        known = None if link is None else self._known(link)
        return fmt.message_size(message, self._float_wire, LAYOUTS[self.layout], known)


@gin.configurable
class FreezeAware(CommCodec):
    """Leaves frozen coordinates out of every payload; the receiver restores them.

    With ``link.freeze_version == 0`` this is exactly ``inner``. Otherwise the main section is ``inner``
    encoding the message with ``masks[name] & ~link.frozen[name]`` for every masked name in
    ``link.frozen`` (frozen names the message does not mask are ignored); decoding fills the frozen
    coordinates from ``link.frozen_values`` and returns ``mask = sent mask | frozen``.

    On the downlink the codec remembers which freeze version each client has received. The first
    payload to a client after the frozen set changed also carries a frozen-part section (``inner``
    encoding ``link.frozen_values`` under ``masks = link.frozen``) and is counted like any other byte;
    decoding then takes the frozen set and values from that section instead of the link. ``encode`` only
    reads the record; the sender updates it with :meth:`delivered` once the payload is sent, and it is
    checkpointed with :meth:`state_dict` / :meth:`load_state_dict`.
    """

    carries_frozen_part = True

    def __init__(self, inner: CommCodec | None = None):
        if inner is None:
            inner = AutoSparse()
        if not isinstance(inner, CommCodec) or isinstance(inner, FreezeAware):
            raise ConfigError(f"FreezeAware.inner must be a CommCodec other than FreezeAware, got {inner!r}")
        self.inner = inner
        self._delivered: dict[int, int] = {}  # client id -> freeze version it has received

    def __repr__(self) -> str:
        return f"FreezeAware(inner={self.inner!r})"

    def _frozen_masks(self, message: Message, link: Link) -> dict[str, torch.Tensor]:
        frozen = {}
        for name, mask in message.masks.items():
            if name in link.frozen:
                if link.frozen[name].shape != mask.shape or link.frozen[name].dtype != torch.bool:
                    raise ValueError(f"link.frozen[{name!r}] must be bool of shape {tuple(mask.shape)}")
                frozen[name] = link.frozen[name].detach().cpu()
        return frozen

    def _split(self, message: Message, link: Link) -> tuple[Message, Message]:
        """(the message without its frozen coordinates, the frozen part as a message)."""
        frozen = self._frozen_masks(message, link)
        missing = [name for name in frozen if name not in link.frozen_values]
        if missing:
            raise ValueError(f"link.frozen_values lacks frozen tensors {missing}")
        # np.asarray: on 0-d arrays numpy operators return scalars, which torch.from_numpy refuses.
        masks = {name: torch.from_numpy(np.asarray(_bool_numpy(mask) & ~_bool_numpy(frozen[name])))
                 if name in frozen else mask for name, mask in message.masks.items()}
        frozen_part = Message(tensors={name: link.frozen_values[name] for name in frozen}, masks=frozen)
        return Message(tensors=dict(message.tensors), masks=masks, scores=message.scores), frozen_part

    def same_for_every_client(self, link: Link) -> bool:
        return link.freeze_version == 0 and self.inner.same_for_every_client(link)

    def _owes_frozen_part(self, link: Link) -> bool:
        return link.direction == "down" and self._delivered.get(link.client_id) != link.freeze_version

    def encode(self, message: Message, link: Link) -> bytes:
        _check_link(link)
        if link.freeze_version == 0:
            return self.inner.encode(message, link)
        unfrozen, frozen_part = self._split(message, link)
        main = self.inner.encode(unfrozen, link)
        frozen_bytes = None
        if self._owes_frozen_part(link):
            frozen_bytes = self.inner.encode(frozen_part, link)
        return fmt.pack_freeze_frame(link.freeze_version, main, frozen_bytes)

    def delivered(self, link: Link) -> None:
        """The client of a downlink ``link`` now holds the frozen part of ``link.freeze_version``."""
        if link.direction == "down" and link.freeze_version:
            self._delivered[link.client_id] = link.freeze_version

    def closed_form_size(self, message: Message, link: Link) -> int:
        """Exact ``len(self.encode(message, link))``. Needs an inner codec with ``closed_form_size(message)``."""
        _check_link(link)
        if link.freeze_version == 0:
            return self.inner.closed_form_size(message)
        unfrozen, frozen_part = self._split(message, link)
        size = fmt.FREEZE_HEADER.size + self.inner.closed_form_size(unfrozen)
        if self._owes_frozen_part(link):
            size += fmt.SECTION_LENGTH.size + self.inner.closed_form_size(frozen_part)
        return size

    def _decode_section(self, section: memoryview, link: Link, what: str) -> Message:
        try:
            return self.inner.decode(section, link)
        except PayloadError as error:
            raise PayloadError(f"{what}: {error}") from None

    def decode(self, payload: bytes, link: Link) -> Message:
        _check_link(link)
        if link.freeze_version == 0:
            return self.inner.decode(payload, link)
        main_bytes, frozen_bytes = payload_decoding.unpack_freeze_frame(payload, link.freeze_version)
        main = self._decode_section(main_bytes, link, "main section")
        if frozen_bytes is None:
            frozen_masks = {name: link.frozen[name] for name in main.masks if name in link.frozen}
            frozen_values = link.frozen_values
        else:
            if link.direction == "up":
                raise PayloadError("uplink payload carries a frozen-part section; only the downlink sends one")
            part = self._decode_section(frozen_bytes, link, "frozen-part section")
            unmasked = [name for name in part.tensors if name not in part.masks or name not in main.masks]
            if unmasked or part.scores:
                raise PayloadError(f"frozen-part section has tensors the main section does not mask ({unmasked}) "
                                   "or scores")
            frozen_masks, frozen_values = part.masks, part.tensors
        tensors, masks = dict(main.tensors), dict(main.masks)
        for name, frozen in frozen_masks.items():
            sent_mask, sent = masks[name], tensors[name]
            if (name not in frozen_values or frozen.shape != sent_mask.shape or frozen.dtype != torch.bool
                    or frozen_values[name].shape != sent.shape):
                raise PayloadError(f"tensor {name!r}: frozen set or values do not match the shape "
                                   f"{tuple(sent_mask.shape)} sent")
            sent_mask_np, frozen_np = _bool_numpy(sent_mask), _bool_numpy(frozen)
            overlap = int(np.count_nonzero(sent_mask_np & frozen_np))
            if overlap:
                raise PayloadError(f"tensor {name!r}: payload sends {overlap} coordinates that are frozen")
            values = frozen_values[name].to(dtype=sent.dtype)
            merged_bits = np.where(frozen_np, _bits_numpy(values), _bits_numpy(sent))  # bitwise copy
            tensors[name] = torch.from_numpy(merged_bits).view(sent.dtype)
            masks[name] = torch.from_numpy(np.asarray(sent_mask_np | frozen_np))
        return Message(tensors=tensors, masks=masks, scores=main.scores)

    def frozen_part(self, payload: bytes, link: Link) -> Message | None:
        """The frozen set (``masks``) and values that a downlink ``payload`` delivers, or None when it
        carries no frozen-part section. A receiver that holds no copy of the server's state (a remote
        client, :mod:`fl_sparse.flower`) keeps them to decode this freeze version's later payloads, to
        train, and to encode its uplinks."""
        _check_link(link)
        if link.freeze_version == 0 or link.direction != "down":
            return None
        _, frozen_bytes = payload_decoding.unpack_freeze_frame(payload, link.freeze_version)
        return None if frozen_bytes is None else self._decode_section(frozen_bytes, link, "frozen-part section")

    def state_dict(self) -> dict[str, int]:
        """The downlink delivery record, ``{str(client_id): freeze_version}`` (JSON-serialisable)."""
        return {str(client): version for client, version in sorted(self._delivered.items())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        delivered = {}
        for client, version in state.items():
            try:
                delivered[int(client)] = int(version)
            except (TypeError, ValueError):
                raise ConfigError(f"FreezeAware state entry {client!r}: {version!r} is not "
                                  "client id -> freeze version") from None
        self._delivered = delivered
