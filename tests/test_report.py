"""The numbers `fl-sparse report` derives from metric histories (the MLflow side is in test_cli)."""

import pytest

from fl_sparse.reporting.summary import TAIL, _column, active_seconds, markdown_table, seed_mean_curve, summarize


def history(accuracies, gb_per_round=0.5):
    rounds = range(1, len(accuracies) + 1)
    return {"test_accuracy": [(r, a) for r, a in zip(rounds, accuracies)],
            "local_accuracy": [(r, a - 0.01) for r, a in zip(rounds, accuracies)],
            "cumulative_gb": [(r, gb_per_round * r) for r in rounds],
            "cumulative_flops": [(r, 1e9 * r) for r in rounds]}


def test_best_final_and_tail_mean_follow_their_definitions():
    accuracies = [0.1 * (i % 5) for i in range(1, 13)] + [0.3]
    s = summarize(history(accuracies))
    assert s["best_test_accuracy"] == pytest.approx(40.0)
    assert s["final_test_accuracy"] == pytest.approx(30.0)
    assert s[f"last{TAIL}_test_accuracy"] == pytest.approx(100 * sum(accuracies[-TAIL:]) / TAIL)
    assert s["final_local_accuracy"] == pytest.approx(29.0)
    assert s["rounds"] == 13 and s["gb"] == pytest.approx(6.5) and s["flops"] == pytest.approx(13e9)


def test_seed_mean_curve_averages_seeds_on_common_rounds_then_smooths():
    runs = [summarize(history([0.1, 0.2, 0.3, 0.4])), summarize(history([0.3, 0.4, 0.5]))]
    curve = seed_mean_curve(runs, "cumulative_gb", window=2)
    # Rounds 1-3 are common; seed means of local accuracy are 19, 29, 39 %; window 2 smooths them.
    assert [x for x, _ in curve] == pytest.approx([0.5, 1.0, 1.5])
    assert [y for _, y in curve] == pytest.approx([19.0, 24.0, 34.0])


def test_table_orders_methods_as_the_paper_and_marks_budget_stops():
    runs = {("pffdst", "4gb"): [dict(summarize(history([0.2, 0.4])), planned=350, seed="0")],
            ("fedavgm", "4gb"): [dict(summarize(history([0.1, 0.2])), planned=2, seed="0"),
                                 dict(summarize(history([0.3, 0.2])), planned=2, seed="1")]}
    lines = markdown_table(runs).splitlines()
    assert lines[2].startswith("| FedAvgM | 4 GB | 2 | 24.00 ± 7.07 | 25.00 ± 7.07 |")
    assert lines[3].startswith("| PFFDST | 4 GB | 1 |") and "39.21" in lines[3]  # the paper's number
    assert "| 2 of 350 |" in lines[3] and "| 2 ± 0 |" in lines[2]


def test_runs_are_grouped_by_table1_budget_or_else_by_their_presets():
    assert _column("table1_8gb") == "8gb" and _column("cifar10_lenet table1_16gb") == "16gb"
    # Another experiment's preset (the ViT one) forms its own rows instead of falling in with others.
    assert _column("vit_cifar10_budget") == "vit_cifar10_budget" and _column("") == "-"


def test_active_seconds_leaves_out_an_interruption():
    start = 1_000_000
    rounds = [start + 5_000 * i for i in range(1, 5)] + [start + 20_000 + 3_600_000 + 5_000 * i for i in range(1, 3)]
    assert active_seconds(start, rounds) == pytest.approx(6 * 5.0)
    assert active_seconds(start, []) == 0.0


def test_rounds_logged_twice_by_a_resumed_run_count_once():
    h = history([0.1, 0.2, 0.3])
    h["test_accuracy"] = h["test_accuracy"] + [(2, 0.2), (3, 0.3)]  # rounds 2-3 replayed after a resume
    assert summarize(h)[f"last{TAIL}_test_accuracy"] == pytest.approx(20.0)


def test_a_reports_curves_differ_in_colour_or_dash_up_to_thirty_methods():
    from fl_sparse.reporting.plots import _style

    styles = [tuple(sorted(_style(index).items())) for index in range(30)]
    assert len(set(styles)) == 30
