"""The one way to turn an algorithm, presets and bindings into a built :class:`Experiment`.

Every caller composes here: the command line, Flower's server and clients, the budget rule, studies,
benchmarks, tools and tests. Gin is cleared and parsed (defaults, presets, algorithm, bindings; last wins),
then ``Experiment()`` is built, which validates every value before any data is loaded. Every binding error,
whether gin finds it or a part's own check does, becomes one :class:`ConfigError` line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import gin

import fl_sparse.parts  # noqa: F401  (registers every part with gin before anything is parsed)
from fl_sparse.config import gin_files
from fl_sparse.core.errors import ConfigError, first_line
from fl_sparse.engine.experiment import Experiment

ROUNDS_MACRO = "ROUNDS"
ROUNDS_BINDING = re.compile(r"\s*Experiment\.rounds\s*=\s*(\d+)\s*")


@dataclasses.dataclass(frozen=True)
class Composed:
    """A composition and the Experiment built from it, with the text that identifies it."""

    algorithm: str  # as given: a short name or a .gin path
    presets: tuple[str, ...]
    bindings: tuple[str, ...]  # every extra binding, the ones ``rounds`` adds included
    experiment: Experiment
    config_text: str  # gin.config_str() right after parsing: what checkpoints record and compare
    params: dict[str, str]  # every binding in force, resolved (MLflow params)

    @property
    def name(self) -> str:
        """The algorithm's short name (``pffdst`` for ``algorithms/pffdst.gin`` or ``./pffdst.gin``)."""
        return os.path.splitext(os.path.basename(self.algorithm))[0]


def compose(algorithm: str, presets: Sequence[str] = (), bindings: Sequence[str] = (),
            rounds: int | None = None) -> Composed:
    """Parse the composition and build its Experiment.

    ``rounds`` sets the run's total rounds: it binds ``ROUNDS`` and, where the composition binds
    ``Experiment.rounds`` to another macro (``pffdst.gin``'s ``PFFDST_ROUNDS``, which its schedule also
    reads), that macro too, so the schedule follows. A binding ``Experiment.rounds = N`` (a number) means the
    same as ``rounds=N``: the last one given wins."""
    bindings = list(bindings)
    for binding in list(bindings):
        match = ROUNDS_BINDING.fullmatch(binding)
        if match:
            bindings.remove(binding)
            rounds = int(match[1])
    if rounds is not None:
        gin_files.parse(algorithm, list(presets), bindings)
        macros = dict.fromkeys([ROUNDS_MACRO, _rounds_macro()])
        bindings += [f"{macro} = {rounds}" for macro in macros if macro]
    gin_files.parse(algorithm, list(presets), bindings)
    try:
        experiment = Experiment()  # validates every binding before anything is loaded or logged
    except TypeError as error:  # a value of the wrong type met a part's own checks ('abc' > 0)
        part = re.search(r"In call to configurable '(\w+)'", str(error))
        raise ConfigError(f"a binding of {part[1] if part else 'Experiment'} has a value of the wrong type: "
                          f"{first_line(error)}") from None
    return Composed(algorithm, tuple(presets), tuple(bindings), experiment, gin.config_str(),
                    gin_files.bindings_as_params())


def _rounds_macro() -> str | None:
    """The macro that ``Experiment.rounds`` is bound to in the parsed config, if it is one."""
    try:
        value = str(gin.query_parameter("Experiment.rounds"))
    except ValueError:  # not bound at all
        return None
    return value[1:] if value.startswith("%") else None
