"""Studies (fl_sparse.studies, `fl-sparse study`): the file format and its one-line errors, identity by
composition, both engines, resume after a SIGKILL of the driver, retries, locks and the MLflow parent run."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_sparse.cli.main import main
from fl_sparse.studies import driver, spec, trial
from fl_sparse.studies.trial import StudyContext, trial_lock

TINY_BIND = '"Experiment.num_clients = 10", "Experiment.clients_per_round = 3", "Experiment.local_epochs = 1"'


def tiny(folder: Path, rounds: int = 2, seeds: str = "[0, 1]", extra: str = "") -> Path:
    """The issue's tiny study: 2 algorithms x 2 seeds x 2 rounds on the embedded data."""
    path = folder / "tiny.toml"
    path.write_text(f"""
[study]
name = "tiny"
threads = 1
gpus = 0
checkpoint_every = 1
[variants.known_mask]
bind = ["Experiment.uplink_codec = @KnownMaskSparse()"]
[[grid]]
algorithms = ["fedavg", "feddst"]
presets = ["demo"]
seeds = {seeds}
variants = ["base"]
bind = ["Experiment.rounds = {rounds}", {TINY_BIND}]
{extra}""")
    return path


def metrics(csv_path: Path) -> list[list[str]]:
    """A trial's exported metrics, without the columns that record wall-clock time."""
    rows = list(csv.reader(io.StringIO(csv_path.read_text())))
    keep = [i for i, name in enumerate(rows[0]) if name not in ("logged_ms", "round_seconds")]
    return [[row[i] for i in keep] for row in rows]


def exported(out: Path) -> dict[str, list[list[str]]]:
    return {str(path.relative_to(out)): metrics(path) for path in sorted((out / "runs").rglob("*.csv"))}


def test_the_tiny_study_expands_and_keys_trials_by_their_composition(tmp_path):
    study = spec.load(tiny(tmp_path))
    assert [(t.group, t.name) for t in study.trials] == [("demo", "fedavg_s0"), ("demo", "fedavg_s1"),
                                                          ("demo", "feddst_s0"), ("demo", "feddst_s1")]
    assert all(t.rounds == 2 for t in study.trials)  # Experiment.rounds = 2 moves feddst's schedule too
    assert len({t.key for t in study.trials}) == 4
    again = spec.load(tiny(tmp_path))
    assert [t.key for t in again.trials] == [t.key for t in study.trials]


def test_a_grid_edit_adds_trials_and_keeps_the_finished_ones(tmp_path):
    out = tmp_path / "out"
    assert main(["study", "run", str(tiny(tmp_path, seeds="[0]")), "--engine", "serial", "--out", str(out)]) == 0
    before = exported(out)
    study = spec.load(tiny(tmp_path, seeds="[0, 1]", extra="""
[[grid]]
algorithms = ["fedavg"]
presets = ["demo"]
seeds = [0]
variants = ["known_mask"]
bind = ["Experiment.rounds = 2", "Experiment.num_clients = 10", "Experiment.clients_per_round = 3",
        "Experiment.local_epochs = 1"]
"""))
    states = {(s.trial.group, s.trial.name): s.state for s in driver.trial_states(study, out)}
    assert states == {("demo", "fedavg_s0"): "done", ("demo", "feddst_s0"): "done", ("demo", "fedavg_s1"): "pending",
                      ("demo", "feddst_s1"): "pending", ("demo_known_mask", "fedavg_s0"): "pending"}
    assert main(["study", "run", str(study.path), "--engine", "serial", "--out", str(out)]) == 0
    after = exported(out)
    assert {k: after[k] for k in before} == before and len(after) == 5


BAD = {
    "typo in [study]": ("[study]\nname = 't'\nthread = 1\n", "[study], key 'thread': unknown key"),
    "unknown algorithm": ("[study]\nname = 't'\n[[grid]]\nalgorithms = ['fedavgx']\npresets = ['demo']\nseeds = [0]\n",
                          "[[grid]] 1, key 'algorithms'"),
    "unknown preset": ("[study]\nname = 't'\n[[grid]]\nalgorithms = ['fedavg']\npresets = ['dem']\nseeds = [0]\n",
                       "[[grid]] 1, key 'presets'"),
    "malformed binding": ("[study]\nname = 't'\n[[grid]]\nalgorithms = ['fedavg']\npresets = ['demo']\nseeds = [0]\n"
                          "bind = ['Experiment.rounds = ']\n", "[[grid]] 1, key 'bind'"),
    "typo in a block": ("[study]\nname = 't'\n[[grid]]\nalgorithm = ['fedavg']\npresets = ['demo']\nseeds = [0]\n",
                        "[[grid]] 1, key 'algorithm': unknown key"),
    "unknown variant": ("[study]\nname = 't'\n[[grid]]\nalgorithms = ['fedavg']\npresets = ['demo']\nseeds = [0]\n"
                        "variants = ['kms']\n", "[[grid]] 1, key 'variants': unknown variant 'kms'"),
    "not TOML": ("[study\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_study_file_exits_2_in_one_line_and_writes_nothing(case, tmp_path, capsys):
    text, expected = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "out"
    assert main(["study", "run", str(path), "--engine", "serial", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and expected in err[0], err
    assert not out.exists()


def test_a_trial_that_fails_is_retried_from_its_checkpoint_then_reported_in_one_line(tmp_path, monkeypatch, capsys):
    real, calls = trial._train, []

    def flaky(t, context, folder, on_round):
        calls.append(t.name)
        if t.name == "fedavg_s0" and calls.count("fedavg_s0") == 1:
            raise RuntimeError("worker lost")
        if t.name == "feddst_s1":
            raise RuntimeError("always broken")
        return real(t, context, folder, on_round)

    monkeypatch.setattr(trial, "_train", flaky)
    out = tmp_path / "out"
    assert main(["study", "run", str(tiny(tmp_path)), "--engine", "serial", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "fedavg_s0 [" in text and "attempt 1 failed (RuntimeError: worker lost); retrying" in text
    assert [line for line in text.splitlines() if "FAILED" in line] == [
        line for line in text.splitlines() if "demo/feddst_s1" in line and "FAILED: RuntimeError: always broken" in line]
    states = {s.trial.name: s.state for s in driver.trial_states(spec.load(tmp_path / "tiny.toml"), out)}
    assert states == {"fedavg_s0": "done", "fedavg_s1": "done", "feddst_s0": "done", "feddst_s1": "failed"}


def test_the_lock_keeps_a_second_process_off_a_trial(tmp_path):
    folder = tmp_path / "trial"
    with trial_lock(folder):
        holder = subprocess.run([sys.executable, "-c", f"""
from pathlib import Path
from fl_sparse.studies.trial import TrialBusy, is_locked, trial_lock
assert is_locked(Path({str(folder)!r}))
try:
    with trial_lock(Path({str(folder)!r}), wait_s=0.2):
        print("entered")
except TrialBusy as error:
    print("busy:", error)
"""], capture_output=True, text=True, timeout=60)
        assert holder.stdout.startswith("busy: trial trial is being trained by another process"), holder.stderr
    assert not trial.is_locked(folder)
    with trial_lock(folder, wait_s=0):  # free again once its holder left
        pass


def _study_command(path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fl_sparse.cli", "study", "run", str(path), "--engine", "serial", "--out", str(out)]


def test_sigkill_of_the_driver_then_the_same_command_resumes_bit_for_bit(tmp_path):
    path = tiny(tmp_path, rounds=6, seeds="[0]")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_study_command(path, whole), check=True, env=env, capture_output=True, timeout=600)

    cut = tmp_path / "cut"
    driver_process = subprocess.Popen(_study_command(path, cut), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
    trials = cut / ".work" / "trials"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once one trial is done and the other is between checkpoints
        done = list(trials.glob("*/done.json"))
        started = [c for c in trials.glob("*/checkpoints/round-000002") if not (c.parent.parent / "done.json").exists()]
        if done and started:
            break
        time.sleep(0.05)
    else:
        driver_process.kill()
        pytest.fail("the study never reached a trial between checkpoints")
    driver_process.send_signal(signal.SIGKILL)
    driver_process.wait()
    status = subprocess.run([sys.executable, "-m", "fl_sparse.cli", "study", "status", str(path), "--out", str(cut)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert "1 done" in status.stdout and "1 pending" in status.stdout, status.stdout
    rerun = subprocess.run(_study_command(path, cut), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert exported(cut) == exported(whole)  # every metric of every round, bit for bit


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the study extra (Ray Tune)")
def test_both_engines_give_the_same_metrics_and_two_trials_share_one_store(tmp_path):
    """Ray runs two trials at once into one sqlite store: every round of every metric must arrive."""
    import mlflow

    path = tiny(tmp_path)
    serial, ray_out = tmp_path / "serial", tmp_path / "ray"
    store = f"sqlite:///{ray_out / '.work' / 'mlflow.db'}"  # explicit: the serial run's tracker set the env var
    assert main(["study", "run", str(path), "--engine", "serial", "--out", str(serial)]) == 0
    assert main(["study", "run", str(path), "--engine", "ray", "--out", str(ray_out), "--max-concurrent", "2",
                 "--tracking-uri", store]) == 0
    # Equal to the serial study's exports, which had the store to themselves: no metric of any round was lost.
    assert exported(ray_out) == exported(serial)
    for table in exported(ray_out).values():
        assert [row[0] for row in table[1:]] == ["1", "2"]
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "fl_sparse.study" in r.data.tags]
    children = [r for r in runs if "fl_sparse.study" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert {r.data.tags["trial_key"] for r in children} == {t.key for t in spec.load(path).trials}


def test_status_reads_the_output_folder_only(tmp_path, capsys):
    path = tiny(tmp_path)
    assert main(["study", "status", str(path), "--out", str(tmp_path / "none")]) == 0
    assert "0 done, 0 running, 4 pending, 0 failed of 4 trials" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()
    context = StudyContext("tiny", str(tmp_path / "none"), "", None, 1, 0, 1)
    assert context.folder(spec.load(path).trials[0]).parent.name == "trials"


def test_a_report_reads_a_baseline_from_another_study_without_running_it(tmp_path, capsys):
    """`runs = ["STUDY/GROUP"]`: FedDST run once by one study is the baseline of another study's report."""
    from fl_sparse.reporting import records
    from tests.test_results_export import record

    path = tiny(tmp_path, extra='[reports.with_baseline]\nruns = ["demo", "baselines/demo"]\n'
                                'algorithms = ["fedavg", "feddst"]\n')
    records.write([record("fedavg", 0, [0.2, 0.3], 0.01, 1e9)], tmp_path / "tiny" / "runs" / "demo")
    records.write([record("feddst", 0, [0.25, 0.35], 0.005, 5e8), record("random_mask", 0, [0.1, 0.2], 0.005, 5e8)],
                  tmp_path / "baselines" / "runs" / "demo")
    assert main(["study", "report", str(path)]) == 0
    table = (tmp_path / "tiny" / "with_baseline" / "table.md").read_text()
    assert "| FedAvg |" in table and "| FedDST |" in table and "RandomMask" not in table
    bad = tiny(tmp_path, extra='[reports.x]\nruns = ["a/b/c"]\n')
    assert main(["study", "status", str(bad)]) == 2
    assert "[reports.x], key 'runs': 'a/b/c': give GROUP, or STUDY/GROUP" in capsys.readouterr().err
