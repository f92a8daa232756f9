"""The report's plots: accuracy against GB and FLOPs, against the Table 1 budget column, and mask turnover.

The only module that imports matplotlib (the ``report`` extra, not a core dependency: training hosts and Ray /
Flower workers never plot), and only when a plot is drawn."""

from __future__ import annotations

import importlib.util
import statistics
import warnings
from collections import defaultdict
from pathlib import Path

from fl_sparse.core.errors import ConfigError
from fl_sparse.reporting.paper import PAPER_TABLE1
from fl_sparse.reporting.summary import METHODS, TAIL, budget_gb, seed_mean_curve, sorted_groups, summarize

MATPLOTLIB_MISSING = ("fl-sparse report draws its plots with matplotlib, which is not installed: "
                      "pip install 'fl-sparse[report]'")


def require_matplotlib() -> None:
    """Raise the one-line :data:`MATPLOTLIB_MISSING` before anything is read or written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(MATPLOTLIB_MISSING) from None


def _figure():
    """A fresh figure and axes of the report's size, drawn off-screen (Agg: no display on training hosts)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(7, 4.5))


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _style(index: int) -> dict:
    """Line colour and dash of the ``index``-th curve: matplotlib's 10 colours, then again dashed, then dotted, so
    that no two curves of a report look alike."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":")[index // 10 % 3]}


def plots(groups: dict[tuple[str, str], list[dict]], out: Path) -> list[Path]:
    written = []
    for x_key, label, name in [("cumulative_gb", "cumulative communication (GB, measured)", "accuracy_vs_gb.png"),
                               ("cumulative_flops", "cumulative training FLOPs", "accuracy_vs_flops.png")]:
        fig, ax = _figure()
        curves = [(key, runs, seed_mean_curve(runs, x_key)) for key, runs in sorted_groups(groups)]
        for index, ((algorithm, column), runs, points) in enumerate(c for c in curves if c[2]):
            ax.plot(*zip(*points), **_style(index),
                    label=f"{METHODS.get(algorithm, algorithm)} ({column}, {len(runs)} seed{'s' * (len(runs) != 1)})")
        ax.set_xlabel(label)
        ax.set_ylabel(f"local test accuracy (%), seed mean,\nmoving average of {TAIL} evaluations")
        written.append(_save(fig, ax, out / name))
    return written


def budget_plot(groups: dict[tuple[str, str], list[dict]], out: Path) -> Path | None:
    """``accuracy_vs_budget.png``: best and last-10 test accuracy (seed mean, std as error bars) against the
    Table 1 budget column, one colour per method, with the paper's best as open markers. Written when some
    method has runs at two budgets or more; variants and other experiments are left out."""
    by_method: dict[str, list[tuple[int, list[dict]]]] = defaultdict(list)
    for (algorithm, column), runs in sorted_groups(groups):  # budgets in increasing order
        if (gb := budget_gb(column)) is not None:
            by_method[algorithm].append((gb, runs))
    by_method = {a: points for a, points in by_method.items() if len(points) > 1}
    if not by_method:
        return None
    fig, ax = _figure()
    for index, (algorithm, points) in enumerate(by_method.items()):
        color, name = f"C{index}", METHODS.get(algorithm, algorithm)
        budgets = [gb for gb, _ in points]
        for key, style, label in [("best_test_accuracy", "-o", "best"), (f"last{TAIL}_test_accuracy", "--s",
                                                                          f"last {TAIL}")]:
            values = [[r[key] for r in runs] for _, runs in points]
            ax.errorbar(budgets, [statistics.mean(v) for v in values], fmt=style, color=color, capsize=3,
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
                        label=f"{name}, {label} (seeds: {', '.join(str(len(v)) for v in values)})")
        paper = [(budget_gb(column), best) for column, best in PAPER_TABLE1.get(algorithm, {}).items()]
        if paper:
            ax.plot(*zip(*paper), "D", mfc="none", color=color, label=f"{name}, paper (best, local acc.)")
    ax.set_xlabel("Table 1 budget column (GB, the paper's label)")
    ax.set_ylabel("test accuracy (%), seed mean ± std")
    ax.set_xticks(sorted({gb for points in by_method.values() for gb, _ in points} | {4, 8, 12, 16}))
    return _save(fig, ax, out / "accuracy_vs_budget.png")


def accuracy_plots(history: dict[str, list[tuple[int, float]]], algorithm: str, presets: list[str],
                   out: Path) -> list[Path]:
    """accuracy_vs_gb.png and accuracy_vs_flops.png of one run, drawn by ``fl-sparse report``'s plotting;
    none (and one warning) without matplotlib, none for a run that was never evaluated."""
    if not history.get("test_accuracy") or not history.get("local_accuracy"):
        return []
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn("matplotlib is not installed, so the run has no accuracy plots "
                      "(pip install 'fl-sparse[report]')", stacklevel=2)
        return []
    return plots({(algorithm, ",".join(presets) or "-"): [summarize(history)]}, out)


def turnover_plot(series: dict[str, dict[int, float]], out: Path) -> Path:
    """``turnover.png``: weights regrown in the global mask per round, one line per label, on a symmetric log
    scale (a frozen mask is a line at 0)."""
    fig, ax = _figure()
    for index, (label, per_round) in enumerate(series.items()):
        ax.plot(list(per_round), list(per_round.values()), **_style(index), label=label)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("round")
    ax.set_ylabel("weights regrown in the global mask\n(seed mean)")
    return _save(fig, ax, out / "turnover.png")
