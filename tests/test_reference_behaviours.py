"""Opt-in reference behaviours (never defaults): PFFDST's schedule as the reference code executes it, and stage 2
started from the stage-1 model with the best test accuracy (model selection on the test set)."""

from __future__ import annotations

import pytest

from fl_sparse.parts.schedules import TwoStage
from fl_sparse.sparse.mask_ops import active_counts
from helpers import play, simulation


def phases(schedule: TwoStage) -> dict[str, list[int]]:
    rounds = range(1, schedule.total_rounds + 1)
    return {kind: [r for r in rounds if getattr(schedule.phase(r), kind)] for kind in ("readjust", "finalize", "stage_ends")}


@pytest.mark.parametrize("rounds, finalize", [(350, 88), (400, 100)])
def test_reference_schedule_readjusts_over_a_quarter_of_all_rounds_and_never_in_stage_2(rounds, finalize):
    s, f = 0.8, 0.05
    schedule = TwoStage(s, rounds, reference_schedule=True)
    # The reference prunes at the start of its 0-based round rounds // 4: after our round 350 // 4 + 1 = 88
    # (87 is not a readjustment round), after our round 100 for 400 rounds.
    assert phases(schedule) == {"readjust": list(range(10, finalize, 10)), "finalize": [finalize],
                                "stage_ends": [rounds // 2]}
    assert schedule.phase(1).sparsity == pytest.approx(0.9) and schedule.phase(1).differential == pytest.approx(f)
    assert schedule.next_stage_sparsity(rounds // 2) == pytest.approx(s - f)  # grown to 1 - s + f ...
    for r in range(rounds // 2 + 1, rounds + 1):  # ... and kept there to the end: no prune back to s
        assert schedule.phase(r).sparsity - schedule.phase(r).differential == pytest.approx(s - f)


def test_the_paper_schedule_is_still_the_default():
    schedule = TwoStage(0.8, 350)
    assert not schedule.reference_schedule
    assert phases(schedule) == {"readjust": [10, 20, 30, 40, 185, 195, 205, 215], "finalize": [43, 218],
                                "stage_ends": [175]}
    assert schedule.phase(350).sparsity == pytest.approx(0.8) and schedule.phase(350).differential == pytest.approx(0.05)


def test_pffdst_with_the_reference_schedule_keeps_stage_2_at_one_minus_s_plus_f():
    # 12 rounds, readjust every 2: the differential phase ends at round 12 // 4 + 1 = 4; stage 2 starts after 6.
    sim = simulation("pffdst", "TwoStage.readjust_every = 2", "TwoStage.reference_schedule = True", rounds=12)
    counts, s = sim.experiment.mask_policy.counts, 0.8
    s1, f = (1 + s) / 2, (1 - s) / 4  # as the schedule computes them, so that the counts match exactly
    expected_after = {1: s1 - f, 2: s1 - f, 3: s1 - f, 4: s1, 5: s1, **{r: s - f for r in range(6, 13)}}
    for _, state, _ in play(sim):
        assert active_counts(state.mask) == counts(expected_after[state.round]), f"round {state.round}"


def test_feddst_server_random_tie_break_is_opt_in_seeded_and_exact():
    """The union holds 100 non-zero weights and 900 regrown zeros; the target keeps 200, so 100 zeros stay."""
    import torch

    from fl_sparse.interfaces import RoundContext
    from fl_sparse.parts.mask_policies import ClientReadjust
    from fl_sparse.parts.schedules import Readjusting
    from fl_sparse.training import generator

    weights = {"fc.weight": torch.zeros(40, 25)}
    weights["fc.weight"].view(-1)[torch.arange(100) * 10 + 3] = 1.0
    mask = {"fc.weight": torch.ones(40, 25, dtype=torch.bool)}
    kept = {}
    for tie_break in (False, True, True):
        policy = ClientReadjust(random_tie_break=tie_break)
        policy.shapes, policy.schedule = {"fc.weight": (40, 25)}, Readjusting(0.8, 10)
        ctx = RoundContext(policy.schedule.phase(3), generator(0, "mask", 3))
        _, new_mask = policy.server_step(ctx, weights, mask, {})
        assert int(new_mask["fc.weight"].sum()) == policy.counts(0.8)["fc.weight"] == 200
        assert torch.all(new_mask["fc.weight"][weights["fc.weight"] != 0])
        kept.setdefault(tie_break, []).append((new_mask["fc.weight"] & (weights["fc.weight"] == 0)).flatten().nonzero())
    assert kept[False][0].max() < 250  # the default: the lowest flat indices, as before
    assert torch.equal(kept[True][0], kept[True][1])  # seeded by the round: the same draw again
    assert kept[True][0].max() > 500 and not torch.equal(kept[True][0], kept[False][0])
