"""Shared by the Flower tests: a loopback ``Grid`` that calls the ClientApp in this process, the run configs,
and the in-process runs that Flower's results are compared with bit for bit."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import uuid
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fl_sparse.engine.loop import run_rounds
from fl_sparse.flower import clientapp, serverapp, setup
from fl_sparse.parts.executors.sequential import Sequential
from fl_sparse.training.client import train_client

FAULTY_APP = Path(__file__).resolve().parent / "flower_faulty"
sys.path.insert(0, str(FAULTY_APP))
from flower_faults import tamper  # noqa: E402

PFFDST_SHORT = ("ROUNDS = 2", "Experiment.num_clients = 3", "Experiment.clients_per_round = 3",
                "Experiment.local_epochs = 1", "Experiment.eval_every = 1000")


def run_config(*bindings: str, algorithm: str = "pffdst", presets: tuple[str, ...] = (), **extra) -> dict:
    return {**setup.DEFAULTS, **setup.Composition(algorithm, presets, bindings).as_run_config(), "threads": 1,
            "node-wait": 5.0, **extra}


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp in this process, node ``100 + k`` serving partition ``k`` (node
    config ``node_configs[k]``, default ``partition-id=k``). ``faults`` maps (round, client) to a fault of
    tests/flower_faults.py, "raise" (the ClientApp fails) or "silent" (no reply). ``client_side``: a context
    manager the ClientApp runs in (e.g. one that makes reading the whole data set fail); ``run_id``: the run's id
    in the ClientApps' contexts (a node worker keeps each run's frozen part apart)."""

    def __init__(self, config: dict, num_nodes: int, faults: dict | None = None, node_configs: list | None = None,
                 client_side=contextlib.nullcontext, run_id: int = 1):
        node_configs = node_configs or [{"partition-id": k} for k in range(num_nodes)]
        self.contexts = {100 + k: Context(run_id, 100 + k, node_configs[k], RecordDict(), config)
                         for k in range(num_nodes)}
        self.faults, self.client_side = faults or {}, client_side
        self.replies = {}

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError  # deprecated in flwr 1.42: the server builds Messages itself

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Each message gets an id and is answered at once; its reply waits for pull_messages."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = str(uuid.uuid4())
            ids.append(message_id)
            reply = self.answer(message)
            if reply is not None:
                self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(message_id) for message_id in message_ids if message_id in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError  # the server pushes and pulls at its own interval

    def answer(self, message):
        context = self.contexts[message.metadata.dst_node_id]
        fault = self.faults.get((message.metadata.group_id, context.node_id - 100))
        if fault == "silent":
            return None
        try:
            if fault == "raise":
                raise RuntimeError("the ClientApp crashed")
            with self.client_side():
                reply = clientapp.app(message, context)
        except Exception as error:  # what Flower's runtime turns a ClientApp exception into
            reply = Message(Error(0, f"{type(error).__name__}: {error}"), reply_to=message)
        return tamper(reply, fault) if fault and not reply.has_error() else reply


def flower_run(config: dict, num_nodes: int, faults: dict | None = None, out=None, **grid):
    """Run the ServerApp's ``main`` on a LoopbackGrid (``grid``: its other arguments); (final checkpointed
    state, per-round metrics)."""
    config = {**config, "checkpoint-dir": str(out / "checkpoints"), "metrics-file": str(out / "metrics.jsonl")}
    serverapp.main(LoopbackGrid(config, num_nodes, faults, **grid), Context(1, 0, {}, RecordDict(), config))
    return read_results(out)


def read_results(out: Path):
    from fl_sparse.runtime import checkpoint

    state, _ = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    return state, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def in_process_run(config: dict, damage: dict | None = None):
    built = setup.build(setup.Composition.from_run_config(config), 1)
    if damage:
        built.server.experiment.executor = DamagingExecutor(damage)
    metrics = []
    state = run_rounds(built.server, callbacks=[lambda event: metrics.append(event.metrics)]).state
    return state, metrics


class DamagingExecutor(Sequential):
    """Sends NaN weights from the (round, client) pairs in ``damage``: the in-process engine rejects them."""

    def __init__(self, damage):
        self.damage = damage

    def train(self, job, tasks, ctx):
        results = [train_client(job, task, ctx) for task in tasks]
        for i, result in enumerate(results):
            if (str(ctx.phase.round), result.client_id) in self.damage:
                weights = {**result.weights, "fc3.bias": torch.full_like(result.weights["fc3.bias"], float("nan"))}
                results[i] = dataclasses.replace(result, weights=weights)
        return results


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # same kernels, same thread count, same layout: bitwise
