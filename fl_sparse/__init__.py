"""fl_sparse: sparse federated learning composed from gin-registered parts.

Start reading at :mod:`fl_sparse.core.interfaces` (the parts) and ``algorithms/pffdst.gin`` (one composition).
In a notebook::

    import fl_sparse as fls

    result = fls.run(fls.build("pffdst", ["demo"], ["TwoStage.readjust_every = 5"], rounds=40))
    print(result.summary_line())

The names below are the public API; they load on first use, so ``import fl_sparse`` stays cheap (the command
line checks its flags before torch is imported). The package's layers and what each may import are in
``docs/design.md``.
"""

from importlib import import_module, metadata

try:
    __version__ = metadata.version("fl-sparse")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    # compose and run
    "build": "fl_sparse.config.compose", "Composed": "fl_sparse.config.compose",
    "run": "fl_sparse.runtime.runner", "RunResult": "fl_sparse.runtime.callbacks",
    "RunStart": "fl_sparse.runtime.callbacks", "Callback": "fl_sparse.runtime.callbacks",
    "OnRound": "fl_sparse.runtime.callbacks", "ProgressBar": "fl_sparse.runtime.progress",
    "Experiment": "fl_sparse.engine.experiment", "RoundServer": "fl_sparse.engine.server",
    "run_rounds": "fl_sparse.engine.loop",
    # the part interfaces
    **dict.fromkeys(["Aggregator", "MaskPolicy", "FreezePolicy", "CommCodec", "LocalObjective", "ClientOptimizer",
                     "ClientExecutor", "SparsitySchedule", "ModelReparameterization"], "fl_sparse.core.interfaces"),
    # the state types
    **dict.fromkeys(["Tensors", "Phase", "RoundContext", "ClientResult", "Message", "Link", "ModelSchema",
                     "TensorSpec"], "fl_sparse.core.interfaces"),
    "ServerState": "fl_sparse.core.state", "RoundEvent": "fl_sparse.core.state",
    # errors a caller may catch
    **dict.fromkeys(["FlSparseError", "ConfigError", "DataError", "PayloadError"], "fl_sparse.core.errors"),
}
_ALIASES = {"build": "compose"}  # fls.build is config.compose.compose

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fl_sparse' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), _ALIASES.get(name, name))
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
