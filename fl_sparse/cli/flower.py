"""``fl-sparse flower run|simulate``: submit a composition to Flower with ``flwr run``.

* ``fl-sparse flower run ALGO PRESETS --superlink NAME``  a deployment: the SuperLink connection ``NAME`` of
  ``$FLWR_HOME/config.toml`` (address, TLS root certificates; see docs/scale-out.md)
* ``fl-sparse flower simulate ALGO PRESETS``  Flower's simulation runtime on this machine: ``flwr run``'s
  managed local SuperLink with one virtual SuperNode per client (``--num-supernodes``)

Both check the composition here first (a bad binding fails in one line before anything is submitted),
then run ``flwr run fl_sparse/flower/app ...`` with the composition in the run config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fl_sparse.cli import flags
from fl_sparse.core.errors import ConfigError
from fl_sparse.tracking.store import check_tracking_uri, tracking_uri


def add_parser(commands) -> None:
    flower = commands.add_parser("flower", help="deploy ALGO with Flower (pip install 'fl-sparse[flower]'; "
                                                "docs/scale-out.md)")
    actions = flower.add_subparsers(dest="flower_command", required=True)
    run = actions.add_parser("run", help="submit to a SuperLink (a connection in $FLWR_HOME/config.toml)")
    simulate = actions.add_parser("simulate", help="Flower's simulation runtime here: a local SuperLink and "
                                                   "one virtual SuperNode per client")
    run.add_argument("--superlink", required=True, metavar="NAME", help="SuperLink connection name")
    simulate.add_argument("--num-supernodes", type=int, metavar="N", help="default: Experiment.num_clients")
    for parser in (run, simulate):
        parser.add_argument("algorithm")
        parser.add_argument("presets", nargs="*")
        parser.add_argument("--bind", action="append", default=[], metavar="NAME.PARAM=VALUE", help="gin binding")
        parser.add_argument("--rounds", type=int, help="total communication rounds (the ROUNDS macro)")
        parser.add_argument("--sparsity", type=float, help="target sparsity s (the SPARSITY macro)")
        parser.add_argument("--seed", type=int, help="seed of partition, model init, sampling and training")
        parser.add_argument("--data-dir", help="CIFAR directory, the same path on every host (default: embedded)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="another run config key: threads, round-timeout, node-wait, checkpoint-dir, "
                                 "checkpoint-every, metrics-file (TOML values, e.g. threads=1)")
        parser.add_argument("--stream", action="store_true", help="stream the run's logs (flwr run --stream)")
        parser.add_argument("--experiment-name", default="fl_sparse", help="MLflow experiment name")
    simulate.add_argument("--tracking-uri", help="MLflow store of the server's run (default: $MLFLOW_TRACKING_URI "
                                                 "or sqlite:///mlflow.db here)")
    simulate.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--tracking-uri", help="MLflow store of the server's run, as the SuperLink's host sees it "
                                            "(default: $MLFLOW_TRACKING_URI there, else none)")


def main(args: argparse.Namespace) -> int:
    from fl_sparse.flower import APP_DIR, require_flwr
    from fl_sparse.flower.setup import DEFAULTS, Composition

    require_flwr()
    composed = flags.compose(args)  # validates the composition before anything is submitted
    experiment = composed.experiment
    composition = Composition(composed.algorithm, composed.presets, composed.bindings)
    tracking = {"experiment-name": args.experiment_name}
    if args.flower_command == "simulate" and not args.no_tracking:  # the server runs on this machine
        check_tracking_uri(args.tracking_uri)
        tracking["tracking-uri"] = tracking_uri(args.tracking_uri)
    elif args.tracking_uri:
        tracking["tracking-uri"] = args.tracking_uri
    overrides = [f"{key}={_toml_string(value)}" for key, value in {**composition.as_run_config(), **tracking}.items()]
    for item in args.set:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or key not in DEFAULTS or key in composition.as_run_config() or key in tracking:
            keys = sorted(set(DEFAULTS) - {"algorithm", "presets", "bindings"})
            raise ConfigError(f"--set {item}: give KEY=VALUE with KEY one of {keys}")
        overrides.append(item)
    scripts = Path(sys.executable).parent  # flwr, and the flower-superlink it starts for a simulation
    command = [str(scripts / "flwr"), "run", str(APP_DIR)]
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    if args.flower_command == "run":
        command.append(args.superlink)
    else:
        supernodes = args.num_supernodes or experiment.num_clients
        if supernodes < experiment.num_clients:
            raise ConfigError(f"--num-supernodes {supernodes}: each of the {experiment.num_clients} clients needs "
                              "its own SuperNode")
        command += ["local", "--federation-config", f"num-supernodes={supernodes}"]
        # fl_sparse is installed here already; Flower would otherwise try to `uv sync` the app's dependencies.
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    command += [arg for override in overrides for arg in ("-c", override)]
    if args.stream:
        command.append("--stream")
    return subprocess.run(command, env=env).returncode


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
