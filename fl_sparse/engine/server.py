"""The server's side of one round, as steps: open, send down, receive up, close. It knows no algorithm:
every decision is a call into a part (see :mod:`fl_sparse.core.interfaces`). :func:`fl_sparse.engine.loop.run_rounds`
plays these rounds until a stop condition holds; a remote runtime (Flower) plays the same steps with its
own transport."""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings

import torch

from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import ClientResult, Link, Message, ModelSchema, RoundContext, Tensors
from fl_sparse.core.rng import generator
from fl_sparse.core.state import ServerState
from fl_sparse.data import FederatedData
from fl_sparse.engine.discovery import InProcessDiscovery
from fl_sparse.engine.experiment import Experiment
from fl_sparse.models import maskable_names
from fl_sparse.sparse.mask_ops import apply_mask
from fl_sparse.training import accounting
from fl_sparse.training.client import ClientTask, TrainingJob, evaluate


class RoundServer:
    """A built experiment on the server: data loaded, model made, parts set up, and the round's steps.
    :meth:`play_round` plays one round with in-process clients (the experiment's executor)."""

    def __init__(self, experiment: Experiment, data: FederatedData | None = None):
        """``data``: the experiment's data, already loaded (a Flower node holding only its own partition);
        default: :meth:`Experiment.load_data`."""
        self.experiment = exp = experiment
        self.device = exp.torch_device
        self.data = (exp.load_data() if data is None else data).to(self.device)
        # A partitioner may drop clients left without data (PerClassDirichlet); the rest are sampled.
        check(self.data.num_clients >= exp.clients_per_round,
              f"the partition left {self.data.num_clients} of {exp.num_clients} clients with data, fewer than "
              f"Experiment.clients_per_round={exp.clients_per_round}; lower it or raise dirichlet_alpha")
        torch.manual_seed(int(generator(exp.stream_seed("init"), "init").initial_seed()))
        model = exp.model(self.data.num_classes)
        self.model = (exp.reparameterization(model) if exp.reparameterization else model).to(self.device)
        exp.mask_policy.setup(self.model, exp.schedule)
        if exp.mask_discovery is not None:
            exp.mask_discovery.setup(self.model)
        self.schema = ModelSchema.of(self.model.state_dict())  # what every decoder checks payloads against
        self.macs = accounting.forward_macs(self.model, tuple(self.data.train_x.shape[1:]))
        self.discovery_metrics: dict[str, float] = {}  # a MaskDiscovery's bytes and FLOPs, logged with round 1
        self.job = TrainingJob(self.model, self.data, exp.objective, exp.optimizer, exp.mask_policy,
                               exp.local_epochs, exp.batch_size, exp.reparameterization)

    def initial_state(self) -> ServerState:
        """The state before round 1: the initial model under the mask policy's initial mask, or under the mask
        a :class:`~fl_sparse.core.discovery.MaskDiscovery` settled with the clients (its bytes and FLOPs
        counted, and logged with round 1)."""
        exp = self.experiment
        weights = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        if exp.mask_discovery is None:
            mask = exp.mask_policy.initial_mask(weights, generator(exp.seed, "mask", 0))
            return ServerState(apply_mask(weights, mask), mask, {})
        clients = InProcessDiscovery(self, exp.schedule.initial_sparsity())
        weights, mask = exp.mask_discovery.discover(clients, weights, maskable_names(self.model),
                                                    exp.schedule.initial_sparsity(), generator(exp.seed, "mask", 0))
        self.discovery_metrics = clients.metrics()
        return ServerState(apply_mask(weights, mask), mask, {}, cumulative_bytes=clients.bytes,
                           cumulative_flops=clients.flops)

    def sample_clients(self, round: int) -> list[int]:
        exp = self.experiment
        order = torch.randperm(self.data.num_clients,
                               generator=generator(exp.stream_seed("sampling"), "sampling", round))
        return sorted(order[:exp.clients_per_round].tolist())

    # The round's steps, shared by play_round (in-process clients) and fl_sparse.flower (remote clients).

    def round_context(self, round: int) -> RoundContext:
        return RoundContext(self.experiment.schedule.phase(round), generator(self.experiment.seed, "mask", round))

    def open_round(self, state: ServerState) -> tuple[RoundContext, list[int]]:
        """The context and the sampled clients of round ``state.round + 1``."""
        return self.round_context(state.round + 1), self.sample_clients(state.round + 1)

    def link(self, state: ServerState, direction: str, client: int) -> Link:
        return Link(direction, client, state.frozen, state.weights, state.freeze_version, state.mask, self.schema)

    def encode_downlinks(self, state: ServerState, clients: list[int]) -> list[bytes]:
        """Each client's downlink payload. One that is the same for every client is encoded once and
        returned as the same ``bytes`` object for each (and still counted once per client)."""
        codec, payloads, broadcast = self.experiment.downlink_codec, [], None
        for client in clients:
            link = self.link(state, "down", client)
            payload = broadcast or codec.encode(Message(state.weights, state.mask), link)
            if broadcast is None and codec.same_for_every_client(link):
                broadcast = payload
            codec.delivered(link)
            payloads.append(payload)
        return payloads

    def task(self, client: int, received: Message, frozen: Tensors, round: int) -> ClientTask:
        """What ``client`` trains on in ``round``, from the downlink it decoded and the frozen set it holds."""
        return ClientTask(client, received.tensors, received.masks, frozen, self.data.client_train[client],
                          self.experiment.seed, round)

    def accept_upload(self, state: ServerState, result: ClientResult, payload: bytes) -> ClientResult | None:
        """``result`` with the weights and mask the server decodes from ``payload``, or None (and a
        warning) when the payload is malformed or does not fit the model."""
        r = state.round + 1
        try:
            received = self.experiment.uplink_codec.decode(payload, self.link(state, "up", result.client_id))
            upload = dataclasses.replace(result, weights=received.tensors, mask=received.masks,
                                         scores=received.scores)
            problem = _invalid_update(upload, state.weights)
        except ValueError as error:  # PayloadError, or a Link the payload does not fit
            problem = str(error)
        if problem:
            warnings.warn(f"round {r}: client {result.client_id} rejected: {problem}", stacklevel=2)
            return None
        return upload

    def _send_down(self, state: ServerState, clients: list[int]) -> tuple[list[ClientTask], int]:
        """Each client's view of the global model, as decoded from the bytes it received."""
        codec, tasks, decoded = self.experiment.downlink_codec, [], {}
        payloads = self.encode_downlinks(state, clients)
        for client, payload in zip(clients, payloads):
            if id(payload) not in decoded:  # clients never modify what they receive in place
                decoded[id(payload)] = codec.decode(payload, self.link(state, "down", client))
            tasks.append(self.task(client, decoded[id(payload)], state.frozen, state.round + 1))
        return tasks, sum(map(len, payloads))

    def receive_uploads(self, state: ServerState,
                        arrivals: list[tuple[ClientResult, bytes]]) -> tuple[list[ClientResult], int]:
        """The uploads that arrived, each a client's result and its payload, as the server decodes them (bad
        ones rejected with a warning), and the bytes received. In-process and remote clients alike."""
        uploads = [self.accept_upload(state, result, payload) for result, payload in arrivals]
        return [upload for upload in uploads if upload is not None], sum(len(payload) for _, payload in arrivals)

    def _send_up(self, state: ServerState, results: list[ClientResult]) -> list[tuple[ClientResult, bytes]]:
        """What in-process clients upload: each result with its encoded payload (one the codec cannot even
        encode is rejected with a warning)."""
        codec, arrivals = self.experiment.uplink_codec, []
        for result in results:
            link = self.link(state, "up", result.client_id)
            try:
                payload = codec.encode(Message(result.weights, result.mask, result.scores), link)
            except ValueError as error:
                warnings.warn(f"round {state.round + 1}: client {result.client_id} rejected: {error}", stacklevel=3)
                continue
            codec.delivered(link)
            arrivals.append((result, payload))
        return arrivals

    def training_flops(self, state: ServerState, clients: list[int]) -> float:
        """Training FLOPs of the round's clients, each under the global mask and frozen set it received."""
        epochs = self.experiment.local_epochs
        return sum(accounting.training_flops(self.macs, state.mask, state.frozen,
                                             len(self.data.client_train[client]) * epochs) for client in clients)

    def play_round(self, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        ctx, clients = self.open_round(state)
        started = time.perf_counter()
        tasks, down_bytes = self._send_down(state, clients)
        results = self.experiment.executor.train(self.job, tasks, ctx)
        uploads, up_bytes = self.receive_uploads(state, self._send_up(state, results))
        return self.close_round(state, ctx, clients, uploads, up_bytes, down_bytes, started)

    def close_round(self, state: ServerState, ctx: RoundContext, clients: list[int], uploads: list[ClientResult],
                    up_bytes: int, down_bytes: int, started: float) -> tuple[ServerState, dict[str, float]]:
        """Aggregate the accepted uploads, run the freeze and mask policies, and count the round."""
        exp, r = self.experiment, state.round + 1
        flops = self.training_flops(state, clients)
        weights, mask, frozen, freeze_version = state.weights, state.mask, state.frozen, state.freeze_version
        if uploads:
            weights, mask = exp.aggregator.aggregate(weights, mask, frozen, uploads)
            ctx = dataclasses.replace(ctx, votes=functools.partial(_votes, uploads),
                                      scores=functools.partial(_mean_scores, uploads), uploads=len(uploads),
                                      sent_mask=state.mask)
            evaluate_aggregated = functools.partial(evaluate, self.model, weights, self.data)  # only if asked
            weights, mask = exp.freeze_policy.stage_start_model(ctx, weights, mask, evaluate_aggregated)
            frozen = exp.freeze_policy.server_step(ctx, weights, mask, frozen)
            freeze_version += frozen is not state.frozen
            weights, mask = exp.mask_policy.server_step(ctx, weights, mask, frozen)
        else:
            warnings.warn(f"round {r}: every client update was rejected; the global model is unchanged",
                          stacklevel=2)

        new_state = ServerState(weights, mask, frozen, r, freeze_version,
                                state.cumulative_bytes + up_bytes + down_bytes, state.cumulative_flops + flops)
        metrics = {
            "rejected_clients": float(len(clients) - len(uploads)),
            "train_loss": _weighted_loss(uploads),
            "uplink_bytes": float(up_bytes), "downlink_bytes": float(down_bytes),
            "uplink_bytes_per_client": up_bytes / len(clients),
            "downlink_bytes_per_client": down_bytes / len(clients),
            "cumulative_gb": new_state.cumulative_bytes / 1e9,
            "flops": flops, "cumulative_flops": new_state.cumulative_flops,
            "stage": float(ctx.phase.stage), "round_seconds": time.perf_counter() - started,
            **_density_metrics(mask, frozen),
            **_turnover_metrics(state.weights, weights, mask),
            **(self.discovery_metrics if r == 1 else {}),
        }
        return new_state, metrics

    def evaluate(self, weights: Tensors) -> dict[str, float]:
        """Test-set metrics of a global model (the full test set and the clients' local test splits)."""
        return evaluate(self.model, weights, self.data)


def _invalid_update(upload: ClientResult, weights: Tensors) -> str | None:
    """Why a client's decoded update cannot be aggregated, or None if it can."""
    if upload.weights.keys() != weights.keys():
        return f"it sent tensors {sorted(set(upload.weights) ^ set(weights))[:3]} that do not match the model"
    for name, tensor in upload.weights.items():
        if tensor.shape != weights[name].shape:
            return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(weights[name].shape)}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} contains NaN or Inf"
    for name, score in upload.scores.items():
        if not torch.isfinite(score).all():
            return f"the scores of {name} contain NaN or Inf"
    return None


def _votes(uploads: list[ClientResult]) -> Tensors:
    """Per masked tensor, the number of uploads whose mask holds each coordinate."""
    votes: Tensors = {}
    for upload in uploads:
        for name, held in upload.mask.items():
            votes[name] = votes[name] + held.to(torch.int32) if name in votes else held.to(torch.int32)
    return votes


def _mean_scores(uploads: list[ClientResult]) -> Tensors:
    """Per masked tensor any upload scored, the mean over all uploads of their scores (none sent counts as 0)."""
    totals: Tensors = {}
    for upload in uploads:
        for name, score in upload.scores.items():
            totals[name] = totals[name] + score.float() if name in totals else score.float()
    return {name: total / len(uploads) for name, total in totals.items()}


def _weighted_loss(results: list[ClientResult]) -> float:
    total = sum(r.num_samples for r in results)
    return sum(r.train_loss * r.num_samples for r in results) / total if total else float("nan")


def _turnover_metrics(before: Tensors, after: Tensors, mask: Tensors) -> dict[str, float]:
    """How the global model's support moved this round, over the masked tensors: weights regrown (zero in the
    previous global model, non-zero now) and weights dropped (non-zero before, zero now); none for dense runs."""
    if not mask:
        return {}
    regrown = dropped = 0
    for name in mask:
        was, now = before[name] != 0, after[name] != 0
        regrown += int((~was & now).sum())
        dropped += int((was & ~now).sum())
    return {"weights_regrown": float(regrown), "weights_dropped": float(dropped)}


def _density_metrics(mask: Tensors, frozen: Tensors) -> dict[str, float]:
    """Global and per-layer density of the masked tensors, and the fraction of them frozen."""
    if not mask:
        return {"density": 1.0, "frozen_fraction": 0.0}
    total = sum(m.numel() for m in mask.values())
    metrics = {f"density/{name}": float(m.float().mean()) for name, m in mask.items()}
    metrics["density"] = sum(int(m.sum()) for m in mask.values()) / total
    metrics["frozen_fraction"] = sum(int(f.sum()) for f in frozen.values()) / total
    return metrics
