"""``fl-sparse``: run an algorithm, list the parts an algorithm can be composed of, report, export, serve the UI.

The command line is the only layer that parses arguments, prints and chooses exit codes. Heavy layers (torch,
mlflow, flwr) are imported only by the command that needs them, after its flags are checked, so a wrong flag
fails in one line at once."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

from fl_sparse.cli import flags
from fl_sparse.cli import flower as flower_cli
from fl_sparse.cli import study as study_cli
from fl_sparse.core.errors import ConfigError, FlSparseError, first_line
from fl_sparse.tracking.store import TrackingError, check_tracking_uri, tracking_uri

CHECKPOINT_DIR = "checkpoints"


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (no usage block), exit code 2 like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="fl-sparse", description="Sparse federated learning, composed in gin.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run ALGO (a name from algorithms/ or a .gin path) with presets")
    run.add_argument("algorithm")
    run.add_argument("presets", nargs="*", help="presets from registry/ (e.g. cifar10_lenet) or .gin paths")
    run.add_argument("--bind", action="append", default=[], metavar="NAME.PARAM=VALUE", help="extra gin binding")
    run.add_argument("--rounds", type=int, help="total communication rounds (the ROUNDS macro)")
    run.add_argument("--sparsity", type=float, help="target sparsity s (the SPARSITY macro)")
    run.add_argument("--data-dir", help="directory holding cifar-10-batches-py / cifar-100-python "
                                        "(default: the embedded CIFAR-10 subset)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (auto picks CUDA if present)")
    run.add_argument("--seed", type=int, help="seed of partition, model init, sampling and training")
    run.add_argument("--threads", type=int, help="CPU threads for torch (1 is fastest on a busy 2-core machine)")
    run.add_argument("--executor", choices=sorted(flags.EXECUTORS), help="where clients train: one after another, "
                     "stacked under vmap, or in parallel Ray workers (docs/scale-out.md)")
    run.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per CPU Ray sees)")
    run.add_argument("--ray-address", metavar="HOST:PORT",
                     help="join this Ray cluster (default: start a local Ray)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    run.add_argument("--experiment-name", default="fl_sparse", help="MLflow experiment name")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--budget-gb", type=float, help="stop before measured up+down traffic exceeds this many GB")
    run.add_argument("--checkpoint-every", type=int, metavar="K", help="write a checkpoint every K rounds")
    run.add_argument("--checkpoint-dir", help="where checkpoints go (default ./checkpoints)")
    run.add_argument("--resume", metavar="DIR", help="continue the run checkpointed in DIR (same command otherwise)")
    commands.add_parser("list", help="list every registered part grouped by interface")
    report = commands.add_parser("report", help="write Markdown tables and plots from the MLflow runs or an export")
    report.add_argument("out", help="directory to write table.md, reach.md and the PNG plots into")
    report.add_argument("--from-export", action="append", metavar="DIR", help="read the runs exported into DIR by "
                        "fl-sparse export instead of MLflow (repeat to combine experiments)")
    report.add_argument("--reach", type=float, nargs="+", metavar="PCT", help="test accuracies (%%) for reach.md's "
                        "communication-to-accuracy table (default 30 35 40, for Table 1's LeNet)")
    export = commands.add_parser("export", help="write each finished MLflow run as text into OUT_DIR: per-round "
                                 "metrics (.csv), resolved config (.gin), params and tags (.json)")
    export.add_argument("out_dir", metavar="OUT_DIR", help="e.g. studies/table1/runs/table1_4gb")
    for command in (report, export):
        command.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                                    "sqlite:///mlflow.db)")
        command.add_argument("--experiment-name", default="fl_sparse", help="MLflow experiment name")
    flower_cli.add_parser(commands)  # imports flwr only when a flower command runs
    study_cli.add_parser(commands)
    ui = commands.add_parser("ui", help="serve MLflow's UI for the runs on 127.0.0.1 (pip install 'fl-sparse[server]')")
    ui.add_argument("--tracking-uri", help="the store to serve (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    ui.add_argument("--experiment-name", default="fl_sparse", help="the experiment whose URLs are printed")
    return parser


def _check_run_flags(args: argparse.Namespace) -> None:
    """Every flag of ``run``, checked before anything heavy is imported, built or written."""

    def require(condition: bool, flag: str, value, fix: str) -> None:
        if not condition:
            raise ConfigError(f"{flag} {value}: {fix}")

    def writable_directory(flag: str, path: str, must_exist: bool) -> None:
        folder = Path(path).resolve()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        require(not must_exist or existing == folder, flag, path, "no such directory")
        require(existing.is_dir(), flag, path, f"{existing} is a file, not a directory")
        require(os.access(existing, os.W_OK | os.X_OK), flag, path, f"{existing} is not writable")

    require(args.rounds is None or args.rounds >= 1, "--rounds", args.rounds, "give at least 1 round")
    require(args.sparsity is None or 0 <= args.sparsity < 1, "--sparsity", args.sparsity,  # NaN fails too
            f"the sparsity {args.sparsity} is outside [0, 1); give the fraction of weights pruned")
    require(args.seed is None or args.seed >= 0, "--seed", args.seed, "give a seed >= 0")
    require(args.threads is None or 1 <= args.threads <= (os.cpu_count() or 1), "--threads", args.threads,
            f"give 1 to {os.cpu_count()} threads (this machine's CPUs)")
    require(args.checkpoint_every is None or args.checkpoint_every >= 1, "--checkpoint-every",
            args.checkpoint_every, "give a number of rounds >= 1")
    require(args.budget_gb is None or (math.isfinite(args.budget_gb) and args.budget_gb > 0), "--budget-gb",
            args.budget_gb, "give a finite number of GB > 0")
    require(args.workers is None or args.workers >= 1, "--workers", args.workers, "give at least 1 worker")
    for flag, value in (("--workers", args.workers), ("--ray-address", args.ray_address)):
        require(value is None or args.executor in (None, "ray"), flag, value, "applies to --executor ray only")
    require(args.experiment_name.strip() != "", "--experiment-name", repr(args.experiment_name), "give a name")
    if args.data_dir is not None:
        require(os.path.isdir(args.data_dir), "--data-dir", args.data_dir, "no such directory")
    if args.resume is not None:
        writable_directory("--resume", args.resume, must_exist=True)
    if args.checkpoint_dir is not None or (args.checkpoint_every and args.resume is None):
        writable_directory("--checkpoint-dir", args.checkpoint_dir or CHECKPOINT_DIR, must_exist=False)
    if not args.no_tracking or args.tracking_uri is not None:
        check_tracking_uri(args.tracking_uri)


def _announce(start) -> None:
    """Where the data come from and, when resuming, from which round (at the start of the run)."""
    exp, server = start.composed.experiment, start.server
    print(f"data: {server.data.source}; {exp.num_clients} clients, {exp.clients_per_round} per round, "
          f"device {server.device}", file=sys.stderr)
    if start.resumed_from is not None:
        print(f"resuming after round {start.state.round} from {start.resumed_from}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    _check_run_flags(args)
    import torch

    from fl_sparse.runtime.callbacks import OnStart
    from fl_sparse.runtime.progress import ProgressBar
    from fl_sparse.runtime.runner import run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    composed = flags.compose(args)
    # The bar comes first so that it is closed before the tracker's end-of-run messages.
    callbacks, tracker = [OnStart(_announce), ProgressBar()], None
    if not args.no_tracking:
        from fl_sparse.tracking.tracker import MlflowTracker

        tracker = MlflowTracker(tracking_uri(args.tracking_uri), args.experiment_name)
        callbacks.append(tracker)
    directory = args.resume or (args.checkpoint_dir or CHECKPOINT_DIR if args.checkpoint_every else None)
    try:
        result = run(composed, callbacks, resume=args.resume, checkpoint_dir=directory,
                     checkpoint_every=args.checkpoint_every)
    except TrackingError as error:
        if directory is None:
            raise
        # rounds are checkpointed only after they are logged, so the checkpoints are consistent
        raise TrackingError(f"{error}; the checkpoints in {directory} are intact: run the same command "
                            f"with --resume {directory}") from None
    print(result.summary_line())
    if tracker:
        print(tracker.how_to_open())
    return 0


def _list() -> int:
    from fl_sparse.config.catalog import registered_parts
    from fl_sparse.config.gin_files import ALGORITHMS, REGISTRY, available

    for interface, parts in registered_parts().items():
        print(f"{interface}:")
        for part in parts:
            print(f"  {part}")
    print(f"algorithms: {', '.join(available(ALGORITHMS))}")
    print(f"presets: {', '.join(available(REGISTRY))}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fl_sparse.reporting import records
    from fl_sparse.reporting.plots import require_matplotlib
    from fl_sparse.reporting.report import write_report

    require_matplotlib()  # before the runs are read: a missing extra is one line, at once
    for value in args.reach or ():
        if not 0 < value <= 100:
            raise ConfigError(f"--reach {value:g}: give test accuracies in percent, above 0 and at most 100")
    if args.from_export:
        runs = [record for directory in args.from_export for record in records.read(Path(directory))]
    else:
        from fl_sparse.tracking.export import from_mlflow

        runs = from_mlflow(tracking_uri(args.tracking_uri), args.experiment_name)
    for path in write_report(runs, Path(args.out), *([tuple(args.reach)] if args.reach else [])):
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fl_sparse.reporting.records import write
    from fl_sparse.tracking.export import from_mlflow

    records = from_mlflow(tracking_uri(args.tracking_uri), args.experiment_name)
    write(records, Path(args.out_dir))
    print(f"exported {len(records)} finished runs of {args.experiment_name!r} to {args.out_dir}: "
          + ", ".join(record.name for record in records))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from fl_sparse.tracking.ui import serve

    def say(line: str, err: bool = False) -> None:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)

    return serve(tracking_uri(args.tracking_uri), args.port, args.experiment_name, say)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning of the library (a rejected client, a missing extra) is one line on stderr, like an error."""
    print(f"fl-sparse: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        commands = {"run": _run, "report": _report, "export": _export, "ui": _ui, "list": lambda _: _list(),
                    "flower": flower_cli.main, "study": study_cli.main}
        return commands[args.command](args)
    except FlSparseError as error:
        print(f"fl-sparse: error: {first_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
