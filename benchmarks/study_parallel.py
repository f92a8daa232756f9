"""Parallel trials against trials one after another: the same study of 4 FedDST trials (full CIFAR-10,
``cifar10_lenet``, 20 rounds each, seeds 0-3), timed two ways in one run of this script:

* ``parallel``: ``fl-sparse study run --engine ray`` with 1 thread per trial, so Ray runs as many trials at
  once as the host has cores (``--concurrent``, default: all of them);
* ``sequential``: ``fl-sparse study run --engine serial`` with ``--threads`` threads per trial (default: the
  host's cores), one trial after another.

Each timing is the wall time of the whole command (start-up, data loading and MLflow included), from a fresh
output folder. Prints one line per way and their ratio; ``--json`` writes them to a file. Usage::

    python benchmarks/study_parallel.py --data-dir DATA_DIR [--rounds 20] [--trials 4]

Pause other CPU work while it runs (e.g. ``kill -STOP`` a background study's trial processes, then ``-CONT``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = """
[study]
name = "bench"
threads = {threads}
gpus = {gpus}
checkpoint_every = 1000
max_failures = 0
[[grid]]
algorithms = ["{algorithm}"]
presets = ["cifar10_lenet"]
seeds = {seeds}
bind = ["Experiment.rounds = {rounds}", "Experiment.eval_every = {rounds}"]
"""


def timed_study(folder: Path, engine: str, threads: int, args, extra: list[str]) -> float:
    study = folder / f"{engine}.toml"
    study.write_text(STUDY.format(threads=threads, gpus=args.gpus, algorithm=args.algorithm,
                                  seeds=list(range(args.trials)), rounds=args.rounds))
    command = [sys.executable, "-m", "fl_sparse.cli", "study", "run", str(study), "--engine", engine,
               "--data-dir", args.data_dir, "--out", str(folder / engine), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{engine} study failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="directory holding cifar-10-batches-py")
    parser.add_argument("--algorithm", default="feddst")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per trial, sequential way")
    parser.add_argument("--concurrent", type=int, default=os.cpu_count(), help="trials at once, parallel way")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per trial (0.25: four trials share one)")
    parser.add_argument("--only", choices=["parallel", "sequential"], help="time one way only")
    parser.add_argument("--json", help="also write the timings to this file")
    args = parser.parse_args()
    results = {"host": platform.processor() or platform.machine(), "cpus": os.cpu_count(), **vars(args)}
    with tempfile.TemporaryDirectory() as folder:
        if args.only in (None, "parallel"):
            results["parallel_s"] = timed_study(Path(folder), "ray", 1, args,
                                                ["--max-concurrent", str(args.concurrent)])
            print(f"parallel: {args.trials} trials, {args.concurrent} at once x 1 thread: "
                  f"{results['parallel_s']:.1f} s", flush=True)
        if args.only in (None, "sequential"):
            results["sequential_s"] = timed_study(Path(folder), "serial", args.threads, args, [])
            print(f"sequential: {args.trials} trials one after another x {args.threads} threads: "
                  f"{results['sequential_s']:.1f} s", flush=True)
    if "parallel_s" in results and "sequential_s" in results:
        results["ratio"] = results["parallel_s"] / results["sequential_s"]
        print(f"parallel / sequential = {results['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
