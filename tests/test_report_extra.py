"""`fl-sparse report` without the `report` extra: one line naming the extra, exit 2, nothing read or written."""

import subprocess
import sys

# matplotlib made unimportable the way a missing package is: `import matplotlib` raises ImportError.
WITHOUT_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = None; from fl_sparse.cli.main import main; "
                      "sys.exit(main(sys.argv[1:]))")


def test_report_without_matplotlib_names_the_report_extra(tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, "report", "out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "fl-sparse: error: fl-sparse report draws its plots with matplotlib, which is not installed: "
        "pip install 'fl-sparse[report]'"], done.stderr
    assert list(tmp_path.iterdir()) == []  # no out/ directory, and no mlflow.db opened into existence


def test_report_extra_carries_matplotlib():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("matplotlib") for req in project["optional-dependencies"]["report"])
    assert not any(req.startswith("matplotlib") for req in project["dependencies"])


def test_the_turnover_table_gives_the_hand_worked_means_and_skips_runs_without_the_metric(tmp_path):
    from fl_sparse.reporting.report import write_report
    from tests.test_results_export import record

    runs = [record("sparsyfed", seed, [0.1] * 11, 0.1, 1e9) for seed in (0, 1)]
    for run, regrown in zip(runs, ([9, 4, 0, 0, 0, 0, 0, 0, 0, 0, 2], [9, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0])):
        run.metrics["weights_regrown"] = dict(zip(range(1, 12), map(float, regrown)))
        run.metrics["weights_dropped"] = dict(zip(range(1, 12), map(float, regrown)))
    older = record("feddst", 0, [0.1] * 11, 0.1, 1e9)  # logged before the metric existed: no row
    paths = write_report([*runs, older], tmp_path)
    assert tmp_path / "turnover.png" in paths
    table = (tmp_path / "turnover.md").read_text().splitlines()
    # Rounds 2-11 (round 1 prunes the dense start): seed means 3, 1, 0 x 7, 1 -> 0.5 per round; 3 of 10 rounds
    # changed; the first tenth is round 2 (3.0) and the last round 11 (1.0).
    assert table[2] == "| SparsyFed | 4gb | 2 | 0.5 | 0.5 | 30 % of 10 | 3.0 | 1.0 |"
    assert len(table) == 5 and "FedDST" not in "\n".join(table)
