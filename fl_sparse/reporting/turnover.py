"""Mask turnover: how many weights each round's global mask regrows and drops, the quantity the SparsyFed paper
compares sparse methods on (``weights_regrown``: zero in the global model of round r, non-zero in that of round
r + 1; ``weights_dropped``: the reverse). ``turnover.md`` and ``turnover.png`` of a report, for the runs that
logged it."""

from __future__ import annotations

import statistics
from pathlib import Path

from fl_sparse.reporting.plots import turnover_plot
from fl_sparse.reporting.summary import METHODS, sorted_groups

KEYS = ("weights_regrown", "weights_dropped")


def _per_round(runs: list[dict], key: str) -> dict[int, float]:
    """Seed mean of ``key`` at each round every run logged (round 1 left out: it starts from the dense model)."""
    series = [dict(run["turnover"][key]) for run in runs]
    rounds = sorted(set.intersection(*(set(s) for s in series)) - {1})
    return {r: statistics.mean(s[r] for s in series) for r in rounds}


def _logged(runs: list[dict]) -> list[dict]:
    """The runs that logged turnover (runs older than the metric did not)."""
    return [run for run in runs if run.get("turnover", {}).get(KEYS[0])]


def turnover_table(groups: dict[tuple[str, str], list[dict]]) -> str | None:
    """Per method: mean weights regrown and dropped per round (rounds 2 on), the share of rounds whose mask
    changed, and the regrowth in the first and the last tenth of the rounds; None when no run logged it."""
    lines = ["| method | budget | seeds | regrown / round | dropped / round | rounds with a change | "
             "regrown / round, first 10 % | regrown / round, last 10 % |", "|---|---|---|---|---|---|---|---|"]
    for (algorithm, column), runs in sorted_groups(groups):
        runs = _logged(runs)
        if not runs:
            continue
        regrown, dropped = _per_round(runs, KEYS[0]), _per_round(runs, KEYS[1])
        rounds = sorted(regrown)
        if not rounds:
            continue
        tenth = max(1, len(rounds) // 10)
        changed = sum(regrown[r] > 0 or dropped[r] > 0 for r in rounds) / len(rounds)
        first, last = (statistics.mean(regrown[r] for r in part) for part in (rounds[:tenth], rounds[-tenth:]))
        lines.append(f"| {METHODS.get(algorithm, algorithm)} | {column} | {len(runs)} | "
                     f"{statistics.mean(regrown.values()):.1f} | {statistics.mean(dropped.values()):.1f} | "
                     f"{100 * changed:.0f} % of {len(rounds)} | {first:.1f} | {last:.1f} |")
    if len(lines) == 2:
        return None
    return "\n".join(lines) + (
        "\n\nSeed means over rounds 2 on (round 1 prunes the dense start). *regrown*: weights zero in the global model"
        " of round r and non-zero in that of round r + 1; *dropped*: the reverse. *seeds*: the runs that logged them"
        " (runs older than the metric did not).\n")


def turnover_series(groups: dict[tuple[str, str], list[dict]]) -> dict[str, dict[int, float]]:
    """{legend label: {round: weights regrown, seed mean}} of the groups that logged it."""
    return {f"{METHODS.get(algorithm, algorithm)} ({column}, {len(logged)} seeds)": _per_round(logged, KEYS[0])
            for (algorithm, column), runs in sorted_groups(groups) if (logged := _logged(runs))}


def write_turnover(groups: dict[tuple[str, str], list[dict]], out: Path) -> list[Path]:
    table = turnover_table(groups)
    if table is None:
        return []
    path = out / "turnover.md"
    path.write_text(table)
    return [path, turnover_plot(turnover_series(groups), out)]
