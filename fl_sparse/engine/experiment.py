"""An experiment: dataset, model, the algorithm's parts, rounds and seeds, all bound through gin.

Building an :class:`Experiment` validates every value before any data is loaded or any run is
created, so a bad configuration writes nothing.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from typing import Callable

import gin
import torch

from fl_sparse.core.discovery import MaskDiscovery
from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import (
    Aggregator,
    ClientExecutor,
    ClientOptimizer,
    CommCodec,
    FreezePolicy,
    LocalObjective,
    MaskPolicy,
    ModelReparameterization,
    SparsitySchedule,
)
from fl_sparse.data import CIFAR10, FederatedData
from fl_sparse.models import lenet
from fl_sparse.parts.aggregators import UnionAverage
from fl_sparse.parts.codecs import AutoSparse
from fl_sparse.parts.executors.sequential import Sequential
from fl_sparse.parts.freezing import NoFreeze
from fl_sparse.parts.mask_policies import NoMask
from fl_sparse.parts.objectives import SGD, CrossEntropy
from fl_sparse.parts.schedules import Constant

_SCALAR_ANNOTATIONS = {"int": int, "int | None": int, "float": (int, float), "float | None": (int, float), "str": str}
_SCALAR_WORDS = {"int": "an integer", "int | None": "an integer or None", "float": "a finite number",
                 "float | None": "a finite number or None", "str": "a string"}


@gin.configurable
@dataclasses.dataclass
class Experiment:
    """Everything one federated run needs. Defaults give a small dense FedAvg run on the embedded data."""

    rounds: int = 10
    dataset: object = dataclasses.field(default_factory=CIFAR10)
    model: Callable[[int], torch.nn.Module] = lenet
    reparameterization: ModelReparameterization | None = None  # e.g. @Powerprop() (SparsyFed)
    num_clients: int = 20
    clients_per_round: int = 5
    dirichlet_alpha: float = 0.1
    local_epochs: int = 3
    batch_size: int = 32
    eval_every: int = 1
    budget_gb: float | None = None  # stop before the measured up+down bytes would exceed this
    seed: int = 0
    partition_seed: int | None = None  # each None falls back to ``seed`` (streams differ anyway)
    init_seed: int | None = None
    sampling_seed: int | None = None
    device: str = "auto"
    schedule: SparsitySchedule = dataclasses.field(default_factory=lambda: Constant(0.0))
    mask_policy: MaskPolicy = dataclasses.field(default_factory=NoMask)
    mask_discovery: MaskDiscovery | None = None  # e.g. @FlashDensities() (FLASH): clients choose the initial mask
    freeze_policy: FreezePolicy = dataclasses.field(default_factory=NoFreeze)
    aggregator: Aggregator = dataclasses.field(default_factory=UnionAverage)
    uplink_codec: CommCodec = dataclasses.field(default_factory=AutoSparse)
    downlink_codec: CommCodec = dataclasses.field(default_factory=AutoSparse)
    objective: LocalObjective = dataclasses.field(default_factory=CrossEntropy)
    optimizer: ClientOptimizer = dataclasses.field(default_factory=SGD)
    executor: ClientExecutor = dataclasses.field(default_factory=Sequential)

    def __post_init__(self):
        self._check_types()
        check(self.rounds >= 1, f"Experiment.rounds={self.rounds} must be >= 1 (use --rounds N)")
        check(self.num_clients >= 1, f"Experiment.num_clients={self.num_clients} must be >= 1")
        check(1 <= self.clients_per_round <= self.num_clients,
              f"Experiment.clients_per_round={self.clients_per_round} must lie in [1, num_clients="
              f"{self.num_clients}]; clients are sampled without replacement")
        check(self.dirichlet_alpha > 0, f"Experiment.dirichlet_alpha={self.dirichlet_alpha} must be > 0 "
                                        "(smaller is more label skew; the paper uses 0.1)")
        check(self.local_epochs >= 1, f"Experiment.local_epochs={self.local_epochs} must be >= 1")
        check(self.batch_size >= 1, f"Experiment.batch_size={self.batch_size} must be >= 1")
        check(self.budget_gb is None or self.budget_gb > 0,
              f"Experiment.budget_gb={self.budget_gb} must be > 0 (or None for no budget)")
        check(self.eval_every >= 1, f"Experiment.eval_every={self.eval_every} must be >= 1")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"Experiment.device={self.device!r} must be auto, cpu or cuda")
        check(self.device in ("auto", "cpu") or torch.cuda.is_available(),
              f"--device {self.device}: CUDA is not available on this machine; use --device cpu or auto")
        total = getattr(self.schedule, "total_rounds", None)
        if total is not None:
            check(total == self.rounds, f"the schedule is built for {total} rounds but Experiment.rounds="
                                        f"{self.rounds}; bind both through the ROUNDS macro (--rounds N)")

    def _check_types(self) -> None:
        """Values bound through gin arrive unchecked (``Experiment.rounds='3'``, ``=1e999``,
        ``Experiment.mask_policy=3``); check them against the annotations first, so that the range checks
        below compare numbers and a wrong part fails here, not in the first round. Seeds are non-negative:
        numpy's SeedSequence rejects negative entropy."""
        for field in dataclasses.fields(self):
            kinds = _SCALAR_ANNOTATIONS.get(field.type)
            value = getattr(self, field.name)
            if kinds is None or (value is None and field.type.endswith("None")):
                continue
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            check(isinstance(value, kinds) and not isinstance(value, bool)
                  and (not is_number or math.isfinite(value)),
                  f"Experiment.{field.name}={value!r} must be {_SCALAR_WORDS[field.type]}")
            if field.name.endswith("seed"):
                check(value >= 0, f"Experiment.{field.name}={value} must be >= 0 (--seed S)")
        check(callable(self.model), f"Experiment.model={self.model!r} must be a model function, e.g. @lenet")
        for name, hint in typing.get_type_hints(type(self)).items():  # parts: an instance of their interface
            interfaces = tuple(t for t in typing.get_args(hint) or (hint,) if isinstance(t, abc.ABCMeta))
            value = getattr(self, name)
            if not interfaces or (value is None and type(None) in typing.get_args(hint)):
                continue
            shown = repr(value) if isinstance(value, (int, float, str, type(None))) else f"@{type(value).__name__}()"
            check(isinstance(value, interfaces), f"Experiment.{name}={shown} must be a {interfaces[0].__name__} "
                                                 f"part: @Name() of one that fl-sparse list shows under it")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def load_data(self) -> FederatedData:
        """The dataset split over the clients: the same split in every process that composes this experiment."""
        return self.dataset.load(self.num_clients, self.dirichlet_alpha, self.stream_seed("partition"))

    def stream_seed(self, stream: str) -> int:
        """The seed of one random stream: partition, model init, or client sampling; the rest use ``seed``."""
        overrides = {"partition": self.partition_seed, "init": self.init_seed, "sampling": self.sampling_seed}
        override = overrides.get(stream)
        return self.seed if override is None else override
