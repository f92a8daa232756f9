"""Bytes RayExecutor moves per round, next to the codec bytes the engine counts.

    python benchmarks/ray_wire_bytes.py --data-dir DATA_DIR [--algorithm feddst] [--workers 2] [--bind ...]

Builds the run as ``fl-sparse run ALGO cifar10_lenet`` would, plays ``--rounds`` rounds with Sequential while
recording each round's client tasks and results, and serialises what RayExecutor sends with pickle protocol 5
(what Ray uses for call arguments and return values; out-of-band buffers counted): the job, once per run
through the object store; per round, each worker's call (its share of the tasks and the round context) and
what each worker returns. These are Ray's transport between processes or hosts; the federated payloads the
engine counts (``downlink_bytes`` / ``uplink_bytes``) are the codec's, printed beside them.
"""

from __future__ import annotations

import argparse
import pickle

from fl_sparse.config.compose import compose
from fl_sparse.engine.server import RoundServer
from fl_sparse.parts.executors.ray_executor import _job_for_store, _tasks_on, split
from fl_sparse.parts.executors.sequential import Sequential


def serialized_bytes(obj) -> int:
    buffers = []
    inline = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(inline) + sum(buffer.raw().nbytes for buffer in buffers)


class Recording(Sequential):
    """Sequential that keeps the last round's tasks, context and results."""

    def train(self, job, tasks, ctx):
        self.tasks, self.ctx = tasks, ctx
        self.results = super().train(job, tasks, ctx)
        return self.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="root holding cifar-10-batches-py (default: the embedded subset)")
    parser.add_argument("--algorithm", default="feddst")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--bind", action="append", default=[], help="extra gin binding")
    args = parser.parse_args()
    bindings = ["Experiment.eval_every = 100000"] + ([f"DATA_DIR = {args.data_dir!r}"] if args.data_dir else [])
    bindings += args.bind
    sim = RoundServer(compose(args.algorithm, ["cifar10_lenet"], bindings).experiment)
    sim.experiment.executor = recorder = Recording()
    stored = _job_for_store(sim.job)
    job_bytes = serialized_bytes(stored[0]) + stored[1].nbytes + stored[2].nbytes
    print(f"{args.algorithm}, cifar10_lenet, {sim.data.source}; {args.workers} workers")
    print(f"once per run, the job through the object store: {job_bytes / 1e6:.1f} MB "
          f"(training images {stored[1].nbytes / 1e6:.1f} MB)")
    state = sim.initial_state()
    for _ in range(args.rounds):
        state, metrics = sim.play_round(state)
        shares = split(len(recorder.tasks), args.workers)
        calls = [serialized_bytes((_tasks_on([recorder.tasks[i] for i in share], "cpu"), recorder.ctx))
                 for share in shares]
        returns = [serialized_bytes([recorder.results[i] for i in share]) for share in shares]
        clients = len(recorder.tasks)
        print(f"round {state.round}: {clients} clients; to the workers {sum(calls) / 1e6:.2f} MB "
              f"({', '.join(f'{c / 1e6:.2f}' for c in calls)} MB per call), back {sum(returns) / 1e6:.2f} MB "
              f"({sum(returns) / clients / 1e6:.3f} MB per client); codec bytes the engine counts: downlink "
              f"{metrics['downlink_bytes'] / 1e6:.2f} MB, uplink {metrics['uplink_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
