"""What a tracked run says about itself: its name, its tags, and the final per-layer density table it leaves
behind (its accuracy plots are :func:`fl_sparse.reporting.plots.accuracy_plots`). Used by
:class:`fl_sparse.tracking.tracker.MlflowTracker`."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

from fl_sparse import __version__
from fl_sparse.core.state import ServerState
from fl_sparse.engine.experiment import Experiment

PLOT_METRICS = ("test_accuracy", "local_accuracy", "cumulative_gb", "cumulative_flops")


def target_sparsity(experiment: Experiment) -> float:
    """The sparsity the run ends at: its schedule's sparsity in the last round (0 for dense runs)."""
    return experiment.schedule.phase(experiment.rounds).sparsity


def run_name(algorithm: str, presets: list[str], experiment: Experiment) -> str:
    """e.g. ``pffdst table1_4gb s=0.8 seed=0``: what tells runs apart in the MLflow runs list."""
    return " ".join([algorithm, *(["+".join(presets)] if presets else []),
                     f"s={target_sparsity(experiment):g}", f"seed={experiment.seed}"])


def run_tags(algorithm: str, presets: list[str], experiment: Experiment, device: str) -> dict[str, str]:
    """Tags to filter and group runs by in the UI; the git commit only where one is known."""
    tags = {"algorithm": algorithm, "presets": ",".join(presets), "sparsity": f"{target_sparsity(experiment):g}",
            "seed": str(experiment.seed), "budget_gb": "none" if experiment.budget_gb is None
            else f"{experiment.budget_gb:g}", "fl_sparse_version": __version__, "host_cpu": cpu_model(),
            "device": device}
    commit = git_commit()
    if commit is not None:
        sha, dirty = commit
        # mlflow.source.git.commit is the tag MLflow's run page shows as the source's commit.
        tags.update(git_commit=sha, git_dirty=str(dirty).lower(), **{"mlflow.source.git.commit": sha})
    return tags


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def git_commit() -> tuple[str, bool] | None:
    """(HEAD commit, uncommitted changes?) of the source checkout this package is imported from, or None
    for an installed wheel, a tree without git, or no git on the PATH. Only the directory holding the
    package counts: a wheel inside a virtual environment inside some other repository has no commit."""
    root = Path(__file__).resolve().parents[2]  # the checkout holding fl_sparse/
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha, bool(changes)) if sha else None


def layer_table(state: ServerState) -> str:
    """Markdown: per floating-point tensor of the final global model, its size, density (1 where it has no
    mask) and the fraction frozen, of all its weights and of its active ones; a total row at the end."""
    lines = [f"Final global model after round {state.round}.", "",
             "| tensor | weights | masked | density | frozen (of weights) | frozen (of active) |",
             "|---|---|---|---|---|---|"]
    totals = [0, 0, 0]  # weights, active, frozen
    for name, tensor in state.weights.items():
        if not tensor.is_floating_point():
            continue
        size = tensor.numel()
        active = int(state.mask[name].sum()) if name in state.mask else size
        frozen = int(state.frozen[name].sum()) if name in state.frozen else 0
        totals = [totals[0] + size, totals[1] + active, totals[2] + frozen]
        lines.append(_layer_row(name, size, "yes" if name in state.mask else "no", active, frozen))
    lines.append(_layer_row("**total**", *totals[:1], "", *totals[1:]))
    return "\n".join(lines) + "\n"


def _layer_row(name: str, size: int, masked: str, active: int, frozen: int) -> str:
    frozen_of_active = f"{frozen / active:.4f}" if active else "-"
    return (f"| {name} | {size:,} | {masked} | {active / max(size, 1):.4f} | {frozen / max(size, 1):.4f} | "
            f"{frozen_of_active} |")
