"""Communication and compute to reach an accuracy: the paper's "less communication at equal accuracy" claim.

For each method (and budget column) the seed-mean test accuracy, smoothed over ``TAIL`` evaluations as
in the plots, is followed round by round; the first round where it reaches a threshold gives the seed-mean
cumulative GB and training FLOPs spent up to that round. Smoothing keeps one lucky evaluation from
counting as reaching an accuracy the model does not hold.
"""

from __future__ import annotations

from fl_sparse.reporting.summary import METHODS, TAIL, column_label, seed_mean_series, sorted_groups

THRESHOLDS = (30.0, 35.0, 40.0)  # test accuracy, %
NOT_REACHED = "not reached"


def first_reach(runs: list[dict], threshold: float, window: int = TAIL) -> tuple[int, float, float] | None:
    """(round, seed-mean cumulative GB, seed-mean cumulative FLOPs) at the first round whose smoothed
    seed-mean test accuracy is at least ``threshold`` %, or None if no round reaches it."""
    series = seed_mean_series(runs, ("cumulative_gb", "cumulative_flops"), "test_accuracy", window)
    for step, xs, accuracy in series:
        if accuracy >= threshold:
            return step, xs["cumulative_gb"], xs["cumulative_flops"]
    return None


def reach_table(groups: dict[tuple[str, str], list[dict]], thresholds: tuple[float, ...] = THRESHOLDS) -> str:
    header = ["method", "budget", "seeds"]
    for t in thresholds:
        header += [f"GB to {t:g} % (round)", f"FLOPs to {t:g} %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (algorithm, column), runs in sorted_groups(groups):
        cells = [METHODS.get(algorithm, algorithm), column_label(column), str(len(runs))]
        for t in thresholds:
            reached = first_reach(runs, t)
            cells += ([NOT_REACHED, NOT_REACHED] if reached is None
                      else [f"{reached[1]:.3f} ({reached[0]})", f"{reached[2]:.3g}"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Cumulative measured GB (both directions) and training FLOPs at the first round where the "
              f"test accuracy, averaged over seeds at each round and then over the last {TAIL} evaluations, "
              "reaches the threshold; the round is in brackets. Only rounds evaluated in every seed count, so a "
              "group whose seeds stopped at different rounds ends at the shortest. *not reached*: no round "
              "of the run reaches it."]
    return "\n".join(lines) + "\n"
