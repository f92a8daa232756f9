"""``fl-sparse flower run|simulate|partition``: run a composition with Flower, or split its data per node.

* ``fl-sparse flower run ALGO PRESETS --superlink NAME``  submit to a deployment: the SuperLink connection
  ``NAME`` of ``$FLWR_HOME/config.toml`` (address, TLS root certificates; see docs/scale-out.md)
* ``fl-sparse flower simulate ALGO PRESETS``  run it like ``fl-sparse run``, on Flower's simulation runtime: a
  SuperLink of its own (:mod:`fl_sparse.flower.local`), one virtual SuperNode per client; it streams the run,
  shows the progress bar and prints the summary line, and stops every Flower process when the run ends
* ``fl-sparse flower partition PRESETS --out DIR``  one folder per client's data, for SuperNodes started with
  ``--node-config "data-path='DIR/partition-K'"`` (:mod:`fl_sparse.flower.partitions`)
* ``fl-sparse flower node-worker --socket PATH``  the long-lived process beside a SuperNode started with
  ``--node-config "worker-socket='PATH'"``: it trains, the per-message ClientApp only relays
  (:mod:`fl_sparse.flower.nodeworker`)

Each checks the composition here first (a bad binding fails in one line before anything starts).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fl_sparse.cli import flags
from fl_sparse.core.errors import ConfigError, FlSparseError
from fl_sparse.tracking.store import check_tracking_uri, tracking_uri

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


def add_parser(commands) -> None:
    flower = commands.add_parser("flower", help="deploy ALGO with Flower (pip install 'fl-sparse[flower]'; "
                                                "docs/scale-out.md)")
    actions = flower.add_subparsers(dest="flower_command", required=True)
    run = actions.add_parser("run", help="submit to a SuperLink (a connection in $FLWR_HOME/config.toml)")
    simulate = actions.add_parser("simulate", help="run it like fl-sparse run, on Flower's simulation runtime: "
                                                   "one virtual SuperNode per client in Ray actors")
    run.add_argument("--superlink", required=True, metavar="NAME", help="SuperLink connection name")
    simulate.add_argument("--num-supernodes", type=int, metavar="N", help="default: Experiment.num_clients")
    # dest: not `workers`, which fl-sparse run's flags bind to RayExecutor.num_workers (flags.FLAG_BINDINGS)
    simulate.add_argument("--workers", dest="actors", type=int, default=1, metavar="W",
                          help="Ray actors that run ClientApps (default 1)")
    simulate.add_argument("--threads", type=int, default=1, metavar="T", help="CPUs and torch threads of each actor "
                                                                              "and of the server (default 1)")
    for parser in (run, simulate):
        parser.add_argument("algorithm")
        parser.add_argument("presets", nargs="*")
        parser.add_argument("--rounds", type=int, help="total communication rounds (the ROUNDS macro)")
        parser.add_argument("--sparsity", type=float, help="target sparsity s (the SPARSITY macro)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="another run config key: threads (run only), round-timeout, node-wait, "
                                 "checkpoint-dir, checkpoint-every, metrics-file (TOML values, e.g. threads=1)")
        parser.add_argument("--experiment-name", default="fl_sparse", help="MLflow experiment name")
    run.add_argument("--stream", action="store_true", help="stream the run's logs and progress bar "
                                                           "(flwr run --stream)")
    simulate.add_argument("--tracking-uri", help="MLflow store of the server's run (default: $MLFLOW_TRACKING_URI "
                                                 "or sqlite:///mlflow.db here)")
    simulate.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--tracking-uri", help="MLflow store of the server's run, as the SuperLink's host sees it "
                                            "(default: $MLFLOW_TRACKING_URI there, else none)")
    partition = actions.add_parser("partition", help="write each client's training data into its own folder, for "
                                                     "SuperNodes that hold only theirs (--node-config data-path)")
    partition.add_argument("presets", nargs="+", help="the run's presets: they decide the split")
    partition.add_argument("--out", required=True, help="a new directory; gets partition-0000, partition-0001, ...")
    worker = actions.add_parser("node-worker", help="train this SuperNode's client in one long-lived process; "
                                                    "start the SuperNode with --node-config \"worker-socket='PATH'\"")
    worker.add_argument("--socket", required=True, metavar="PATH",
                        help="the Unix socket to listen on; its directory is created private (mode 0700)")
    for parser in (run, simulate, partition):
        parser.add_argument("--bind", action="append", default=[], metavar="NAME.PARAM=VALUE", help="gin binding")
        parser.add_argument("--seed", type=int, help="seed of partition, model init, sampling and training")
        parser.add_argument("--data-dir", help="CIFAR directory (default: embedded); for run, the same path on every "
                                               "host that splits the whole data set")


def main(args: argparse.Namespace) -> int:
    from fl_sparse.flower import require_flwr

    require_flwr()
    if args.flower_command == "partition":
        return _partition(args)
    if args.flower_command == "node-worker":
        return _node_worker(args)
    composed = flags.compose(args)  # validates the composition before anything is submitted
    from fl_sparse.flower.setup import Composition, check_runs_on_flower

    check_runs_on_flower(composed.algorithm, composed.experiment)

    composition = Composition(composed.algorithm, composed.presets, composed.bindings)
    config = {**composition.as_run_config(), "experiment-name": args.experiment_name}
    if args.flower_command == "run":
        if args.tracking_uri:
            config["tracking-uri"] = args.tracking_uri
        if args.stream:
            config["progress"] = True
        scripts = Path(sys.executable).parent  # flwr, and the flower-superlink it starts for a `:local:` connection
        env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
        return subprocess.run([str(scripts / "flwr"), *_run_args(args.superlink, config, args.set, args.stream)],
                              env=env).returncode
    return _simulate(args, composed.experiment, config)


def _simulate(args: argparse.Namespace, experiment, config: dict) -> int:
    from fl_sparse.flower.local import CONNECTION, LocalFlower

    supernodes = args.num_supernodes or experiment.num_clients
    if supernodes < experiment.num_clients:
        raise ConfigError(f"--num-supernodes {supernodes}: each of the {experiment.num_clients} clients needs "
                          "its own SuperNode")
    for flag, value in (("--workers", args.actors), ("--threads", args.threads)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: give at least 1")
    env = {}
    if args.no_tracking:  # not even to the store that MLFLOW_TRACKING_URI names
        env["MLFLOW_TRACKING_URI"] = ""
    else:  # the server runs on this machine: it logs where fl-sparse run would
        check_tracking_uri(args.tracking_uri)
        config["tracking-uri"] = tracking_uri(args.tracking_uri)
    config.update({"threads": args.threads, "progress": True})
    # One actor per worker, each with --threads CPUs (and torch threads); Ray gets exactly workers x threads CPUs.
    # Ray's actor output (ClientApp logs) stays out of the stream: a failed client shows as a rejection line.
    federation = (f"num-supernodes={supernodes} client-resources-num-cpus={args.threads} "
                  f"init-args-num-cpus={args.actors * args.threads} init-args-log-to-driver=false")
    try:
        with LocalFlower(env) as flower:
            summary = Path(flower.folder.name) / "summary.txt"
            flower.flwr(*_run_args(CONNECTION, {**config, "summary-file": str(summary)}, args.set, stream=True),
                        "--federation-config", federation)
            run = flower.last_run()
            if run["status"] != "finished:completed" or not summary.is_file():
                raise FlSparseError(f"the Flower run ended {run['status']}: {run['status-details']}")
            print(summary.read_text(), end="")
        return 0
    except KeyboardInterrupt:
        print("fl-sparse: interrupted; the Flower run and its SuperLink are stopped", file=sys.stderr)
        return INTERRUPTED


def _run_args(superlink: str, config: dict, settings: list[str], stream: bool) -> list[str]:
    """``flwr run``'s arguments that submit the app with ``config`` and the ``--set KEY=VALUE`` settings."""
    from fl_sparse.flower import APP_DIR
    from fl_sparse.flower.setup import DEFAULTS, toml_value

    overrides = [f"{key}={toml_value(value)}" for key, value in config.items()]
    for item in settings:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key not in DEFAULTS or key in config:
            keys = sorted(set(DEFAULTS) - set(config) - {"progress", "summary-file"})
            raise ConfigError(f"--set {item}: give KEY=VALUE with KEY one of {keys}")
        overrides.append(item)
    command = ["run", str(APP_DIR), superlink, *[arg for override in overrides for arg in ("-c", override)]]
    return command + (["--stream"] if stream else [])


def _partition(args: argparse.Namespace) -> int:
    from fl_sparse.config.compose import compose
    from fl_sparse.flower.partitions import write_partitions

    # The split depends on the presets and bindings alone (data set, clients, alpha, seed, partitioner); the
    # algorithm is only needed to compose, and the node checks its run's split against the folder's.
    composed = compose("fedavg", args.presets, flags.bindings(args))
    experiment = composed.experiment
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ConfigError(f"--data-dir {args.data_dir}: no such directory")
    data = experiment.load_data()
    folders = write_partitions(experiment, data, {"presets": list(composed.presets),
                                                  "bindings": list(composed.bindings)}, Path(args.out))
    sizes = [len(indices) for indices in data.client_train]
    print(f"wrote {len(folders)} partitions of {data.source} ({min(sizes)} to {max(sizes)} training samples each) "
          f"to {args.out}: start SuperNode K with --node-config \"data-path='{Path(args.out).resolve()}/"
          f"partition-K'\" (K with 4 digits, e.g. partition-0003)")
    return 0


def _node_worker(args: argparse.Namespace) -> int:
    import logging

    from fl_sparse.flower.nodeworker import serve

    # one line per message (where its time went) and every refusal, on stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    def announce(path: Path) -> None:
        print(f"fl-sparse: node worker listening on {path}; start the SuperNode with --node-config "
              f"\"worker-socket='{path.resolve()}'\"", flush=True)

    serve(Path(args.socket), announce)
    return 0
