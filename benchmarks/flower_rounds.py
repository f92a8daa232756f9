"""Steady-state Flower rounds against in-process ones (issue 27): what a round costs with Flower in between.

Every setup is timed as its server sees it: ``round_seconds`` (from the round's first downlink encode to its close,
the same metric in-process and in the ServerApp, evaluation excluded) for each round; round 1 carries the
start-up (Ray, ClientApp processes, builds) and is shown apart, with ``start-up`` = the command's wall time minus
its rounds (imports, data loading, evaluations, Flower's start). Each setup runs in processes of its own:

* ``inprocess``   the run path of ``fl-sparse run`` (``fl_sparse.run``, ``Sequential``) with 1 torch thread
* ``simulate``    ``fl-sparse flower simulate --workers 1 --threads 1``: one Ray actor of 1 CPU and a server with 1
                  thread, the in-process CPU budget
* ``inprocess-N`` and ``deployment-N``: the same composition with ``Experiment.num_clients = clients_per_round =
                  N`` (one SuperNode per client), in process and as a loopback deployment
                  (:class:`fl_sparse.flower.local.LocalFlower`): a SuperLink, N SuperNodes each holding only its
                  partition folder (``data-path``) and training in a node worker (``worker-socket``), 127.0.0.1

For the deployment it also prints where a round's time goes: the node workers' own per-message seconds (decode,
train, encode; from their logs), the cost of starting the relay's process (``python -c 'import
fl_sparse.flower.clientapp'``, timed here; Flower starts one per message) and the rest (Flower's polls and
transfer: the SuperNode's 3 s idle pull and 0.5 s reply poll, the SuperExec's poll, the server's 0.1 s pull).

``--repeats K`` runs the setups K times, interleaved (the machine's load drifts), and reports medians.

    .venv/bin/python benchmarks/flower_rounds.py --data-dir DATA_DIR --rounds 4
    .venv/bin/python benchmarks/flower_rounds.py --data-dir DATA_DIR --only deployment --nodes 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("inprocess", "simulate", "deployment")
WORKER_LINE = re.compile(r"node worker: run \d+ round (\d+) client (\d+): build ([\d.]+) s decode ([\d.]+) s "
                         r"train ([\d.]+) s encode ([\d.]+) s")
IN_PROCESS = """
import json, sys, time, torch
import fl_sparse as fls
torch.set_num_threads(1)
algorithm, preset, bindings, rounds = json.loads(sys.argv[1])
rows = []
fls.run(fls.build(algorithm, [preset], bindings, rounds=rounds),
        [fls.OnRound(lambda event: rows.append({"round": event.round, **event.metrics}))])
print(json.dumps(rows))
"""


def extra_env() -> dict:
    """What every process of a setup gets on top of this one's environment: this source tree, no network, no
    MLflow."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": ""}


def env() -> dict:
    return {**os.environ, **extra_env()}


def summary(rows: list[dict], wall: float) -> dict:
    seconds = [row["round_seconds"] for row in rows]
    return {"rounds_s": seconds, "round1_s": seconds[0], "steady_s": statistics.median(seconds[1:]),
            "startup_s": wall - sum(seconds), "wall_s": wall}


def in_process(args, bindings: list[str]) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", IN_PROCESS, json.dumps([args.algorithm, args.preset, bindings,
                                                                         args.rounds])],
                          capture_output=True, text=True, env=env(), check=True)
    return summary(json.loads(done.stdout.strip().splitlines()[-1]), time.monotonic() - started)


def simulate(args, bindings: list[str], folder: Path) -> dict:
    metrics = folder / f"simulate-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, "-m", "fl_sparse.cli", "flower", "simulate", args.algorithm, args.preset, "--rounds",
               str(args.rounds), "--workers", "1", "--threads", "1", "--no-tracking", "--set",
               f'metrics-file="{metrics}"', *[arg for binding in bindings for arg in ("--bind", binding)]]
    started = time.monotonic()
    subprocess.run(command, env=env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return summary([json.loads(line) for line in metrics.read_text().splitlines()], time.monotonic() - started)


def deployment(args, bindings: list[str], folder: Path) -> dict:
    from fl_sparse.config.compose import compose
    from fl_sparse.flower import APP_DIR, setup
    from fl_sparse.flower.local import LocalFlower
    from fl_sparse.flower.partitions import folder_name, write_partitions

    partitions = folder / "partitions"
    if not partitions.exists():
        experiment = compose(args.algorithm, [args.preset], bindings, rounds=args.rounds).experiment
        write_partitions(experiment, experiment.load_data(), {}, partitions)
    sockets = [str(folder / f"workers-{time.monotonic_ns()}" / f"node{k}.sock") for k in range(args.nodes)]
    nodes = [f"data-path='{partitions / folder_name(k)}' worker-socket='{sockets[k]}'" for k in range(args.nodes)]
    metrics = folder / f"deployment-{time.monotonic_ns()}.jsonl"
    composition = setup.Composition(args.algorithm, (args.preset,), (*bindings, f"ROUNDS = {args.rounds}"))
    config = {**composition.as_run_config(), "threads": 1, "metrics-file": str(metrics), "node-wait": 600.0}
    with LocalFlower(extra_env(), supernodes=nodes, workers=sockets) as flower:
        started = time.monotonic()  # the run's wall time; the processes' start is not part of a round
        status = flower.run_to_end(APP_DIR, config, timeout=3600)
        wall = time.monotonic() - started
        if status["status"] != "finished:completed":
            raise SystemExit(f"the deployment run ended {status['status']}: {status['status-details']}")
        messages = [match.groups() for k in range(args.nodes)
                    for match in WORKER_LINE.finditer(flower.log(f"worker{k}").read_text())]
    result = summary([json.loads(line) for line in metrics.read_text().splitlines()], wall)
    per_round = {}
    for number, _, *seconds in messages:
        per_round.setdefault(int(number), []).append([float(value) for value in seconds])
    # a round waits for its slowest client: that client's own seconds, and what Flower adds on top
    slowest = {r: max(rows, key=sum) for r, rows in per_round.items()}
    result["worker_slowest_s"] = {r: dict(zip(("build", "decode", "train", "encode"), row)) for r, row in
                                  sorted(slowest.items())}
    result["flower_overhead_s"] = [round(s - sum(slowest[r + 1]), 2) for r, s in enumerate(result["rounds_s"])]
    return result


def relay_start_s(repeats: int = 3) -> float:
    """Seconds to start a Python process that imports the ClientApp: what Flower pays per message for the relay."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import fl_sparse.flower.clientapp"], env=env(), check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="directory holding cifar-10-batches-py")
    parser.add_argument("--algorithm", default="feddst")
    parser.add_argument("--preset", default="cifar10_lenet")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (= clients) of the deployment")
    parser.add_argument("--deployment-bind", action="append", default=["Experiment.local_epochs = 1"],
                        help="more bindings of the deployment and its in-process twin (default: 1 local epoch)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=SETUPS, action="append", help="time these setups only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    data = [f"DATA_DIR = {args.data_dir!r}"]
    federation = [f"Experiment.num_clients = {args.nodes}", f"Experiment.clients_per_round = {args.nodes}",
                  *args.deployment_bind]
    only = args.only or SETUPS
    results: dict[str, list] = {}
    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="flower-rounds-") as folder:
        for repeat in range(args.repeats):
            for name in only:
                if name == "deployment":
                    runs = {f"inprocess-{args.nodes}": lambda: in_process(args, data + federation),
                            f"deployment-{args.nodes}": lambda: deployment(args, data + federation, Path(folder))}
                elif name == "simulate":
                    runs = {"simulate": lambda: simulate(args, data, Path(folder))}
                else:
                    runs = {"inprocess": lambda: in_process(args, data)}
                for label, measure in runs.items():
                    result = {**measure(), "load": os.getloadavg()[0]}
                    results.setdefault(label, []).append(result)
                    rounds = [round(seconds, 2) for seconds in result["rounds_s"]]
                    print(f"[{repeat + 1}/{args.repeats}] {label}: rounds {rounds} s, start-up "
                          f"{result['startup_s']:.1f} s, load {result['load']:.1f}"
                          + (f", Flower overhead per round {result['flower_overhead_s']} s, slowest client "
                             f"{result['worker_slowest_s']}" if "flower_overhead_s" in result else ""), flush=True)
    results["relay_start_s"] = relay_start_s()
    print(f"\nrelay process start (python -c 'import fl_sparse.flower.clientapp'): {results['relay_start_s']:.2f} s")
    print(f"{'setup':<16}{'round 1 s':>10}{'steady s':>10}{'start-up s':>12}")
    for label, runs in results.items():
        if isinstance(runs, list):
            print(f"{label:<16}{statistics.median(r['round1_s'] for r in runs):>10.2f}"
                  f"{statistics.median(r['steady_s'] for r in runs):>10.2f}"
                  f"{statistics.median(r['startup_s'] for r in runs):>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
