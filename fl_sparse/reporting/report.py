"""``fl-sparse report``: table.md, reach.md and the plots of a set of run records."""

from __future__ import annotations

from pathlib import Path

from fl_sparse.reporting.plots import budget_plot, plots, require_matplotlib
from fl_sparse.reporting.reach import THRESHOLDS, reach_table
from fl_sparse.reporting.records import RunRecord
from fl_sparse.reporting.summary import collect, markdown_table
from fl_sparse.reporting.turnover import write_turnover


def write_report(records: list[RunRecord], out: Path, reach_thresholds: tuple[float, ...] | None = None) -> list[Path]:
    """table.md, reach.md (at ``reach_thresholds`` %, default :data:`~fl_sparse.reporting.reach.THRESHOLDS`) and the
    plots from run records (:mod:`fl_sparse.reporting.records`), however read."""
    require_matplotlib()
    groups = collect(records)
    out.mkdir(parents=True, exist_ok=True)
    table, reach = out / "table.md", out / "reach.md"
    table.write_text(markdown_table(groups))
    reach.write_text(reach_table(groups, reach_thresholds or THRESHOLDS))
    budget = budget_plot(groups, out)
    return [table, reach, *plots(groups, out), *([budget] if budget else []), *write_turnover(groups, out)]
