"""The flags that describe a composition, shared by ``fl-sparse run`` and ``fl-sparse flower run|simulate``, and
the gin bindings they stand for."""

from __future__ import annotations

import argparse

EXECUTORS = {"sequential": "Sequential", "vectorized": "Vectorized", "ray": "RayExecutor"}  # --executor -> part


# flag (argparse dest) -> the gin binding it stands for, formatted with the flag's value
FLAG_BINDINGS = {
    "sparsity": "SPARSITY = {}",
    "data_dir": "DATA_DIR = {!r}",
    "device": "Experiment.device = {!r}",
    "seed": "Experiment.seed = {}",
    "budget_gb": "Experiment.budget_gb = {}",
    "executor": "Experiment.executor = @{}()",
    "workers": "RayExecutor.num_workers = {}",
    "ray_address": "RayExecutor.address = {!r}",
}


def bindings(args: argparse.Namespace) -> list[str]:
    """The gin bindings of the flags a command has (a flag it lacks counts as unset), then ``--bind``'s."""
    values = {flag: getattr(args, flag, None) for flag in FLAG_BINDINGS}
    if values["executor"] is not None:
        values["executor"] = EXECUTORS[values["executor"]]
    found = [FLAG_BINDINGS[flag].format(value) for flag, value in values.items() if value is not None]
    return found + list(getattr(args, "bind", None) or [])


def compose(args: argparse.Namespace):
    """The :class:`~fl_sparse.config.compose.Composed` experiment the flags describe (``--rounds`` included)."""
    from fl_sparse.config.compose import compose as compose_experiment  # torch: only once the flags are checked

    return compose_experiment(args.algorithm, args.presets, bindings(args), rounds=getattr(args, "rounds", None))
