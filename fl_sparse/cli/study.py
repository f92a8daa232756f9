"""``fl-sparse study run|status|report FILE``: a whole table of experiments as one command.

* ``run``     trains every trial that is not done (re-running the same command is the resume), on Ray Tune
  (``--engine ray``, the default: this machine's cores, a cluster with ``--ray-address``, fractional GPUs)
  or one after another in this process (``--engine serial``: no Ray needed)
* ``status``  done / running / pending / failed per trial, read from the output folder (starts nothing)
* ``report``  the study's tables and plots from its exports (``<output>/runs/``)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from fl_sparse.core.errors import ConfigError


def add_parser(commands) -> None:
    study = commands.add_parser("study", help="run, follow or report a study file (methods x presets x seeds x "
                                              "variants; studies/*.toml)")
    actions = study.add_subparsers(dest="study_command", required=True)
    run = actions.add_parser("run", help="train every trial not done yet; the same command resumes")
    status = actions.add_parser("status", help="done / running / pending / failed per trial (starts nothing)")
    report = actions.add_parser("report", help="tables and plots from the study's exports")
    for parser in (run, status, report):
        parser.add_argument("file", help="the study's .toml file")
        parser.add_argument("--out", metavar="DIR", help="output folder (default: <folder of FILE>/<study name>)")
    for parser in (run, status):
        parser.add_argument("--only", nargs="+", metavar="PATTERN", help="only the trials whose GROUP/NAME (e.g. "
                            "'table1_12gb/*') or key matches a pattern")
    run.add_argument("--engine", choices=["ray", "serial"], default="ray",
                     help="ray: Ray Tune, trials in parallel (pip install 'fl-sparse[study]'); serial: one after "
                          "another in this process")
    run.add_argument("--ray-address", metavar="HOST:PORT",
                     help="join this Ray cluster (default: a Ray on this machine)")
    run.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at once (default: as many "
                     "as the CPUs and GPUs allow)")
    run.add_argument("--data-dir", help="directory holding cifar-10-batches-py (default: the embedded subset)")
    run.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or "
                                            "sqlite:///<output>/.work/mlflow.db)")


def main(args: argparse.Namespace) -> int:
    from fl_sparse.studies import driver, spec
    from fl_sparse.studies.trial import work_folder

    if args.study_command == "run":
        _check_run_flags(args)
    study = spec.load(args.file)  # composes every trial: a bad file fails here, before anything is written
    out = Path(args.out or study.default_out)
    if args.study_command != "report":
        study = driver.select(study, args.only)
    if args.study_command == "status":
        return _status(driver.trial_states(study, out), out)
    if args.study_command == "report":
        from fl_sparse.studies.report import write_study_report

        for path in write_study_report(study, out):
            print(path)
        return 0
    from fl_sparse.tracking.store import check_tracking_uri, tracking_uri

    store = work_folder(out.resolve()) / "mlflow.db"
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}"
    check_tracking_uri(uri)
    final = driver.run_study(study, out, args.engine, tracking_uri(uri), args.data_dir, args.ray_address,
                             args.max_concurrent)
    counts = {state: sum(s.state == state for s in final) for state in (driver.DONE, driver.FAILED, driver.PENDING)}
    print(f"study {study.name}: {counts['done']} of {len(final)} trials done, {counts['failed']} failed, "
          f"{counts['pending']} pending; exports in {out / 'runs'}; results: fl-sparse study report {args.file}")
    return 0 if counts["done"] == len(final) else 1


def _check_run_flags(args: argparse.Namespace) -> None:
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent}: give at least 1")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ConfigError(f"--data-dir {args.data_dir}: no such directory")
    if args.engine == "serial" and (args.ray_address or args.max_concurrent):
        raise ConfigError("--ray-address and --max-concurrent apply to --engine ray only")
    if args.engine == "ray" and (importlib.util.find_spec("ray") is None
                                 or importlib.util.find_spec("ray.tune") is None):
        raise ConfigError("--engine ray needs Ray Tune: pip install 'fl-sparse[study]' (or use --engine serial)")


def _status(states, out: Path) -> int:
    width = max(len(f"{s.trial.group}/{s.trial.name}") for s in states)
    for s in states:
        label = f"{s.trial.group}/{s.trial.name}".ljust(width)
        rounds = f"{s.rounds}/{s.trial.rounds} rounds"
        print(f"{s.state:8} {label}  {s.trial.key}  {rounds:>16}  {s.detail}".rstrip())
    counts = {state: sum(s.state == state for s in states) for state in ("done", "running", "pending", "failed")}
    print(", ".join(f"{n} {state}" for state, n in counts.items()) + f" of {len(states)} trials ({out})")
    return 0
