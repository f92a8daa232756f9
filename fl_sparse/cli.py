"""``fl-sparse``: run an algorithm, or list the parts an algorithm can be composed of."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fl_sparse.errors import FlSparseError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-sparse", description="Sparse federated learning, composed in gin.")
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
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    run.add_argument("--experiment-name", default="fl_sparse", help="MLflow experiment name")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--budget-gb", type=float, help="stop before measured up+down traffic exceeds this many GB")
    run.add_argument("--checkpoint-every", type=int, metavar="K", help="write a checkpoint every K rounds")
    run.add_argument("--checkpoint-dir", default="checkpoints", help="where checkpoints go (default ./checkpoints)")
    run.add_argument("--resume", metavar="DIR", help="continue the run checkpointed in DIR (same command otherwise)")
    commands.add_parser("list", help="list every registered part grouped by interface")
    report = commands.add_parser("report", help="write a Markdown table and plots from the MLflow runs")
    report.add_argument("out", help="directory to write table.md and the PNG plots into")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    report.add_argument("--experiment-name", default="fl_sparse", help="MLflow experiment name")
    return parser


def _bindings(args: argparse.Namespace) -> list[str]:
    bindings = []
    if args.rounds is not None:
        bindings += [f"ROUNDS = {args.rounds}", f"PFFDST_ROUNDS = {args.rounds}"]
    if args.sparsity is not None:
        bindings.append(f"SPARSITY = {args.sparsity}")
    if args.data_dir is not None:
        bindings.append(f"DATA_DIR = {args.data_dir!r}")
    if args.device is not None:
        bindings.append(f"Experiment.device = {args.device!r}")
    if args.seed is not None:
        bindings.append(f"Experiment.seed = {args.seed}")
    if args.budget_gb is not None:
        bindings.append(f"Experiment.budget_gb = {args.budget_gb}")
    return bindings + args.bind


def _run(args: argparse.Namespace) -> int:
    import gin

    from fl_sparse import checkpoint, configs
    from fl_sparse.engine import Simulation
    from fl_sparse.experiment import Experiment
    from fl_sparse.errors import ConfigError
    from fl_sparse.tracking import MlflowTracker, ProgressBar, tracking_uri

    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: give at least 1 round")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give at least 1 thread")
        import torch

        torch.set_num_threads(args.threads)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}: give a number of rounds >= 1")
    if args.resume is not None and not os.path.isdir(args.resume):
        raise ConfigError(f"--resume {args.resume}: no such directory")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ConfigError(f"--data-dir {args.data_dir}: no such directory")
    configs.parse(args.algorithm, args.presets, _bindings(args))
    experiment = Experiment()  # validates every binding before anything is loaded or logged
    config_text = gin.config_str()
    state, run_id = None, None
    if args.resume:
        state, meta = checkpoint.read(Path(args.resume), config_text)
        run_id = meta.get("mlflow_run_id")
    simulation = Simulation(experiment)
    print(f"data: {simulation.data.source}; {experiment.num_clients} clients, "
          f"{experiment.clients_per_round} per round, device {simulation.device}", file=sys.stderr)
    if args.resume:
        state = checkpoint.apply(simulation, state, meta)
        print(f"resuming after round {state.round} from {args.resume}", file=sys.stderr)

    callbacks, tracker = [], None
    if not args.no_tracking:
        uri = tracking_uri(args.tracking_uri)
        name = os.path.splitext(os.path.basename(args.algorithm))[0]
        tracker = MlflowTracker(uri, args.experiment_name, name, run_id)
        if run_id is None:
            tracker.log_config(configs.bindings_as_params(), config_text,
                               {"algorithm": name, "presets": ",".join(args.presets), "data": simulation.data.source})
        callbacks.append(tracker)
    if args.checkpoint_every or args.resume:
        directory = Path(args.resume or args.checkpoint_dir)
        every = args.checkpoint_every or meta["checkpoint_every"]
        callbacks.append(checkpoint.Checkpointer(directory, every, simulation,
                                                 tracker.run_id if tracker else None, config_text))
    bar = ProgressBar(experiment.rounds, state.round if state else 0)
    callbacks.append(bar)
    try:
        state = simulation.run(state, callbacks=callbacks)
    except BaseException:
        bar.close()
        if tracker:
            tracker.finish(gin.operative_config_str(), status="FAILED")
        raise
    bar.close()
    if simulation.stopped_by_budget:
        print(f"stopped by the communication budget of {experiment.budget_gb} GB after round {state.round}")
    print(f"finished {state.round} rounds: {state.cumulative_bytes / 1e9:.4f} GB communicated")
    if tracker:
        tracker.finish(gin.operative_config_str())
        print(tracker.how_to_open(uri))
    return 0


def _list() -> int:
    from fl_sparse.configs import ALGORITHMS, REGISTRY, available, registered_parts

    for interface, parts in registered_parts().items():
        print(f"{interface}:")
        for part in parts:
            print(f"  {part}")
    print(f"algorithms: {', '.join(available(ALGORITHMS))}")
    print(f"presets: {', '.join(available(REGISTRY))}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fl_sparse.report import write_report
    from fl_sparse.tracking import tracking_uri

    for path in write_report(tracking_uri(args.tracking_uri), args.experiment_name, Path(args.out)):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": _run, "report": _report, "list": lambda _: _list()}[args.command](args)
    except FlSparseError as error:
        from fl_sparse.configs import first_line

        print(f"fl-sparse: error: {first_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
