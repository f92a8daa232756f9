"""Time federated rounds with the Sequential, Vectorized and Ray executors (set-up excluded).

Executors: ``sequential`` (Sequential), ``vectorized`` (Vectorized), ``compiled``
(Vectorized with ``compile=True``; its torch.compile time lands in the untimed warm-up round, shown apart)
and ``ray`` (RayExecutor, a local Ray started by the run, one configuration ``ray:N`` per ``--workers N``,
workers of one thread each; Ray's start-up lands in the warm-up round). For Ray it also prints each
worker process's peak RSS; the driver's is in the table.

For each algorithm (FedAvg, FedDST, PFFDST by default) and executor, builds the run exactly as
``fl-sparse run ALGO cifar10_lenet`` would (``compose`` + ``RoundServer``), plays
one untimed warm-up round, then times ``sim.play_round(state)`` for ``--rounds`` rounds and prints the
median seconds per round, training samples per second (sampled clients' samples x local epochs / round
time), the worker process's peak RSS and the speed-up over Sequential (``seq/this``: Sequential's seconds
per round divided by this executor's). Each configuration runs in its own process, so peak RSS is per
configuration (with ``--quick`` all run in one process and peak RSS is the running maximum).

In the same run it measures plain PyTorch training of the preset's model (``nn.Module`` with stock
``torch.nn`` layers + ``torch.optim.SGD``, batch 32 and 640, in-memory normalised NCHW tensors; "vs plain
b640" compares with its batch-640 rate), the same with this library's layers on channels-last tensors
("tuned"), and ``fl_sparse.training.client.evaluate`` on the whole test set. Where clients fill their batches it
prints the batching bound: the tuned batch-640 throughput over Sequential's. That is what training the 20
clients of a round together would gain if it ran as fast as one batch of 640, a reference for the
vectorized/sequential ratio.

``--repeats N`` measures everything N times, the baselines and the rounds interleaved (their order reversed
every other repetition), and prints medians; each ratio to plain PyTorch is the median of the per-repetition
ratios. On a VM whose speed drifts by tens of percent within minutes, this is what makes one run of the
benchmark decide a threshold such as "at least 1.0x plain batch 32" (``vs plain b32``).

``--device cuda`` runs everything on the GPU (timers stop after ``torch.cuda.synchronize``) and adds the
peak GPU memory; ``auto`` (the default) picks CUDA when present.

    .venv/bin/python benchmarks/round_time.py --data-dir /tmp/cifar_root      # the paper's LeNet setting
    .venv/bin/python benchmarks/round_time.py --quick                         # embedded subset, < 1 min
    .venv/bin/python benchmarks/round_time.py --model resnet18 --rounds 5     # ResNet-18 (cifar10_resnet18)
    .venv/bin/python benchmarks/round_time.py --data-dir DATA_DIR --model vit --algorithms feddst   # cifar10_vit
    .venv/bin/python benchmarks/round_time.py --data-dir /tmp/cifar_root --device cuda --model resnet18

Without ``--data-dir`` the embedded 2,000-image CIFAR-10 subset is used (5 training images per client at
400 clients, far from the paper's 125); the output says which data was used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"lenet": "cifar10_lenet", "resnet18": "cifar10_resnet18", "vit": "cifar10_vit"}
EXECUTORS = {"sequential": ["Experiment.executor = @Sequential()"],
             "vectorized": ["Experiment.executor = @Vectorized()"],
             "compiled": ["Experiment.executor = @Vectorized()", "Vectorized.compile = True"],
             "ray": ["Experiment.executor = @RayExecutor()"]}  # ray:N runs N workers


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _setup_torch(threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch


def _synchronize(torch, device) -> None:
    """Waits for queued GPU work, so that a timer stopped next measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gpu_mb(torch, device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _bindings(args, executor: str | None = None) -> list[str]:
    bindings = [f"ROUNDS = {args.total_rounds}", "Experiment.eval_every = 100000",
                f"Experiment.device = {args.device!r}"]
    if args.data_dir:
        bindings.append(f"DATA_DIR = {args.data_dir!r}")
    if executor:
        name, _, workers = executor.partition(":")
        bindings += EXECUTORS[name] + ([f"RayExecutor.num_workers = {workers}"] if workers else [])
        if name in ("vectorized", "compiled") and args.group_size:
            bindings.append(f"Vectorized.group_size = {args.group_size}")
    return bindings + args.bind


def _simulation(args, algorithm: str, executor: str | None = None):
    from fl_sparse.config.compose import compose
    from fl_sparse.engine.server import RoundServer

    return RoundServer(compose(algorithm, [PRESETS[args.model]], _bindings(args, executor)).experiment)


def worker_rounds(args) -> dict:
    """One (algorithm, executor): warm-up round, then ``args.rounds`` timed rounds."""
    torch = _setup_torch(args.threads)
    sim = _simulation(args, args.algorithm, args.executor)
    exp = sim.experiment
    state = sim.initial_state()
    times, samples, readjust, warmup = [], [], [], 0.0
    for r in range(args.rounds + 1):
        clients = sim.sample_clients(state.round + 1)
        phase = exp.schedule.phase(state.round + 1)
        _synchronize(torch, sim.device)
        started = time.perf_counter()
        state, _ = sim.play_round(state)
        _synchronize(torch, sim.device)
        elapsed = time.perf_counter() - started
        if not r:  # round 1 is a warm-up (lazy initialisation, allocator growth, torch.compile)
            warmup = elapsed
        else:
            times.append(elapsed)
            samples.append(sum(len(sim.data.client_train[c]) for c in clients) * exp.local_epochs)
            readjust.append(phase.readjust)
    median = statistics.median(times)
    worker_rss = []
    if hasattr(exp.executor, "worker_peak_rss_mb"):  # RayExecutor: its worker processes, then its local Ray
        worker_rss = exp.executor.worker_peak_rss_mb()
        exp.executor.close()
    return {"algorithm": args.algorithm, "executor": args.executor, "model": args.model,
            "worker_peak_rss_mb": worker_rss,
            "seconds": times, "median_s": median, "warmup_s": warmup, "samples_per_round": statistics.median(samples),
            "samples_per_s": statistics.median(samples) / median, "readjust_rounds": sum(readjust),
            "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _peak_gpu_mb(torch, sim.device),
            "device": str(sim.device), "data": sim.data.source, "threads": torch.get_num_threads(),
            "clients_per_round": exp.clients_per_round, "epochs": exp.local_epochs, "batch_size": exp.batch_size}


def _with_stock_layers(model):
    """The model as plain PyTorch would run it: our exact-but-faster layers swapped back for their
    ``torch.nn`` originals (a subclass adding no state, so changing the class is the whole swap)."""
    import torch

    from fl_sparse.models.layers import BatchAsChannelsMaxPool2d

    for module in model.modules():
        if isinstance(module, BatchAsChannelsMaxPool2d):
            module.__class__ = torch.nn.MaxPool2d
    return model


def worker_plain(args) -> dict:
    """Plain PyTorch training throughput of the preset's model, and ``evaluate`` on the full test set."""
    torch = _setup_torch(args.threads)
    from fl_sparse.training.client import evaluate

    sim = _simulation(args, "fedavg")
    data, device = sim.data, sim.device
    n = min(len(data.train_y), 1280 if args.quick or args.model != "lenet" else 6400)
    x = data.normalize(data.train_x[:n])  # in-memory float tensors on the device: no data pipeline in the loop
    y = data.train_y[:n]
    out = {"data": data.source}
    torch.manual_seed(0)
    from fl_sparse.training.client import _model_input

    tuned_x = _model_input(data, data.train_x[:n])  # channels-last, as the executors feed the model
    for variant, batch in (("plain", 32), ("plain", 640), ("tuned", 32), ("tuned", 640)):
        # plain: stock torch.nn layers on NCHW tensors; tuned: this library's layers on channels-last ones.
        model = sim.experiment.model(data.num_classes).to(device)
        model = _with_stock_layers(model) if variant == "plain" else model
        inputs = x if variant == "plain" else tuned_x
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()

        def epoch():
            for start in range(0, n - batch + 1, batch):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(inputs[start:start + batch]), y[start:start + batch]).backward()
                opt.step()
            return (n // batch) * batch

        epoch()  # warm-up
        rates = []
        for _ in range(2 if args.quick else 3):
            _synchronize(torch, device)
            started = time.perf_counter()
            done = epoch()
            _synchronize(torch, device)
            rates.append(done / (time.perf_counter() - started))
        out[f"{variant}_b{batch}_samples_per_s"] = statistics.median(rates)
    weights = sim.initial_state().weights
    evaluate(sim.model, weights, data)  # warm-up
    times = []
    for _ in range(3):
        _synchronize(torch, device)
        started = time.perf_counter()
        evaluate(sim.model, weights, data)  # returns floats, so it has synchronised by then
        times.append(time.perf_counter() - started)
    out["evaluate_s"] = statistics.median(times)
    out["test_images"] = len(data.test_y)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _run_worker(args, kind: str, **extra) -> dict:
    if args.quick:  # in-process: no interpreter start-ups, peak RSS is then the running maximum
        local = argparse.Namespace(**{**vars(args), **extra})
        return worker_rounds(local) if kind == "rounds" else worker_plain(local)
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--rounds", str(args.rounds),
           "--total-rounds", str(args.total_rounds), "--device", args.device]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.group_size:
        cmd += ["--group-size", str(args.group_size)]
    if args.quick:
        cmd.append("--quick")
    for binding in args.bind:
        cmd += ["--bind", binding]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"worker {kind} {extra} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_interleaved(args, executors: list[str]) -> tuple[dict, list[dict]]:
    """The baselines and every (algorithm, executor) ``args.repeats`` times, in reversed order every other
    repetition so that a drift of the machine's speed does not always favour the same side. Returns the
    baselines' medians and one row per configuration: medians of its repetitions, with each ratio taken per
    repetition (both sides measured minutes apart at most) and then its median."""
    jobs = [("plain", {})] + [("rounds", {"algorithm": a, "executor": e}) for a in args.algorithms for e in executors]
    runs = {i: [] for i in range(len(jobs))}
    for repetition in range(args.repeats):
        order = range(len(jobs)) if repetition % 2 == 0 else reversed(range(len(jobs)))
        for i in order:
            kind, extra = jobs[i]
            runs[i].append(_run_worker(args, kind, **extra))
    plains = runs[0]
    plain = {key: statistics.median(p[key] for p in plains) if isinstance(value, (int, float)) else value
             for key, value in plains[0].items()}
    rows = []
    for i, (_, extra) in enumerate(jobs[1:], start=1):
        reps = runs[i]
        sequential = next((j for j, (_, e) in enumerate(jobs) if e.get("algorithm") == extra["algorithm"]
                           and e.get("executor") == "sequential"), None)
        row = dict(reps[-1])
        row["seconds"] = [t for rep in reps for t in rep["seconds"]]
        for key in ("median_s", "warmup_s", "samples_per_s", "peak_rss_mb"):
            row[key] = statistics.median(rep[key] for rep in reps)
        row["vs_plain_b32_each"] = [rep["samples_per_s"] / p["plain_b32_samples_per_s"]
                                    for rep, p in zip(reps, plains)]
        row["vs_plain_b32"] = statistics.median(row["vs_plain_b32_each"])
        row["vs_plain_b640"] = statistics.median(rep["samples_per_s"] / p["plain_b640_samples_per_s"]
                                                 for rep, p in zip(reps, plains))
        if sequential is not None and sequential != i:  # Sequential's s/round over this one's, per repetition
            row["speedup"] = statistics.median(s["median_s"] / rep["median_s"]
                                               for s, rep in zip(runs[sequential], reps))
        rows.append(row)
    return plain, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="root holding cifar-10-batches-py (default: the embedded subset)")
    parser.add_argument("--model", choices=sorted(PRESETS), default="lenet")
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "feddst", "pffdst"])
    parser.add_argument("--executors", nargs="+", choices=sorted(EXECUTORS), default=["sequential", "vectorized"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration (after one warm-up)")
    parser.add_argument("--total-rounds", type=int, default=100, help="the ROUNDS macro (schedules depend on it)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--group-size", type=int, default=0, help="Vectorized.group_size (0: whole round)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="RayExecutor worker counts, one "
                        "configuration each (ray:N), with --executors ray")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="Experiment.device for every configuration (auto: CUDA when present)")
    parser.add_argument("--bind", action="append", default=[], help="extra gin binding for every configuration")
    parser.add_argument("--repeats", type=int, default=1, help="measure everything this many times, baselines "
                        "and rounds interleaved, and report medians (ratios: medians of per-repetition ratios)")
    parser.add_argument("--quick", action="store_true",
                        help="2 timed rounds, shorter plain-PyTorch runs, one process (< 1 min on the embedded data)")
    parser.add_argument("--worker", choices=["rounds", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--executor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv
    if args.quick and "--rounds" not in given:
        args.rounds = 2
    if args.quick and args.threads is None:
        args.threads = 1  # two OpenMP threads on 2 shared cores slow down several-fold when anything else runs

    if args.worker:
        result = worker_rounds(args) if args.worker == "rounds" else worker_plain(args)
        print(json.dumps(result))
        return

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    started = time.perf_counter()
    load_before = os.getloadavg()
    executors = [variant for executor in args.executors
                 for variant in ([f"ray:{n}" for n in args.workers] if executor == "ray" else [executor])]
    plain, rows = _measure_interleaved(args, executors)
    from fl_sparse.reporting.run_details import cpu_model  # the host_cpu tag of tracked runs

    repeated = f", medians of {args.repeats} interleaved repetitions" if args.repeats > 1 else ""
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; python {platform.python_version()}")
    print(f"data: {plain['data']}  (model {args.model}, preset {PRESETS[args.model]}){repeated}")
    print(f"plain PyTorch {args.model} training (nn.Module + torch.optim.SGD, in-memory tensors): "
          f"batch 32: {plain['plain_b32_samples_per_s']:.0f} samples/s, "
          f"batch 640: {plain['plain_b640_samples_per_s']:.0f} samples/s; with this library's layers and "
          f"channels-last inputs: batch 32: {plain['tuned_b32_samples_per_s']:.0f}, "
          f"batch 640: {plain['tuned_b640_samples_per_s']:.0f} samples/s")
    print(f"evaluate() on the full test set ({plain['test_images']} images): {plain['evaluate_s']:.3f} s")
    header = (f"{'algorithm':<10} {'executor':<11} {'s/round':>8} {'min':>7} {'max':>7} {'warm-up':>8} "
              f"{'samples/s':>10} {'peak RSS MB':>11} {'peak GPU MB':>11} {'seq/this':>8} {'vs plain b32':>12} "
              f"{'vs plain b640':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        gpu = f"{r['peak_gpu_mb']:11.0f}" if r["peak_gpu_mb"] is not None else f"{'-':>11}"
        print(f"{r['algorithm']:<10} {r['executor']:<11} {r['median_s']:8.3f} {min(r['seconds']):7.3f} "
              f"{max(r['seconds']):7.3f} {r['warmup_s']:8.2f} {r['samples_per_s']:10.0f} "
              f"{r['peak_rss_mb']:11.0f} {gpu} {speedup:>8} {r['vs_plain_b32']:11.2f}x "
              f"{r['vs_plain_b640']:12.2f}x", flush=True)
    if args.repeats > 1:
        print("per-repetition samples/s over plain b32: " + "; ".join(
            f"{r['algorithm']} {r['executor']} " + ", ".join(f"{x:.2f}x" for x in r["vs_plain_b32_each"])
            for r in rows))
    for r in rows:
        if r["worker_peak_rss_mb"]:
            print(f"{r['algorithm']} {r['executor']}: peak RSS per worker process, MB: "
                  + ", ".join(f"{mb:.0f}" for mb in r["worker_peak_rss_mb"]))
    first = rows[0]
    sequential = [r for r in rows if r["executor"] == "sequential"
                  and r["samples_per_round"] / (r["clients_per_round"] * r["epochs"]) >= r["batch_size"]]
    if sequential:  # only where clients fill their batches, i.e. not on the embedded subset
        # Training clients together is at best training one batch of their size: this is the reference bound
        # for vectorized/sequential, measured on this machine (LeNet: batch 640 = 20 clients x batch 32).
        tuned = plain["tuned_b640_samples_per_s"]
        print("batching bound, tuned b640 samples/s / sequential samples/s: " + ", ".join(
            f"{r['algorithm']} {tuned / r['samples_per_s']:.2f}x" for r in sequential)
            + f"; tuned b640 / b32 = {tuned / plain['tuned_b32_samples_per_s']:.2f}x")
    print(f"setting: {first['clients_per_round']} clients/round, batch {first['batch_size']}, "
          f"median of {args.rounds} timed rounds after 1 warm-up, device {first['device']}, "
          f"torch threads {first['threads']}, "
          f"readjustment rounds among the timed ones: "
          + ", ".join(f"{r['algorithm']}/{r['executor']}={r['readjust_rounds']}" for r in rows))
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
