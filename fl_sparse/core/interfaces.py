"""The parts every fl_sparse algorithm is composed of.

Read this file first. An algorithm is a gin file that picks one concrete part for each interface below
(see ``algorithms/pffdst.gin``); the engine (:mod:`fl_sparse.engine.server`) calls the hooks in this order
every round ``r`` (1-based, as in the paper):

    1. sample clients                        (seeded by round, never by algorithm)
    2. CommCodec.encode / decode             downlink: global weights + mask -> bytes -> client
    3. ClientExecutor.train                  each client: LocalObjective + ClientOptimizer for E epochs
                                             under ``trainable = mask & ~frozen``, then MaskPolicy.client_step
                                             and MaskPolicy.client_scores
    4. CommCodec.encode / decode             uplink: client weights + client mask (+ scores) -> bytes -> server
    5. Aggregator.aggregate                  client results -> new global weights and union mask
    6. FreezePolicy.stage_start_model        the model the round goes on with (default: the aggregated one)
       FreezePolicy.server_step              may freeze weights when a stage ends
    7. MaskPolicy.server_step                may prune / grow the global mask
    8. evaluation (every ``eval_every`` rounds), then FreezePolicy.observe

An optional ``ModelReparameterization`` (SparsyFed's Powerprop) is applied once to the model before round 1, and
an optional ``MaskDiscovery`` (FLASH, PruneFL, FedTiny; :mod:`fl_sparse.core.discovery`) lets clients choose the
initial mask before round 1.

State is plain data: ``weights`` maps every parameter and buffer name to a tensor, ``mask`` maps each
maskable tensor (every conv/linear ``weight``) to a bool tensor of the same shape (absent = dense), and
``frozen`` is a bool tensor per masked name, always a subset of ``mask``. Parts are pure where they can
be: they take state and return new state, and draw randomness only from the generator they are given.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import types
from typing import Any, Callable, Mapping

import torch

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Phase:
    """What the sparsity schedule says about one round (1-based ``round``)."""

    round: int
    stage: int  # 0-based stage index; single-stage schedules are always 0
    sparsity: float  # target sparsity s of this stage (fraction of maskable weights that are zero)
    differential: float  # differential sparsity f: between readjustments the density is 1 - s + f
    readjust: bool  # the mask is readjusted after this round's aggregation
    finalize: bool  # the mask is pruned to s after this round and fixed for the rest of the stage
    stage_ends: bool  # this is the last round of a stage that is followed by another one
    progress: float  # round / readjust_until within the stage, for decaying readjustment ratios


class SparsitySchedule(abc.ABC):
    """Maps a round index to a :class:`Phase`. Shared by the mask and freeze policies; never touches tensors."""

    @abc.abstractmethod
    def phase(self, round: int) -> Phase: ...

    def initial_sparsity(self) -> float:
        """Sparsity of the freshly initialised model (``s1 - f1`` for SMR)."""
        first = self.phase(1)
        return first.sparsity - first.differential

    def next_stage_sparsity(self, round: int) -> float:
        """Sparsity to grow to when the stage ending at ``round`` hands over to the next one."""
        nxt = self.phase(round + 1)
        return nxt.sparsity - nxt.differential


@dataclasses.dataclass
class RoundContext:
    """Everything a hook may want to know about the round it runs in."""

    phase: Phase
    generator: torch.Generator  # seeded by (seed, stream, round): resuming at round r redraws the same
    # On the server after aggregation: per masked tensor, how many accepted uploads' masks hold each
    # coordinate (the clients' votes), computed when called. None on clients.
    votes: Callable[[], Tensors] | None = None
    # On the server after aggregation: per masked tensor, the mean over accepted uploads of the scores the
    # clients sent (MaskPolicy.client_scores; a coordinate a client sent no score for counts as 0), computed
    # when called. None on clients.
    scores: Callable[[], Tensors] | None = None
    uploads: int = 0  # on the server after aggregation: how many uploads were accepted (0 on clients)
    # On the server after aggregation: the global mask the round's clients were sent. The aggregate's mask may
    # hold more (the union of what clients proposed, e.g. FLASH's JointDST); None on clients.
    sent_mask: Tensors | None = None


@dataclasses.dataclass
class ClientResult:
    """What a client hands back after local training (before uplink encoding)."""

    client_id: int
    weights: Tensors
    mask: Tensors  # the client's mask after MaskPolicy.client_step (may differ from the global one)
    num_samples: int
    train_loss: float
    # Per masked tensor, the scores the client uploads (MaskPolicy.client_scores), 0 where it sends none.
    scores: Tensors = dataclasses.field(default_factory=dict)


class MaskPolicy(abc.ABC):
    """Owns the sparse mask: when it changes and to what target.

    The arithmetic (exact top-k, random growth, budgets) lives in :mod:`fl_sparse.sparse.mask_ops`;
    a policy only decides *when* and *to what target* and supplies the scores.
    """

    def setup(self, model: torch.nn.Module, schedule: SparsitySchedule) -> None:
        """Called once before anything else with the model skeleton and the run's schedule."""

    @abc.abstractmethod
    def initial_mask(self, weights: Tensors, generator: torch.Generator) -> Tensors:
        """Called once before round 1; returns a bool mask per maskable tensor ({} = dense model)."""

    def client_step_epoch(self, ctx: RoundContext, epochs: int) -> float:
        """After which local epoch (1-based; a fraction counts steps, e.g. 0.5 is half-way through the first)
        :meth:`client_step` runs; the steps after it train under the mask it returns (so weights it grows train
        before upload). The default: after the last epoch."""
        return epochs

    def client_step(self, ctx: RoundContext, weights: Tensors, mask: Tensors, frozen: Tensors,
                    gradients: Callable[[], Tensors]) -> tuple[Tensors, Tensors]:
        """Called on each client after local epoch :meth:`client_step_epoch`. ``gradients()`` lazily computes
        dense gradients of the local loss. May return a changed (weights, mask); the default changes nothing."""
        return weights, mask

    def planned_prune(self, ctx: RoundContext, weights: Tensors, mask: Tensors, frozen: Tensors) -> Tensors:
        """Per masked tensor, the coordinates this round's :meth:`server_step` would prune if the weights did not
        move from ``weights`` (the model a client received), for a client's objective to act on (FedMef's
        extrusion); {} when it prunes nothing predictable. The default: {}."""
        return {}

    def client_scores(self, ctx: RoundContext, received_mask: Tensors, weights: Tensors, mask: Tensors,
                      frozen: Tensors, gradients: Callable[[], Tensors]) -> Tensors:
        """Called on each client after :meth:`client_step` with the mask it received and the (weights, mask)
        it uploads: scores the client sends with its update, for the server's :meth:`server_step` to read as
        ``ctx.scores()`` (e.g. |gradient| at the coordinates it grew). Per masked name, a float tensor of the
        tensor's shape, 0 where no score is sent; only the non-zero entries travel, and their bytes are counted
        like any other. ``gradients()`` is the same (cached) computation ``client_step`` saw. Default: none."""
        return {}

    def server_step(self, ctx: RoundContext, weights: Tensors, mask: Tensors,
                    frozen: Tensors) -> tuple[Tensors, Tensors]:
        """Called on the server after aggregation and after FreezePolicy.server_step. May prune or
        grow the mask but never touches frozen weights. Weights outside the returned mask must be 0."""
        return weights, mask

    def state_dict(self) -> Tensors:
        """What the policy remembers across rounds on the server (e.g. PruneFL's accumulated client scores), for
        checkpoints: a resumed run must continue bitwise. Default: nothing (a policy that is a function of the
        round)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


class FreezePolicy(abc.ABC):
    """Decides which non-zero weights are frozen: neither trained nor transmitted again."""

    @abc.abstractmethod
    def server_step(self, ctx: RoundContext, weights: Tensors, mask: Tensors, frozen: Tensors) -> Tensors:
        """Called on the server after aggregation; returns the new frozen set (a subset of ``mask``)."""

    def stage_start_model(self, ctx: RoundContext, weights: Tensors, mask: Tensors,
                          evaluate: Callable[[], Mapping[str, float]]) -> tuple[Tensors, Tensors]:
        """Called on the server after aggregation, before :meth:`server_step`: the (weights, mask) the round
        goes on with, i.e. when a stage ends, the model the next stage starts from. ``evaluate()`` evaluates
        the aggregated model on the test set, only if called. The default keeps the aggregated model."""
        return weights, mask

    def observe(self, round: int, weights: Tensors, mask: Tensors, evaluation: Mapping[str, float]) -> None:
        """Called after each evaluated round with the global model and its test-set metrics; default: nothing."""

    def state_dict(self) -> Tensors:
        """What the policy remembers across rounds, for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


class Aggregator(abc.ABC):
    """Turns a round's client results into new global weights and the union of the client masks."""

    @abc.abstractmethod
    def aggregate(self, weights: Tensors, mask: Tensors, frozen: Tensors,
                  results: list[ClientResult]) -> tuple[Tensors, Tensors]:
        """Called once per round with at least one result. Frozen coordinates must come back bitwise
        unchanged. Returns (new weights, new mask)."""

    def state_dict(self) -> Tensors:
        """Server-side optimiser state, for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


@dataclasses.dataclass
class Message:
    """What crosses the network: full-shape tensors, and for masked tensors the coordinates sent."""

    tensors: Tensors
    masks: Tensors  # bool, same shape as tensors[name]; a name absent here is sent dense
    # Per masked name, float scores of the tensor's shape (an uplink's MaskPolicy.client_scores); only the
    # non-zero entries are sent, and a receiver reads the others as 0. Empty on every downlink.
    scores: Tensors = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor a receiver accepts."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ModelSchema:
    """Name, shape and dtype of every tensor a receiver may get: its model's state (parameters and buffers).

    Masks and frozen sets travel under the same names with the same shapes, so this bounds every record of
    every codec: a decoder checks each record against it before allocating anything. Build it once with
    :meth:`of` from the receiver's own model, never from what arrives."""

    tensors: Mapping[str, TensorSpec]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> "ModelSchema":
        """The schema of a state dict (``model.state_dict()``) or of any name -> tensor mapping."""
        return cls(types.MappingProxyType({name: TensorSpec(tuple(tensor.shape), tensor.dtype)
                                           for name, tensor in state.items()}))

    @property
    def nbytes(self) -> int:
        """Bytes of the model's tensors in their own dtypes."""
        return sum(spec.numel * spec.dtype.itemsize for spec in self.tensors.values())


@dataclasses.dataclass
class Link:
    """Who is talking, and what both ends already know (the frozen part, once it was delivered; on the
    uplink, the mask the client received this round; the receiver's model schema)."""

    direction: str  # "down" (server -> client) or "up" (client -> server)
    client_id: int
    frozen: Tensors  # bool per masked name, the global frozen set ({} when nothing is frozen)
    frozen_values: Tensors  # the global weights, from which a receiver restores frozen coordinates
    freeze_version: int  # increases each time the frozen set changes; 0 = nothing frozen
    mask: Tensors = dataclasses.field(default_factory=dict)  # the global mask of this round ({}: none known)
    # The receiver's model. Decoding bytes from anywhere but this process needs it: without it only the
    # codec's max_elements bounds a tensor, whatever its name or shape.
    schema: ModelSchema | None = None


class CommCodec(abc.ABC):
    """Turns a :class:`Message` into bytes and back. The only place that knows about bytes:
    the engine counts ``len(encode(...))`` and nothing else. Decoding validates its input, against
    ``link.schema`` when given, before it allocates, and raises :class:`fl_sparse.core.errors.PayloadError`
    on anything malformed or not of the receiver's model.

    ``encode`` and ``decode`` have no side effects. A codec that keeps per-receiver state (which client
    already holds what) changes it only in :meth:`delivered`, which the sender calls once a payload it
    encoded has been handed over, and checkpoints it with :meth:`state_dict`."""

    #: True for a codec whose downlink can carry the frozen part (the frozen set and its values) to a
    #: receiver that holds no copy of the server's state, read with :meth:`frozen_part`. A run that freezes
    #: weights on remote clients (Flower) needs such a downlink codec.
    carries_frozen_part: bool = False

    @abc.abstractmethod
    def encode(self, message: Message, link: Link) -> bytes: ...

    @abc.abstractmethod
    def decode(self, payload: bytes, link: Link) -> Message: ...

    def delivered(self, link: Link) -> None:
        """Called by the sender after the payload encoded for ``link`` was sent: update what the codec
        remembers about the receiver (e.g. the freeze version it now holds). The default remembers nothing."""

    def frozen_part(self, payload: bytes, link: Link) -> Message | None:
        """The frozen set (``masks``) and values that a downlink ``payload`` delivers, or None when it
        carries none (always None unless :attr:`carries_frozen_part`)."""
        return None

    def same_for_every_client(self, link: Link) -> bool:
        """True when the bytes depend on the message alone, not on who receives them, so a broadcast can
        be encoded once and counted once per client. The safe default is False."""
        return False

    def state_dict(self) -> dict:
        """JSON-serialisable state (e.g. which clients already hold the frozen part), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LocalObjective(abc.ABC):
    """The client's training loss."""

    def at_round(self, ctx: RoundContext, weights: Tensors, mask: Tensors, frozen: Tensors,
                 mask_policy: MaskPolicy) -> LocalObjective:
        """The objective a client trains with in ``ctx``'s round, given the model it received and the run's mask
        policy (whose :meth:`MaskPolicy.planned_prune` says what the server is about to prune): this one,
        unless the objective has a term for the round (FedMef's extrusion)."""
        return self

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, params: Tensors,
             global_params: Tensors) -> torch.Tensor:
        """Mean loss of one batch. ``params`` are the client's current parameters, ``global_params``
        the ones it received this round (for proximal terms). Must be a pure torch function."""

    def budget_penalty(self, params: Tensors) -> float | None:
        """The norm of the weights the coming prune will remove, at ``params``, for a learning rate that follows
        it (FedMef's budget-aware rate); None (the default) when the objective has no such term this round."""
        return None


class LearningRateSchedule(abc.ABC):
    """The clients' learning rate in each round (1-based), for an optimiser that follows one."""

    @abc.abstractmethod
    def rate(self, round: int) -> float: ...

    def step_rate(self, round: int, penalty: Callable[[], float | None]) -> float | None:
        """The rate of one local step of ``round``, given (on demand) the objective's
        :meth:`LocalObjective.budget_penalty` at the step's weights; None (the default): ``rate(round)``."""
        return None


class ClientOptimizer(abc.ABC):
    """A functional optimiser: state in, state out, so clients can be stacked and vectorised."""

    def at_round(self, round: int) -> ClientOptimizer:
        """The optimiser the clients of ``round`` use: this one, unless it follows a learning-rate schedule."""
        return self

    def at_step(self, round: int, penalty: Callable[[], float | None]) -> ClientOptimizer | None:
        """The optimiser of one local step of ``round`` when its rate depends on the step (given ``penalty``, see
        :meth:`LearningRateSchedule.step_rate`); None (the default): ``at_round(round)`` for every step."""
        return None

    @abc.abstractmethod
    def init(self, params: Tensors) -> Tensors: ...

    @abc.abstractmethod
    def step(self, params: Tensors, grads: Tensors, state: Tensors,
             trainable: Tensors) -> tuple[Tensors, Tensors]:
        """One update. ``trainable`` holds, for masked tensors, 1 where a coordinate may change and 0
        elsewhere (bool, or 0/1 in the parameters' dtype, which is faster to multiply by). Coordinates at 0
        keep their value (+0.0 bitwise; a -0.0 may become +0.0) and the optimiser state ``init`` gave
        them: masked weights stay exactly zero, frozen weights stay frozen."""

    def step_in_place(self, params: Tensors, grads: Tensors, state: Tensors,
                      trainable: Tensors) -> tuple[Tensors, Tensors]:
        """``step``'s numbers, for a caller that owns ``params``, ``grads`` and ``state`` and uses only the
        returned dicts afterwards: an optimiser may overwrite those tensors instead of allocating new ones
        (one client trained on its own, not under ``vmap``). The default simply calls ``step``."""
        return self.step(params, grads, state, trainable)


class ModelReparameterization(abc.ABC):
    """Optional: changes how the model computes with its parameters (e.g. Powerprop), applied once to the
    model the preset built, before the server reads its state. Must keep every maskable weight's name and
    shape; it may add dense parameters or remove layers (FedMef's normalised convolution adds a gain per
    channel and removes the BatchNorms), since masks, codecs and checkpoints follow the re-parameterised model."""

    @abc.abstractmethod
    def __call__(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def start_local_training(self, model: torch.nn.Module) -> None:
        """Called when a client starts its local training of a round, for state that lives one client-round
        (e.g. an activation threshold fixed by the first batch). The default keeps none."""


class ClientExecutor(abc.ABC):
    """Runs local training for a group of sampled clients (sequentially, vectorised, ...)."""

    @abc.abstractmethod
    def train(self, job: Any, tasks: list[Any], ctx: RoundContext) -> list[ClientResult]:
        """Train each task (a :class:`fl_sparse.training.client.ClientTask`) of the round's shared job (a
        :class:`~fl_sparse.training.client.TrainingJob`, from the layer above this one); one result per
        task, in task order."""
