"""The node worker's protocol: how a ClientApp relay and ``fl-sparse flower node-worker`` talk over a Unix socket.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message. With a node worker configured
(node config ``worker-socket='DIR/worker.sock'``), that process only relays: it hands the downlink to the
long-lived worker beside the SuperNode, which holds torch, the built client side and the node's data, and
relays the worker's answer back. This module imports the standard library only, so the relay stays cheap.

One request and one answer per connection. Each is one frame::

    offset  size  field
    0       4     magic b"FLSW"
    4       1     version (1)
    5       4     H: header length, unsigned big-endian, at most MAX_HEADER_BYTES
    9       H     header: one JSON object, UTF-8
    9+H     8     P: payload length, unsigned big-endian
    17+H    P     payload: our codec's bytes, exactly as they ride in the Flower message (no pickle anywhere)

The receiver reads and parses the header first, then learns from it the longest payload it accepts
(for a train request, :func:`fl_sparse.flower.messages.max_payload_bytes` of the run's model, the server's
bound), and refuses a longer ``P`` before it reads or allocates a byte of the payload.

Request header (relay -> worker)::

    {"op": "train", "run": RUN_ID, "run_config": {...the run config...},
     "node_config": {"data-path": "...", "partition-id": K} (those of the two the SuperNode was given),
     "round": R, "client": K, "freeze_version": V}

payload: the downlink. Answer header (worker -> relay), with the uplink as payload::

    {"ok": true, "round": R, "client": K, "num_samples": N, "train_loss": L, "payload_limit": B,
     "seconds": {"build": .., "decode": .., "train": .., "encode": ..}}

or, when the worker refused the request or failed, ``{"ok": false, "error": "one line"}`` and no payload. The
relay turns that (or a worker that is gone) into an exception, which Flower sends to the server as an error
reply: the server rejects that client for the round, with the reason.

The socket lives in a private directory (mode 0700, owned by the worker's user): only that user's processes
can reach the worker, and the relay refuses a socket in a directory that others could write.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Callable

from fl_sparse.core.errors import ConfigError, FlSparseError

MAGIC, VERSION = b"FLSW", 1
PREFIX = struct.Struct(">4sBI")  # magic, version, header length
PAYLOAD_LENGTH = struct.Struct(">Q")
MAX_HEADER_BYTES = 1 << 20  # a run config and a few numbers; a longer header is not ours
CHUNK = 1 << 20


class NodeWorkerError(FlSparseError):
    """The node worker is unreachable, died, or answered with an error or a malformed frame."""


def write_frame(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    body = json.dumps(header).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise NodeWorkerError(f"frame header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}")
    sock.sendall(PREFIX.pack(MAGIC, VERSION, len(body)) + body + PAYLOAD_LENGTH.pack(len(payload)))
    sock.sendall(payload)


def read_frame(sock: socket.socket, payload_limit: Callable[[dict], int]) -> tuple[dict, bytes]:
    """One frame from ``sock``: (header, payload). ``payload_limit(header)`` is the longest payload accepted,
    checked before the payload is read; :class:`NodeWorkerError` for anything that is not a valid frame."""
    magic, version, length = PREFIX.unpack(_read_exactly(sock, PREFIX.size))
    if magic != MAGIC or version != VERSION:
        raise NodeWorkerError(f"not a node worker frame (magic {magic!r}, version {version}); expected {MAGIC!r} "
                              f"version {VERSION}")
    if length > MAX_HEADER_BYTES:
        raise NodeWorkerError(f"frame header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_read_exactly(sock, length))
    except ValueError as error:
        raise NodeWorkerError(f"frame header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise NodeWorkerError("frame header is not a JSON object")
    (size,) = PAYLOAD_LENGTH.unpack(_read_exactly(sock, PAYLOAD_LENGTH.size))
    limit = payload_limit(header)
    if size > limit:
        raise NodeWorkerError(f"payload of {size} bytes exceeds the {limit} bytes any codec writes for this model")
    return header, _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer, filled = bytearray(size), 0
    view = memoryview(buffer)
    while filled < size:
        got = sock.recv_into(view[filled:], min(CHUNK, size - filled))
        if got == 0:
            raise NodeWorkerError(f"the connection closed {filled} bytes into a {size}-byte read")
        filled += got
    return bytes(buffer)


def check_private_directory(path: Path) -> None:
    """Refuse, in one line, a socket directory that another user owns or that group or others can access."""
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"{path}: the node worker's socket directory must be a directory of this user with mode "
                          f"0700 (it is {stat.filemode(info.st_mode)}, uid {info.st_uid}); run chmod 700 {path} or "
                          "give --socket in a new directory")


def exchange(path: str, header: dict, payload: bytes, timeout: float | None = None) -> tuple[dict, bytes]:
    """Send one request to the worker at ``path`` and return its successful answer (header, payload);
    :class:`NodeWorkerError` in one line if the worker is not there, dies, or answers with an error."""
    socket_path = Path(path)
    try:
        check_private_directory(socket_path.parent)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            write_frame(sock, header, payload)
            answer, uplink = read_frame(sock, _answer_limit)
    except FileNotFoundError:
        raise NodeWorkerError(f"no node worker at {path}: start fl-sparse flower node-worker --socket {path} beside "
                              "this SuperNode, or drop worker-socket from its node config") from None
    except OSError as error:
        raise NodeWorkerError(f"the node worker at {path} is unreachable or died ({type(error).__name__}: {error}); "
                              f"restart fl-sparse flower node-worker --socket {path}") from None
    except NodeWorkerError as error:
        raise NodeWorkerError(f"the node worker at {path} failed mid-request: {error}; restart it") from None
    if answer.get("ok") is not True:
        raise NodeWorkerError(f"node worker: {str(answer.get('error', 'no reason given'))[:500]}")
    return answer, uplink


def _answer_limit(header: dict) -> int:
    """An answer's payload may be as long as the bound the worker checked the downlink against (the server checks
    the upload against its own bound again)."""
    limit = header.get("payload_limit", 0)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else 0
