"""The sparse algorithms do what their papers say: exact densities at every step, frozen weights
untouched, stage-2 payloads carrying only the unfrozen part, and FedDST never clobbering a weight."""

from pathlib import Path

import pytest
import torch
from helpers import play, simulation

from fl_sparse.config.gin_files import ALGORITHMS
from fl_sparse.core.interfaces import Link, Message, RoundContext
from fl_sparse.engine.loop import run_rounds
from fl_sparse.parts.codecs import AutoSparse, FreezeAware
from fl_sparse.parts.mask_policies import ClientReadjust
from fl_sparse.sparse.mask_ops import active_counts
from fl_sparse.training.client import generator

ALGORITHM_FILES = sorted(path.stem for path in Path(ALGORITHMS).glob("*.gin"))

# 12 rounds = two stages of 6; readjust after local rounds 2, prune to s and fix the mask after local round 4.
PFFDST_SHORT = ["TwoStage.readjust_every = 2", "TwoStage.readjust_until = 4"]


# PruneFL's initial pruning runs up to 1,000 rounds on one client by its authors' rule; here a few (tests/test_prunefl.py
# runs it to its stop).
SHORT_DISCOVERY = {"prunefl": ["PruneFLInitial.max_rounds = 3", "PruneFLInitial.samples = 64"]}


@pytest.mark.parametrize("algorithm", ALGORITHM_FILES)
def test_every_algorithm_file_runs_two_rounds(algorithm):
    sim = simulation(algorithm, *SHORT_DISCOVERY.get(algorithm, ()), rounds=2)
    state = run_rounds(sim).state
    assert state.round == 2 and state.cumulative_bytes > 0
    for name, m in state.mask.items():
        assert torch.all(state.weights[name][~m] == 0), name


def test_pffdst_densities_freezing_and_stage_switch_follow_algorithm_2():
    sim = simulation("pffdst", *PFFDST_SHORT, rounds=12)
    policy, s = sim.experiment.mask_policy, 0.8
    s1, f = (1 + s) / 2, (1 - s) / 4
    counts = lambda sparsity: policy.counts(sparsity)  # noqa: E731
    expected_after = {1: s1 - f, 2: s1 - f, 3: s1 - f, 4: s1, 5: s1, 6: s - f,
                      7: s - f, 8: s - f, 9: s - f, 10: s, 11: s, 12: s}
    state = sim.initial_state()
    assert active_counts(state.mask) == counts(s1 - f)
    frozen_values = None
    for before, state, metrics in play(sim):
        r = state.round
        assert active_counts(state.mask) == counts(expected_after[r]), f"round {r}"
        assert metrics["stage"] == (0 if r <= 6 else 1)
        if r == 2 or r == 8:  # a readjustment: same density, different mask
            assert any(not torch.equal(before.mask[n], state.mask[n]) for n in state.mask)
        if r in (1, 3, 5, 7, 9, 11):
            assert all(torch.equal(before.mask[n], state.mask[n]) for n in state.mask)
        if r < 6:
            assert state.frozen == {}
        if r == 6:  # freeze every non-zero weight of stage 1, then grow at random to s2 - f2
            frozen_values = {n: state.weights[n][state.frozen[n]].clone() for n in state.frozen}
            for n, frozen in state.frozen.items():
                # grown weights start at 0, so the frozen set is exactly the non-zeros of the mask
                assert torch.equal(frozen, state.mask[n] & (state.weights[n] != 0))
            assert active_counts(state.frozen) == counts(s1)  # every stage-1 weight was non-zero
            assert metrics["frozen_fraction"] > 0.0
        if r > 6:
            for n in state.frozen:
                assert torch.equal(state.frozen[n], before.frozen[n])
                assert torch.equal(state.weights[n][state.frozen[n]], frozen_values[n])  # bitwise unchanged
        for n, m in state.mask.items():
            assert torch.all(state.weights[n][~m] == 0)


def test_stage_two_uplink_carries_only_the_unfrozen_coordinates():
    sim = simulation("pffdst", *PFFDST_SHORT, rounds=12)
    *_, (_, state, _) = play(sim, 10)  # stage 2, after its final prune to s2
    s, s1 = 0.8, 0.9
    link = Link("up", 0, state.frozen, state.weights, 1)
    message = Message(state.weights, state.mask)
    freeze_aware = FreezeAware()
    sent = freeze_aware.decode(freeze_aware.encode(message, link), link)
    freeze_aware.delivered(link)
    no_freeze = len(AutoSparse().encode(message, Link("up", 0, {}, {}, 0)))
    stage_two = len(freeze_aware.encode(message, link))
    unfrozen = sum(int((state.mask[n] & ~state.frozen[n]).sum()) for n in state.mask)
    active = sum(int(m.sum()) for m in state.mask.values())
    assert unfrozen / active == pytest.approx((s1 - s) / (1 - s), abs=0.01)
    assert stage_two < 0.65 * no_freeze  # values halve; the bitmask of each masked tensor stays
    assert all(torch.equal(sent.tensors[n], state.weights[n]) for n in state.weights)


def test_pffdst_run_switches_stage_and_uplink_falls(tmp_path, monkeypatch):
    sim = simulation("pffdst", "TwoStage.readjust_every = 1", rounds=4)
    rounds = list(play(sim))
    stages = [metrics["stage"] for *_, metrics in rounds]
    uplink = [metrics["uplink_bytes_per_client"] for *_, metrics in rounds]
    assert stages == [0, 0, 1, 1]
    assert uplink[3] < uplink[1]
    assert rounds[-1][1].frozen and rounds[-1][2]["frozen_fraction"] > 0


def test_feddst_client_readjustment_never_changes_an_active_weight():
    sim = simulation("feddst", "Readjusting.readjust_every = 1", rounds=4)
    policy: ClientReadjust = sim.experiment.mask_policy
    policy.ratio = 0.3
    state = sim.initial_state()
    weights = {n: torch.randn_like(w) * (state.mask[n] if n in state.mask else 1) for n, w in state.weights.items()}
    phase = sim.experiment.schedule.phase(1)
    assert phase.readjust
    grads = {n: torch.randn_like(w) for n, w in weights.items()}
    new_weights, new_mask = policy.client_step(RoundContext(phase, generator(0, "mask", 1)), weights,
                                               state.mask, {}, lambda: grads)
    assert active_counts(new_mask) == active_counts(state.mask)
    for n, old in state.mask.items():
        kept, grown = old & new_mask[n], new_mask[n] & ~old
        assert torch.equal(new_weights[n][kept], weights[n][kept])
        assert torch.all(new_weights[n][grown] == 0)
        assert int(grown.sum()) == int((old & ~new_mask[n]).sum())  # as many grown as pruned
        assert torch.all(new_weights[n][~new_mask[n]] == 0)
        # grown coordinates are the largest |grad| among those inactive before the readjustment
        if grown.any():
            worst_grown = grads[n][grown].abs().min()
            assert torch.all(grads[n][~old & ~new_mask[n]].abs() <= worst_grown)
    assert sum(int((new_mask[n] & ~state.mask[n]).sum()) for n in state.mask) > 1000


def test_feddst_server_keeps_the_target_density():
    sim = simulation("feddst", "Readjusting.readjust_every = 1", "ClientReadjust.ratio = 0.2", rounds=3)
    target = sim.experiment.mask_policy.counts(0.8)
    for _, state, _ in play(sim):
        assert active_counts(state.mask) == target


def test_masked_weights_stay_exactly_zero_through_local_training():
    sim = simulation("random_mask", rounds=1)
    state = sim.initial_state()
    from fl_sparse.training.client import ClientTask

    task = ClientTask(0, state.weights, state.mask, {}, sim.data.client_train[0], 0, 1)
    ctx = RoundContext(sim.experiment.schedule.phase(1), generator(0, "mask", 1))
    [result] = sim.experiment.executor.train(sim.job, [task], ctx)
    for n, m in state.mask.items():
        assert torch.all(result.weights[n][~m] == 0)
        assert not torch.equal(result.weights[n][m], state.weights[n][m])


def test_flops_scale_with_each_layers_density():
    dense = simulation("fedavg", rounds=1)
    sparse = simulation("random_mask", rounds=1)
    (_, _, dense_metrics), = play(dense)
    (_, _, sparse_metrics), = play(sparse)
    assert sum(dense.macs.values()) == 2_293_320  # LeNet's forward MACs per sample (SPEC section 5)
    mask = sparse.initial_state().mask
    expected = sum(macs * float(mask[n].float().mean()) for n, macs in sparse.macs.items()) / sum(sparse.macs.values())
    assert sparse_metrics["flops"] / dense_metrics["flops"] == pytest.approx(expected, rel=1e-9)
