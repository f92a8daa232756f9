"""``fl-sparse report``: tables and plots from run records, next to the paper's numbers.

The records come from an export directory (``--from-export``) or straight from MLflow, built in memory by
the same code that writes the export (:mod:`fl_sparse.reporting.records`), so both give the same report.

Runs are grouped by their ``algorithm`` tag and by the budget column, read from the ``presets`` tag
(``<N>gb`` for a preset named ``table1_<N>gb``; otherwise the presets themselves, e.g. ``vit_cifar10_budget``,
so another experiment's runs form their own rows; ``-`` when no preset is recorded). Records read from several
MLflow experiments that share a method and budget (a variant beside its base run, e.g. ``table1_4gb_known_mask``
beside ``table1_4gb``) keep apart: the budget column then names the experiment too. For every group it gives mean
± std over seeds of: the best evaluated accuracy over rounds (as the paper reports it: this picks the
round on the test set, so it is an optimistic number and labelled so), the final-round accuracy, both
for the full test set and the mean of the clients' local test splits, measured GB, FLOPs and rounds.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict

from fl_sparse.core.errors import ConfigError
from fl_sparse.reporting.paper import PAPER_TABLE1
from fl_sparse.reporting.records import BASE_VARIANT, RunRecord

# Rows in the paper's order, with the names the paper uses.
METHODS = {"fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedprox": "FedProx", "random_mask": "RandomMask",
           "feddst": "FedDST", "feddst_fedprox": "FedDST+FedProx", "pffdst": "PFFDST",
           "pffdst_wo_pf": "PFFDST w/o PF", "pffdst_wo_smr": "PFFDST w/o SMR", "sparsyfed": "SparsyFed",
           # then the compositions of later issues, by the names their papers use
           "sparsyfed_exact_density": "SparsyFed (exact density)", "feddst_votes": "FedDST (votes)",
           "pffdst_wo_pf_authors": "PFFDST w/o PF (authors')", "pffdst_wo_smr_authors": "PFFDST w/o SMR (authors')",
           "flash_spdst": "FLASH SPDST", "flash_jointdst": "FLASH JointDST", "flash_pf": "FLASH + PF",
           "fedmef": "FedMef", "fedmef_bn": "FedMef (NSC)", "fedtiny": "FedTiny", "prunefl": "PruneFL"}
TAIL = 10  # evaluations averaged for the "last 10" column: one evaluation is a noisy draw


def _column(presets: str) -> str:
    match = re.search(r"table1_(\d+gb)", presets or "")
    return match.group(1) if match else (presets or "-")


def column_label(column: str) -> str:
    """``4gb`` as ``4 GB``, ``4gb · table1_4gb_reference`` as ``4 GB · table1_4gb_reference``."""
    return re.sub(r"^(\d+)gb\b", r"\1 GB", column)


def budget_gb(column: str) -> int | None:
    """The budget of a plain Table 1 column (``8gb`` -> 8); None for variants and other experiments."""
    match = re.fullmatch(r"(\d+)gb", column)
    return int(match.group(1)) if match else None


def summarize(history: dict[str, list[tuple[int, float]]]) -> dict:
    """Per-run numbers from metric histories {key: [(round, value)]}: best, final and mean of the last
    ``TAIL`` evaluations of both accuracy kinds (in %), the last cumulative GB and FLOPs, and the rounds."""
    summary = {"history": history, "rounds": max(step for step, _ in history["cumulative_gb"])}
    for kind in ("test_accuracy", "local_accuracy"):
        # A run resumed from a checkpoint logs the rounds after it again; the later value counts.
        by_round = dict(history[kind])
        values = [by_round[step] for step in sorted(by_round)]
        summary[f"best_{kind}"], summary[f"final_{kind}"] = 100 * max(values), 100 * values[-1]
        summary[f"last{TAIL}_{kind}"] = 100 * statistics.mean(values[-TAIL:])
    summary["gb"] = sorted(history["cumulative_gb"])[-1][1]
    summary["flops"] = sorted(history["cumulative_flops"])[-1][1]
    return summary


def collect(records: list[RunRecord]) -> dict[tuple[str, str], list[dict]]:
    """Runs with evaluations as {(algorithm, column): [per-seed summary]}, with full metric histories."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    keys = [(record.info["algorithm"], _column(record.info["presets"])) for record in records]
    experiments = defaultdict(set)  # (algorithm, column) -> the experiments (or study groups) its runs come from
    for key, record in zip(keys, records):
        experiments[key].add(_source(record))
    for key, record in zip(keys, records):
        history = {key: record.history(key)
                   for key in ("test_accuracy", "local_accuracy", "cumulative_gb", "cumulative_flops")}
        if not history["test_accuracy"]:
            continue
        summary = summarize(history)
        summary["wall_s"] = active_seconds(record.info["start_ms"], list(record.logged_ms.values()))
        summary["turnover"] = {key: record.history(key) for key in ("weights_regrown", "weights_dropped")}
        planned = record.info["params"].get("Experiment.rounds", "")
        summary.update(run_id=record.info["run_id"], seed=str(record.info["seed"]),
                       planned=int(planned) if planned.isdigit() else None)
        # A variant and its base run: one row each, named by the experiment. A study variant (another model, a
        # changed binding) is named so even when its base run is absent, so that it never reads as the base.
        if len(experiments[key]) > 1 or record.info.get("variant") not in (None, BASE_VARIANT):
            key = (key[0], f"{key[1]} · {_source(record)}")
        groups[key].append(summary)
    if not groups:
        raise ConfigError("no finished runs with evaluations to report")
    return groups


def _source(record: RunRecord) -> str | None:
    """Where a run comes from: its study group (a study trial's export folder) or its MLflow experiment."""
    return record.info.get("group") or record.info.get("experiment")


def active_seconds(start_ms: int, round_ms: list[int]) -> float:
    """Wall-clock seconds of a run from the times its rounds were logged, without the time it spent
    interrupted: a gap over 10x the median round (a stop before ``--resume``) counts as one median round."""
    times = [start_ms, *sorted(round_ms)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    if not gaps:
        return 0.0
    typical = statistics.median(gaps)
    return sum(gap if gap <= 10 * typical else typical for gap in gaps) / 1000


def _mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sorted_groups(groups: dict[tuple[str, str], list[dict]]) -> list[tuple[tuple[str, str], list[dict]]]:
    order = list(METHODS)

    def rank(key: tuple[str, str]) -> tuple:
        budget = int(re.match(r"\d*", key[1]).group() or 10**9)  # 4gb before 16gb; other experiments last
        return order.index(key[0]) if key[0] in order else len(order), key[0], budget, key[1]

    return sorted(groups.items(), key=lambda item: rank(item[0]))


def _rounds(runs: list[dict]) -> str:
    text = _mean_std([float(r["rounds"]) for r in runs], 0)
    planned = {r["planned"] for r in runs if r.get("planned")}  # runs logged before params were resolved lack it
    if len(planned) == 1 and planned != {max(r["rounds"] for r in runs)}:
        text += f" of {planned.pop()}"
    return text


def markdown_table(groups: dict[tuple[str, str], list[dict]]) -> str:
    lines = ["| method | budget | seeds | best local acc. % | best test acc. % | final local acc. % | "
             f"final test acc. % | last {TAIL} test acc. % | paper (best) % | measured GB | FLOPs | rounds | "
             "wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (algorithm, column), runs in sorted_groups(groups):
        paper = PAPER_TABLE1.get(algorithm, {}).get(column)
        lines.append("| " + " | ".join([
            METHODS.get(algorithm, algorithm), column_label(column), str(len(runs)),
            _mean_std([r["best_local_accuracy"] for r in runs]), _mean_std([r["best_test_accuracy"] for r in runs]),
            _mean_std([r["final_local_accuracy"] for r in runs]), _mean_std([r["final_test_accuracy"] for r in runs]),
            _mean_std([r[f"last{TAIL}_test_accuracy"] for r in runs]),
            "-" if paper is None else f"{paper:.2f}",
            _mean_std([r["gb"] for r in runs], 3), f"{statistics.mean(r['flops'] for r in runs):.3g}",
            _rounds(runs), ", ".join(f"{r['wall_s'] / 60:.0f}" for r in sorted(runs, key=lambda r: r["seed"])
                                     if "wall_s" in r)]) + " |")
    lines += ["", "Mean ± sample std over seeds. *best*: the highest evaluated accuracy over all rounds, as the "
              "paper reports it; it picks the round on the test set, so read it as an optimistic bound. "
              "*final*: the last evaluated round. "
              f"*last {TAIL}*: the mean of the last {TAIL} evaluations, less noisy than one round. "
              "*local acc.*: unweighted mean over clients of the accuracy on each client's local test split "
              "(the reference code's metric, the one the paper's table reports); *test acc.*: the full "
              "10,000-image CIFAR-10 test set. GB and FLOPs are measured from the encoded payloads and the "
              "masks of each run, not estimated. *rounds*: rounds played; \"of N\" when the communication "
              "budget stopped a run before its planned N rounds. *wall min*: minutes per seed (in seed order) "
              "from start to last round, as logged, without time spent interrupted; it depends on what else "
              "shared the CPU."]
    return "\n".join(lines) + "\n"


def seed_mean_series(runs: list[dict], x_keys: tuple[str, ...], y_key: str = "local_accuracy",
                     window: int = TAIL) -> list[tuple[int, dict[str, float], float]]:
    """(round, {x_key: seed mean}, accuracy %) at each round evaluated in every seed: the accuracy is
    averaged over seeds, then smoothed by a moving average over ``window`` evaluations (single evaluations
    swing by several points)."""
    per_run = [({key: dict(r["history"][key]) for key in x_keys}, dict(r["history"][y_key])) for r in runs]
    rounds = sorted(set.intersection(*(set(acc).intersection(*x_at.values()) for x_at, acc in per_run)))
    ys = [100 * statistics.mean(acc[step] for _, acc in per_run) for step in rounds]
    smooth = [statistics.mean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
    return [(step, {key: statistics.mean(x_at[key][step] for x_at, _ in per_run) for key in x_keys}, y)
            for step, y in zip(rounds, smooth)]


def seed_mean_curve(runs: list[dict], x_key: str, window: int = TAIL) -> list[tuple[float, float]]:
    """(x, local accuracy %) of :func:`seed_mean_series`: the plotted curve."""
    return [(xs[x_key], y) for _, xs, y in seed_mean_series(runs, (x_key,), window=window)]
