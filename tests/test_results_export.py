"""Raw results as text: the export round-trips exactly, the report rebuilt from it equals the report from MLflow,
and the communication-to-accuracy table gives the answers worked out by hand."""

from __future__ import annotations

import json

import pytest

from fl_sparse.cli.main import main
from fl_sparse.core.errors import ConfigError
from fl_sparse.reporting import records as export_format
from fl_sparse.reporting.plots import budget_plot
from fl_sparse.reporting.reach import NOT_REACHED, first_reach, reach_table
from fl_sparse.reporting.records import RunRecord
from fl_sparse.reporting.summary import collect, markdown_table

FAST = ["--bind", "Experiment.local_epochs=1", "--bind", "Experiment.num_clients=10",
        "--bind", "Experiment.clients_per_round=2"]


def record(algorithm: str, seed: int, test: list[float], gb_per_round: float, flops_per_round: float,
           run_id: str | None = None, experiment: str = "table1_4gb", presets: str = "table1_4gb") -> RunRecord:
    rounds = range(1, len(test) + 1)
    metrics = {"test_accuracy": dict(zip(rounds, test)),
               "local_accuracy": {r: 0.0 for r in rounds},  # the reach table must follow test accuracy
               "cumulative_gb": {r: gb_per_round * r for r in rounds},
               "cumulative_flops": {r: flops_per_round * r for r in rounds}}
    info = {"format": export_format.FORMAT_VERSION, "run_id": run_id or f"{algorithm}{seed}0123456789",
            "algorithm": algorithm, "presets": presets, "experiment": experiment, "seed": str(seed), "start_ms": 1_000,
            "params": {"Experiment.rounds": str(len(test))}}
    return RunRecord(f"{algorithm}_s{seed}", info, metrics, {r: 1_000 + 500 * r for r in rounds}, "Experiment.rounds = 3\n")


def test_export_round_trips_exactly_and_rewrites_identical_bytes(tmp_path):
    original = record("feddst", 0, [0.1, 0.1 + 0.2, 1 / 3], 0.724358 * 2 * 20 / 1000, 7.67e12 / 200)
    original.metrics["test_loss"] = {2: 1e-300, 3: 2.5}  # a metric some rounds did not log
    paths = export_format.write([original], tmp_path / "a")
    assert sorted(p.name for p in paths) == ["feddst_s0.csv", "feddst_s0.gin", "feddst_s0.json"]
    (back,) = export_format.read(tmp_path / "a")
    assert back == original  # every float reads back to the same double
    export_format.write([back], tmp_path / "b")
    for path in paths:
        assert (tmp_path / "b" / path.name).read_bytes() == path.read_bytes()
    lines = (tmp_path / "a" / "feddst_s0.csv").read_text().splitlines()
    assert lines[0] == "round,logged_ms,cumulative_flops,cumulative_gb,local_accuracy,test_accuracy,test_loss"
    assert lines[1].endswith(",0.1,") and lines[2].endswith(",0.30000000000000004,1e-300")


def test_export_writes_no_path_of_the_machine_it_ran_on(tmp_path):
    run = record("feddst", 0, [0.1], 1, 1)
    run.info["data"] = "CIFAR-10 from /home/me/data/cifar-10-batches-py"
    run.info["params"].update({"macros/DATA_DIR": "/home/me/data", "CIFAR10.data_dir": "/home/me/data"})
    run.config = "DATA_DIR = '/home/me/data'\nCIFAR10.data_dir = %DATA_DIR\n"
    export_format.write([run], tmp_path)
    texts = {path.suffix: path.read_text() for path in tmp_path.iterdir()}
    assert not any("/home/me" in text for text in texts.values())
    assert "DATA_DIR = '<data-dir>'" in texts[".gin"]
    (back,) = export_format.read(tmp_path)
    assert back.info["data"] == "CIFAR-10 from <data-dir>/cifar-10-batches-py"
    assert back.info["params"]["CIFAR10.data_dir"] == "<data-dir>"


def test_colliding_names_get_the_run_id():
    records = export_format.unique_names([record("fedavg", 0, [0.1], 1, 1, "aaaaaaaa11"),
                                            record("fedavg", 0, [0.1], 1, 1, "bbbbbbbb22"),
                                            record("fedavg", 1, [0.1], 1, 1)])
    assert [r.name for r in records] == ["fedavg_s0_aaaaaaaa", "fedavg_s0_bbbbbbbb", "fedavg_s1"]


def test_reach_table_gives_the_hand_worked_rounds_gb_and_flops(tmp_path):
    # FedDST: seed means of test accuracy are 20 % for rounds 1-10, then 46 %. Smoothed over 10 evaluations,
    # round 10 + j reads 20 + 2.6 j %: 30.4 at round 14, 35.6 at 16, 40.8 at 18 (one round earlier is below).
    # Seed-mean GB is 0.15 per round and FLOPs 2e9 per round.
    feddst = [record("feddst", 0, [0.2] * 10 + [0.50] * 20, 0.1, 1e9),
              record("feddst", 1, [0.2] * 10 + [0.42] * 20, 0.2, 3e9)]
    pffdst = [record("pffdst", 0, [0.33] * 20, 0.05, 1e9)]  # 33 % from round 1: only 30 % is reached
    export_format.write(feddst + pffdst, tmp_path)
    groups = collect(export_format.read(tmp_path))
    assert first_reach(groups[("feddst", "4gb")], 30.0) == (14, pytest.approx(2.1), pytest.approx(2.8e10))
    assert first_reach(groups[("feddst", "4gb")], 35.0) == (16, pytest.approx(2.4), pytest.approx(3.2e10))
    assert first_reach(groups[("feddst", "4gb")], 40.0) == (18, pytest.approx(2.7), pytest.approx(3.6e10))
    assert first_reach(groups[("pffdst", "4gb")], 35.0) is None
    lines = reach_table(groups).splitlines()
    assert lines[0] == ("| method | budget | seeds | GB to 30 % (round) | FLOPs to 30 % | GB to 35 % (round) | "
                        "FLOPs to 35 % | GB to 40 % (round) | FLOPs to 40 % |")
    assert lines[2] == "| FedDST | 4 GB | 2 | 2.100 (14) | 2.8e+10 | 2.400 (16) | 3.2e+10 | 2.700 (18) | 3.6e+10 |"
    assert lines[3] == f"| PFFDST | 4 GB | 1 | 0.050 (1) | 1e+09 | {NOT_REACHED} | {NOT_REACHED} | {NOT_REACHED} | {NOT_REACHED} |"


def test_a_run_renamed_by_a_later_collision_leaves_no_stale_files(tmp_path):
    """seed 0 is exported as pffdst_s0; a second seed-0 run joins the experiment, so both get run-id suffixes.
    Exporting again must not leave pffdst_s0.* behind, and reading a directory holding one run twice fails."""
    first = record("pffdst", 0, [0.2, 0.3], 1.0, 1e9, run_id="aaaaaaaa11111111")
    export_format.write([first], tmp_path)
    stale = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = record("pffdst", 0, [0.1, 0.4], 1.0, 1e9, run_id="bbbbbbbb22222222")
    export_format.write(export_format.unique_names([first, second]), tmp_path)
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["pffdst_s0_aaaaaaaa", "pffdst_s0_bbbbbbbb"]
    assert len(export_format.read(tmp_path)) == 2
    for name, data in stale.items():  # an export from an older fl-sparse, which left the stale files
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match="run aaaaaaaa11111111 is exported twice"):
        export_format.read(tmp_path)


def test_a_variant_beside_its_base_run_keeps_its_own_row_and_budgets_make_a_plot(tmp_path):
    """--from-export DIR twice: the KnownMaskSparse variant's FedDST (same method, same preset) stays apart from
    the base run, named by its experiment; runs at two budgets give the accuracy-against-budget plot."""
    base = [record("feddst", 0, [0.2, 0.4], 1.0, 1e9), record("pffdst", 0, [0.3, 0.3], 1.0, 1e9)]
    variant = [record("feddst", 0, [0.1, 0.5], 0.9, 1e9, run_id="fedcba9876543210",
                      experiment="table1_4gb_known_mask")]
    larger = [record(algorithm, seed, [0.3, 0.45 + 0.01 * seed], 2.0, 1e9, run_id=f"{algorithm}{seed}abcdef",
                     experiment="table1_8gb", presets="table1_8gb") for algorithm in ("feddst", "pffdst")
              for seed in (0, 1)]
    for name, records in [("base", base), ("variant", variant), ("larger", larger)]:
        export_format.write(records, tmp_path / name)
    groups = collect([r for name in ("base", "variant", "larger") for r in export_format.read(tmp_path / name)])
    assert set(groups) == {("feddst", "4gb · table1_4gb"), ("feddst", "4gb · table1_4gb_known_mask"),
                           ("pffdst", "4gb"), ("feddst", "8gb"), ("pffdst", "8gb")}
    table = markdown_table(groups)
    assert "| FedDST | 4 GB · table1_4gb_known_mask | 1 | " in table and "| PFFDST | 8 GB | 2 | " in table
    assert "| 50.00 |" in table.splitlines()[3]  # the variant's best test accuracy, not averaged with the base's
    # Only PFFDST has two plain budget columns (FedDST's 4 GB runs are split by experiment), so the plot shows it.
    path = budget_plot(groups, tmp_path)
    assert path == tmp_path / "accuracy_vs_budget.png" and path.stat().st_size > 10_000
    assert budget_plot({key: runs for key, runs in groups.items() if key[1] != "8gb"}, tmp_path / "none") is None


def test_a_study_variant_without_its_base_run_is_named_by_its_group():
    """Appendix B on LeNetBN (variant bn) where the plain-LeNet FedDST never finished: its row must not carry
    the bare preset's name, which would read as the plain model."""
    variant = record("feddst", 0, [0.2, 0.3], 1.0, 1e9, presets="appendix_b_s98_lenet")
    variant.info.update(group="appendix_b_s98_lenet_bn", variant="bn")
    base = record("pffdst", 0, [0.2, 0.3], 1.0, 1e9, presets="appendix_b_s98_lenet")
    base.info.update(group="appendix_b_s98_lenet", variant="base")
    assert set(collect([variant, base])) == {("feddst", "appendix_b_s98_lenet · appendix_b_s98_lenet_bn"),
                                             ("pffdst", "appendix_b_s98_lenet")}


def test_report_from_the_export_equals_the_report_from_mlflow(tmp_path, monkeypatch, capsys):
    """Real 2-round runs on the embedded data, exported, then reported from the files alone."""
    monkeypatch.chdir(tmp_path)
    for algorithm, seed in [("fedavg", "0"), ("fedavg", "1"), ("pffdst", "0")]:
        assert main(["run", algorithm, "--rounds", "2", "--seed", seed, *FAST]) == 0
    assert main(["export", "runs"]) == 0
    assert "exported 3 finished runs" in capsys.readouterr().out
    exported = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert exported == [f"{stem}.{ext}" for stem in ("fedavg_s0", "fedavg_s1", "pffdst_s0") for ext in ("csv", "gin", "json")]
    rows = (tmp_path / "runs" / "pffdst_s0.csv").read_text().splitlines()
    assert len(rows) == 3 and {"test_accuracy", "cumulative_gb", "flops", "density", "uplink_bytes"} <= set(rows[0].split(","))
    config = (tmp_path / "runs" / "pffdst_s0.gin").read_text()
    assert "PFFDST_ROUNDS = 2" in config and "TwoStage.rounds = %PFFDST_ROUNDS" in config
    info = json.loads((tmp_path / "runs" / "pffdst_s0.json").read_text())
    assert info["status"] == "FINISHED" and info["algorithm"] == "pffdst" and info["params"]["Experiment.rounds"] == "2"

    first = {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    assert main(["export", "runs"]) == 0  # exporting again changes nothing
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()} == first

    (tmp_path / "mlflow.db").rename(tmp_path / "moved.db")  # the report below must not need the store
    assert main(["report", "from_export", "--from-export", "runs"]) == 0
    (tmp_path / "moved.db").rename(tmp_path / "mlflow.db")
    assert main(["report", "from_mlflow"]) == 0
    for name in ["table.md", "reach.md", "accuracy_vs_gb.png", "accuracy_vs_flops.png"]:
        assert (tmp_path / "from_export" / name).read_bytes() == (tmp_path / "from_mlflow" / name).read_bytes(), name
    assert "| FedAvg | - | 2 |" in (tmp_path / "from_export" / "table.md").read_text()
    assert main(["report", "low", "--from-export", "runs", "--reach", "5", "12.5"]) == 0  # e.g. a weaker model
    assert "| GB to 5 % (round) | FLOPs to 5 % | GB to 12.5 % (round) |" in (tmp_path / "low" / "reach.md").read_text()
    assert main(["report", "bad", "--from-export", "runs", "--reach", "0"]) == 2
    assert "--reach 0: give test accuracies in percent" in capsys.readouterr().err


def test_report_from_a_missing_export_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "out"), "--from-export", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
