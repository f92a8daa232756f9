"""PruneFL (prunefl.gin): its invariants (docs BASELINES.md section 3): the density never above the cap, the accumulator
holding exactly the rounds since the last reconfiguration, no protected weight removed, a greedy that never lowers
its ratio, regrown weights at 0, and the bytes of its score uploads and of its initial pruning counted."""

from __future__ import annotations

import heapq
import math

import pytest
import torch
from helpers import play, simulation

from fl_sparse.config.compose import compose
from fl_sparse.core.errors import ConfigError, first_line
from fl_sparse.core.interfaces import Link, Message
from fl_sparse.parts.prunefl import greedy_additions, reconfigure
from fl_sparse.sparse.mask_ops import active_counts

# A short initial pruning (its own rule, on 64 samples, adjusting every round) and reconfigurations every 2 rounds.
SHORT = ("PruneFLInitial.samples = 64", "PruneFLInitial.adjust_every = 1", "PruneFLInitial.loss_gate = 1.0",
         "PruneFLInitial.stop_after = 2", "PruneFLInitial.max_rounds = 12", "PruneFL.reconfigure_every = 2")


def _cap(mask, sparsity: float) -> int:
    return round((1 - sparsity) * sum(m.numel() for m in mask.values()))


def _sequential_greedy(numerator, denominator, importances, costs, limit):
    """The authors' architecture_search, one candidate at a time from a heap over the layers (the reference)."""
    heap = [(-float(imp[0]) / cost, layer, 0) for layer, (imp, cost) in enumerate(zip(importances, costs)) if len(imp)]
    heapq.heapify(heap)
    taken = []
    while heap and len(taken) < limit:
        value, layer, index = heap[0]
        if not -value > numerator / denominator:
            break
        numerator, denominator = numerator + float(importances[layer][index]), denominator + costs[layer]
        taken.append((layer, index))
        if index + 1 < len(importances[layer]):
            heapq.heapreplace(heap, (-float(importances[layer][index + 1]) / costs[layer], layer, index + 1))
        else:
            heapq.heappop(heap)
    return taken


@pytest.mark.parametrize("seed", range(5))
def test_each_greedy_addition_leaves_the_ratio_non_decreasing_and_matches_the_sequential_search(seed):
    g = torch.Generator().manual_seed(seed)
    importances = [torch.sort(torch.rand(n, generator=g) ** 4, descending=True).values for n in (40, 7, 90)]
    costs, numerator, denominator = [3.0, 0.5, 1.2], 5.0, 40.0
    limit = 1000 if seed % 2 else 25
    taken = greedy_additions(numerator, denominator, importances, costs, limit)
    gains, unit = torch.cat(importances).double(), torch.cat([torch.full((len(i),), c) for i, c in zip(importances, costs)])
    ratios = [numerator / denominator]
    for position in taken.tolist():
        numerator, denominator = numerator + float(gains[position]), denominator + float(unit[position])
        ratios.append(numerator / denominator)
    assert all(after >= before for before, after in zip(ratios, ratios[1:]))
    assert 0 < len(taken) <= limit
    starts = torch.tensor([0, 40, 47])
    layers = [int((starts <= p).nonzero().max()) for p in taken.tolist()]
    expected = _sequential_greedy(5.0, 40.0, importances, costs, limit)
    assert [(layer, p - int(starts[layer])) for layer, p in zip(layers, taken.tolist())] == expected
    if len(taken) < limit:  # it stopped because the next candidate would lower the ratio
        rest = [float(gains[p] / unit[p]) for p in range(len(gains)) if p not in set(taken.tolist())]
        assert max(rest) <= ratios[-1]


def test_reconfigure_protects_the_largest_kept_weights_caps_the_count_and_regrows_at_zero():
    g = torch.Generator().manual_seed(3)
    mask = {"a": torch.rand(30, 20, generator=g) < 0.3, "b": torch.rand(50, generator=g) < 0.3}
    weights = {name: torch.where(m, torch.randn(m.shape, generator=g), torch.zeros(())) for name, m in mask.items()}
    importance = {name: torch.rand(m.shape, generator=g).double() for name, m in mask.items()}
    cap = sum(active_counts(mask).values()) + 10
    new_weights, new_mask = reconfigure(weights, mask, {}, importance, {"a": 1.0, "b": 2.0}, 50.0, 0.3, cap)
    assert sum(active_counts(new_mask).values()) <= cap
    for name, kept in mask.items():
        values = weights[name][kept].abs().sort(descending=True).values
        protect = int(kept.sum()) - int(0.3 * int(kept.sum()))
        protected = kept & (weights[name].abs() > values[protect])  # strictly above the cut: no tie to break
        assert bool(new_mask[name][protected].all())
        regrown = new_mask[name] & ~kept
        assert bool((new_weights[name][regrown] == 0).all())
        assert torch.equal(new_weights[name][new_mask[name] & kept], weights[name][new_mask[name] & kept])
        assert bool((new_weights[name][~new_mask[name]] == 0).all())
    assert any(bool((new_mask[n] & ~mask[n]).any()) for n in mask)  # pruned coordinates were taken
    tight = reconfigure(weights, mask, {}, importance, {"a": 1.0, "b": 2.0}, 50.0, 0.3, 0)[1]
    for name, kept in mask.items():  # protected alone exceed the cap: nothing is added (the authors' break)
        assert int(tight[name].sum()) == int(kept.sum()) - int(0.3 * int(kept.sum()))


def test_the_run_keeps_the_cap_accumulates_exactly_since_the_last_reconfiguration_and_protects():
    sim = simulation("prunefl", *SHORT, rounds=5)
    policy, sparsity = sim.experiment.mask_policy, sim.experiment.schedule.phase(1).sparsity
    seen, original = [], policy.server_step

    def spy(ctx, weights, mask, frozen):
        contribution = {name: score.double() * ctx.uploads for name, score in ctx.scores().items()}
        new_weights, new_mask = original(ctx, weights, mask, frozen)
        seen.append((ctx.phase.round, contribution, weights, mask, new_weights, new_mask,
                     {name: acc.clone() for name, acc in policy.accumulator.items()}, policy.accumulated_rounds))
        return new_weights, new_mask

    policy.server_step = spy
    states = list(play(sim))
    cap = _cap(states[0][0].mask, sparsity)
    expected = {name: torch.zeros_like(acc) for name, acc in policy.accumulator.items()}
    since = 0
    for round, contribution, weights, mask, new_weights, new_mask, accumulator, accumulated in seen:
        assert sum(active_counts(new_mask).values()) <= cap, round
        for name, score in contribution.items():
            expected[name] = expected[name] + score
        since += 1
        if round % 2:
            assert accumulated == since and all(torch.equal(accumulator[n], expected[n]) for n in expected), round
            assert all(torch.equal(new_mask[n], mask[n]) for n in mask), round  # no reconfiguration
            continue
        assert accumulated == 0 and all(not acc.any() for acc in accumulator.values()), round
        expected, since = {name: torch.zeros_like(acc) for name, acc in expected.items()}, 0
        decrease = 0.3 * 0.5 ** (round / 10000)
        for name, kept in mask.items():
            values = weights[name][kept].abs().sort(descending=True).values
            protect = int(kept.sum()) - int(decrease * int(kept.sum()))
            if protect < len(values):
                assert bool(new_mask[name][kept & (weights[name].abs() > values[protect])].all()), (round, name)
            assert bool((new_weights[name][new_mask[name] & ~kept] == 0).all()), (round, name)  # regrown at 0
    assert any(not torch.equal(new_mask[n], mask[n]) for _, _, _, mask, _, new_mask, _, _ in seen for n in mask)
    for _, state, _ in states:
        for name, m in state.mask.items():
            assert bool((state.weights[name][~m] == 0).all())


def test_score_uploads_are_counted_in_the_rounds_that_send_them():
    sim = simulation("prunefl", *SHORT, "PruneFL.score_rounds = 1", rounds=3)  # scores in round 2 only
    codec, recorded, train = sim.experiment.uplink_codec, [], sim.experiment.executor.train
    sim.experiment.executor.train = lambda job, tasks, ctx: recorded.append(train(job, tasks, ctx)) or recorded[-1]
    uplinks, sections = [], []
    for before, _, metrics in play(sim):
        link = Link("up", 0, {}, {}, 0, before.mask, sim.schema)
        full = [len(codec.encode(Message(r.weights, r.mask, r.scores), link)) for r in recorded[-1]]
        bare = [len(codec.encode(Message(r.weights, r.mask), link)) for r in recorded[-1]]
        assert metrics["uplink_bytes"] == sum(full)
        uplinks.append(metrics["uplink_bytes"])
        sections.append(sum(full) - sum(bare))
    assert sections[0] == 0 and sections[2] == 0 and sections[1] > 0
    # rounds 1 and 2 upload under the same mask: round 2 is larger by exactly its scores sections
    assert uplinks[1] - uplinks[0] == sections[1]
    masked = sum(m.numel() for m in before.mask.values())
    assert sections[1] > len(recorded[1]) * masked / 8  # at least a bitmask of the scored coordinates each


def test_the_initial_pruning_runs_on_one_client_by_its_rule_and_its_bytes_count():
    sim = simulation("prunefl", *SHORT, rounds=2)
    initial = {name: t.clone() for name, t in sim.model.state_dict().items()}
    state = sim.initial_state()
    discovery, sparsity = sim.experiment.mask_discovery, sim.experiment.schedule.phase(1).sparsity
    assert sum(active_counts(state.mask).values()) <= _cap(state.mask, sparsity)
    assert 1 < discovery.rounds < 12  # stopped by the authors' rule: two unchanged densities in a row
    exp = sim.experiment
    dense = {name: torch.ones_like(m) for name, m in state.mask.items()}
    down = len(exp.downlink_codec.encode(Message(initial, dense), Link("down", 0, {}, {}, 0, dense, sim.schema)))
    up = len(exp.uplink_codec.encode(Message(state.weights, state.mask), Link("up", 0, {}, {}, 0, {}, sim.schema)))
    metrics = sim.discovery_metrics
    assert metrics["discovery_bytes"] == down + up  # the model down once, the pruned model up once
    assert state.cumulative_bytes == metrics["discovery_bytes"] and state.cumulative_flops == metrics["discovery_flops"]
    samples = 64 * discovery.rounds  # one pass over its 64 samples per initial round
    per_sample_dense = 6 * sum(sim.macs.values())
    assert 0 < metrics["discovery_flops"] <= samples * per_sample_dense
    [(_, _, first)] = list(play(sim, 1))
    assert first["discovery_bytes"] == metrics["discovery_bytes"]
    assert first["cumulative_gb"] * 1e9 == pytest.approx(metrics["discovery_bytes"] + first["uplink_bytes"]
                                                         + first["downlink_bytes"])


def test_the_cost_table_charges_bytes_and_flops_per_weight():
    sim = simulation("prunefl", "Experiment.mask_discovery = None", rounds=1)
    policy = sim.experiment.mask_policy
    for name, shape in policy.shapes.items():
        flops = 6 * sim.macs[name] / math.prod(shape) * 375 / 1e9
        assert policy.cost[name] == pytest.approx(8 / 1.44e6 + flops)
    assert policy.cost["conv1.weight"] > policy.cost["fc1.weight"]  # a conv weight is used at every position
    assert policy.fixed_cost == pytest.approx(sum(policy.cost[n] * math.prod(s) for n, s in policy.shapes.items()))


@pytest.mark.parametrize("bad", ["PruneFL.reconfigure_every = 0", "PruneFL.score_rounds = 60",
                                 "PruneFL.max_decrease = 1.0", "PruneFLInitial.samples = 0",
                                 "PruneFLInitial.loss_gate = 0", "FlopsAndBytesCost.flops_per_second = 0"])
def test_bad_settings_fail_in_one_line(bad):
    with pytest.raises(ConfigError) as error:
        compose("prunefl", ["demo"], [bad])
    assert first_line(error.value).startswith(bad.split(" =")[0] + "=")  # what the CLI prints: one line, naming it


def test_a_discovery_client_that_does_not_exist_fails_in_one_line():
    with pytest.raises(ConfigError, match="discovery client 99 does not exist"):
        simulation("prunefl", *SHORT, "PruneFLInitial.client = 99").initial_state()
