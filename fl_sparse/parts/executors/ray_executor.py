"""The Ray executor: a round's clients trained in parallel by Ray actors, on one machine's cores or a cluster.

Gin::

    Experiment.executor = @RayExecutor()
    RayExecutor.num_workers = None          # None: one worker per threads_per_worker CPUs that Ray sees
    RayExecutor.address = None              # None: start a local Ray; 'HOST:PORT' joins a running cluster
    RayExecutor.threads_per_worker = 1      # torch threads (and Ray CPUs) of each worker
    RayExecutor.num_gpus_per_worker = 0     # e.g. 0.25 puts four workers on one GPU
    RayExecutor.max_restarts = 3            # times a dead worker is restarted before the round fails

This is the only module that imports ray, lazily, when the first round is trained; without the extra,
building the executor fails with one line naming ``pip install 'fl-sparse[ray]'``.

What crosses the wire. At the first round the training job (model skeleton, objective, optimiser, mask
policy, the training images and labels as numpy arrays) is put into Ray's object store once; each worker
fetches it once (on one machine the images are shared memory, not copies) and keeps it across rounds.
Every round each worker then receives one call holding its share of the round's client tasks (the
decoded downlink tensors, which pickling sends once per worker when the codec broadcasts one payload,
plus each client's frozen set and sample indices) and the round's context, and returns its clients'
results (weights, mask, sample count, loss). ``docs/scale-out.md`` gives the measured bytes.

Same results as :class:`~fl_sparse.parts.executors.Sequential`: each worker runs ``Sequential`` on its
share, and every draw a client makes is keyed by (seed, stream, round, client)
(:func:`fl_sparse.training.client.generator`), so who trains a client does not change what it computes. On CPU
the results are bitwise Sequential's when all of these hold (``tests/test_ray_executor.py`` checks it):

* the workers run as many torch threads as the Sequential process (``threads_per_worker``): oneDNN and
  OpenMP split reductions by thread count, which moves the last bits of convolution gradients;
* every worker runs the same kernels, i.e. the same kind of CPU (an AVX-512 node and an AVX2 node of one
  cluster round differently) and not a GPU (``num_gpus_per_worker > 0``: other kernels, some with atomics);
* no client step draws from ``ctx.generator``: Sequential hands one generator to its clients in turn,
  while each worker gets its own copy of it. None of the shipped mask policies does.

A worker process that dies (killed, out of memory) is restarted by Ray (``max_restarts``) and the call it
was running, i.e. its clients, is retried on the restarted worker; training is a pure function of the
call, so the retry gives the same results. When the restarts are used up the round fails with one line
(:class:`WorkerLost`); a client is never dropped silently.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import os
import resource
import warnings

import gin
import torch

from fl_sparse.core.errors import ConfigError, FlSparseError, check
from fl_sparse.core.interfaces import ClientExecutor, ClientResult, RoundContext, Tensors
from fl_sparse.parts.executors.sequential import Sequential
from fl_sparse.training.client import ClientTask, TrainingJob

RAY_MISSING = "RayExecutor needs Ray, which is not installed: pip install 'fl-sparse[ray]'"
MIB = 2**20


class WorkerLost(FlSparseError):
    """A Ray worker died more often than it may be restarted: the round fails rather than drop its clients."""


class RayUnavailable(FlSparseError):
    """Ray could not be started or joined."""


@gin.configurable
class RayExecutor(ClientExecutor):
    """Splits each round's clients over Ray actor workers; see the module docstring."""

    def __init__(self, num_workers: int | None = None, address: str | None = None, threads_per_worker: int = 1,
                 num_gpus_per_worker: float = 0, max_restarts: int = 3):
        check(num_workers is None or (isinstance(num_workers, int) and num_workers >= 1),
              f"RayExecutor.num_workers={num_workers!r} must be an integer >= 1 (or None: one per CPU Ray sees)")
        check(address is None or (isinstance(address, str) and address != ""),
              f"RayExecutor.address={address!r} must be 'HOST:PORT' of a running Ray cluster (or None: local Ray)")
        check(isinstance(threads_per_worker, int) and threads_per_worker >= 1,
              f"RayExecutor.threads_per_worker={threads_per_worker!r} must be an integer >= 1")
        check(isinstance(num_gpus_per_worker, (int, float)) and num_gpus_per_worker >= 0,
              f"RayExecutor.num_gpus_per_worker={num_gpus_per_worker!r} must be a number >= 0")
        check(isinstance(max_restarts, int) and max_restarts >= 0,
              f"RayExecutor.max_restarts={max_restarts!r} must be an integer >= 0")
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(RAY_MISSING)
        self.num_workers, self.address = num_workers, address
        self.threads_per_worker, self.num_gpus_per_worker = threads_per_worker, num_gpus_per_worker
        self.max_restarts = max_restarts
        self._connected = False  # this executor called ray.init, so close() calls ray.shutdown
        self._workers: list = []
        self._job: TrainingJob | None = None
        self._job_ref = None

    def __repr__(self) -> str:
        return (f"RayExecutor(num_workers={self.num_workers}, address={self.address!r}, "
                f"threads_per_worker={self.threads_per_worker}, num_gpus_per_worker={self.num_gpus_per_worker})")

    def train(self, job: TrainingJob, tasks: list[ClientTask], ctx: RoundContext) -> list[ClientResult]:
        if not tasks:
            return []
        import ray

        self._share(job)
        device = tasks[0].indices.device
        shares = split(len(tasks), len(self._workers))
        calls = [worker.train.remote([self._job_ref], _tasks_on([tasks[i] for i in share], "cpu"), ctx)
                 for worker, share in zip(self._workers, shares)]
        try:
            done = ray.get(calls)
        except ray.exceptions.RayActorError as error:
            raise WorkerLost(
                f"round {ctx.phase.round}: a Ray worker died after {self.max_restarts} restart(s) and the round "
                f"failed, no client dropped ({type(error).__name__}); check the workers' memory or raise "
                "RayExecutor.max_restarts") from None
        results: list[ClientResult | None] = [None] * len(tasks)
        for share, share_results in zip(shares, done):
            for i, result in zip(share, share_results):
                results[i] = _result_on(result, device)
        return results

    def worker_pids(self) -> list[int]:
        """The process id of each worker (for tests and monitoring); starts nothing."""
        import ray

        return ray.get([worker.pid.remote() for worker in self._workers])

    def worker_peak_rss_mb(self) -> list[float]:
        """Each worker process's peak resident memory in MB (the benchmark reports it)."""
        import ray

        return ray.get([worker.peak_rss_mb.remote() for worker in self._workers])

    def close_workers(self) -> None:
        """Stop the workers and free their CPUs; the next round starts new ones."""
        if self._workers:
            import ray

            for worker in self._workers:
                ray.kill(worker)
        self._workers, self._job, self._job_ref = [], None, None

    def close(self) -> None:
        """Stop the workers, and disconnect from Ray if this executor connected to it: a local Ray that it
        started shuts down; a cluster given by ``address`` keeps running. A later round starts afresh."""
        self.close_workers()
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False

    def _share(self, job: TrainingJob) -> None:
        """Connect, start the workers and put the job into the object store, each the first time it is needed."""
        import ray

        if self._job is job:
            return
        stored = _job_for_store(job)
        if not ray.is_initialized():
            self._connect(stored)
        if not self._workers:
            self._start_workers()
        # Workers are generic: a new job is only a new object-store entry, fetched by each worker on first use.
        self._job, self._job_ref = job, ray.put(stored)

    def _connect(self, stored) -> None:
        import ray

        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        with warnings.catch_warnings():  # Ray's notice about accelerator environment variables, not ours
            warnings.simplefilter("ignore", FutureWarning)
            try:
                if self.address is None:
                    # address="local" always starts a new Ray, never joins one `ray start` left on this host.
                    # The object store holds the training images plus a few rounds of results; tmpfs pages are
                    # only used when written, so a roomy limit costs nothing at start-up.
                    # Ray starts workers at nice 15, so that its own daemons stay responsive; on a host shared
                    # with anything else that starves them (2 workers ran at half a nice-0 process's speed on a
                    # loaded 2-core host). Training is the point of these workers: nice 0, as the driver.
                    cpus = self.num_workers * self.threads_per_worker if self.num_workers else None
                    images = stored[1].nbytes + stored[2].nbytes
                    ray.init(address="local", num_cpus=cpus, object_store_memory=2 * images + 512 * MIB,
                             _system_config={"worker_niceness": 0}, **options)
                else:
                    ray.init(address=self.address, **options)
            except Exception as error:  # noqa: BLE001 (ray.init raises bare Exception on a start-up timeout)
                where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray"
                # The raylet gives Ray's agent processes 15 s to start; an overloaded machine can exceed that.
                raise RayUnavailable(f"RayExecutor could not {where}: {str(error).strip().splitlines()[0]} "
                                     "(an overloaded machine can make Ray's start-up time out; retry, or see the "
                                     "raylet log under /tmp/ray/session_latest/logs)") from None
        self._connected = True

    def _start_workers(self) -> None:
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 0))
        count = self.num_workers or max(1, cpus // self.threads_per_worker)
        where = f"the Ray cluster at {self.address}" if self.address else "the local Ray"
        needed = count * self.threads_per_worker
        check(needed <= cpus, f"RayExecutor: {count} workers x {self.threads_per_worker} threads need {needed} CPUs "
                              f"but {where} has {cpus}; lower RayExecutor.num_workers (--workers) or add nodes")
        gpus = ray.cluster_resources().get("GPU", 0)
        check(count * self.num_gpus_per_worker <= gpus,
              f"RayExecutor: {count} workers x {self.num_gpus_per_worker} GPUs need more GPUs than the {gpus} of "
              f"{where}; lower RayExecutor.num_gpus_per_worker")
        actor = ray.remote(_Worker).options(num_cpus=self.threads_per_worker, num_gpus=self.num_gpus_per_worker,
                                            max_restarts=self.max_restarts, max_task_retries=self.max_restarts)
        device = "cuda" if self.num_gpus_per_worker > 0 else "cpu"
        self._workers = [actor.remote(self.threads_per_worker, device) for _ in range(count)]
        ray.get([worker.pid.remote() for worker in self._workers])  # surfaces start-up errors here, once


def split(num_tasks: int, num_workers: int) -> list[list[int]]:
    """Task positions per worker, dealt round-robin (clients of a round hold equally many samples, so the
    shares take about equally long); no empty shares."""
    return [list(range(w, num_tasks, num_workers)) for w in range(min(num_tasks, num_workers))]


class _Worker:
    """One Ray actor. It holds the current job (fetched from the object store on first use) across rounds and
    trains the clients it is given with :class:`Sequential`, the reference executor."""

    def __init__(self, threads: int, device: str):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.job_key, self.job = None, None

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

    def train(self, job_ref: list, tasks: list[ClientTask], ctx: RoundContext) -> list[ClientResult]:
        import ray

        ref = job_ref[0]  # wrapped in a list so that Ray passes the reference rather than the job each round
        if self.job_key != ref.hex():
            self.job, self.job_key = None, None  # drop the previous job before fetching the next
            self.job, self.job_key = _job_from_store(ray.get(ref), self.device), ref.hex()
        results = Sequential().train(self.job, _tasks_on(tasks, self.device), ctx)
        return [_result_on(result, torch.device("cpu")) for result in results]


def _job_for_store(job: TrainingJob) -> tuple[TrainingJob, object, object]:
    """The job as the workers need it: the training images and labels as numpy arrays (zero-copy in Ray's
    object store), and none of what only the server uses (test set, client index lists)."""
    data = job.data
    light = dataclasses.replace(data, train_x=None, train_y=None, test_x=None, test_y=None, client_train=[],
                                client_test=[], mean=data.mean.cpu(), std=data.std.cpu())
    model = job.model if _on_cpu(job.model) else copy.deepcopy(job.model).cpu()
    return dataclasses.replace(job, model=model, data=light), data.train_x.cpu().numpy(), data.train_y.cpu().numpy()


def _job_from_store(stored, device: torch.device) -> TrainingJob:
    job, train_x, train_y = stored
    with warnings.catch_warnings():  # the arrays are read-only shared memory; training only gathers from them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    data = dataclasses.replace(job.data, train_x=x.to(device), train_y=y.to(device), mean=job.data.mean.to(device),
                               std=job.data.std.to(device))
    return dataclasses.replace(job, model=job.model.to(device), data=data)


def _on_cpu(model: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def _tasks_on(tasks: list[ClientTask], device) -> list[ClientTask]:
    """The tasks with every tensor on ``device``. Dicts shared between tasks (a broadcast) stay shared, so
    pickling sends them once per call. A no-op on the device they are on."""
    moved: dict[int, Tensors] = {}

    def on(tensors: Tensors) -> Tensors:
        if id(tensors) not in moved:
            moved[id(tensors)] = {name: t.to(device) for name, t in tensors.items()}
        return moved[id(tensors)]

    return [dataclasses.replace(task, weights=on(task.weights), mask=on(task.mask), frozen=on(task.frozen),
                                indices=task.indices.to(device)) for task in tasks]


def _result_on(result: ClientResult, device: torch.device) -> ClientResult:
    return dataclasses.replace(result, weights={k: v.to(device) for k, v in result.weights.items()},
                               mask={k: v.to(device) for k, v in result.mask.items()})
