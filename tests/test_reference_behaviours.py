"""Opt-in reference behaviours (never defaults): PFFDST's schedule as the reference code executes it, and stage 2
started from the stage-1 model with the best test accuracy (model selection on the test set)."""

from __future__ import annotations

import pytest
from helpers import play, simulation

from fl_sparse.engine.loop import run_rounds
from fl_sparse.parts.schedules import TwoStage
from fl_sparse.sparse.mask_ops import active_counts


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

    from fl_sparse.core.interfaces import RoundContext
    from fl_sparse.parts.mask_policies import ClientReadjust
    from fl_sparse.parts.schedules import Readjusting
    from fl_sparse.training.client import generator

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


# --------------------------------------------------------------- stage 2 from the best stage-1 model (test set)

def test_freeze_policy_picks_the_best_evaluated_model_earliest_on_ties_and_is_off_by_default():
    import torch

    from fl_sparse.core.interfaces import Phase, RoundContext
    from fl_sparse.parts.freezing import FreezeAtStage

    def model(value):
        return {"w": torch.full((3,), float(value))}, {"w": torch.ones(3, dtype=torch.bool)}

    switch = RoundContext(Phase(5, 0, 0.9, 0.0, False, False, True, 1.0), torch.Generator())
    never = lambda: pytest.fail("the default must not evaluate anything")  # noqa: E731
    assert FreezeAtStage().stage_start_model(switch, *model(5), never)[0]["w"][0] == 5

    policy = FreezeAtStage(reference_stage2_from_best_test=True)
    for r, accuracy in [(1, 0.2), (2, 0.5), (3, 0.5), (4, 0.3)]:
        policy.observe(r, *model(r), {"local_accuracy": accuracy})
    restored = FreezeAtStage(reference_stage2_from_best_test=True)
    restored.load_state_dict(policy.state_dict())  # what a checkpoint keeps
    for chooser in (policy, restored):
        with pytest.warns(UserWarning, match="round 2 .*TEST set"):
            weights, _ = chooser.stage_start_model(switch, *model(5), lambda: {"local_accuracy": 0.5})
        assert weights["w"][0] == 2  # round 3 ties with round 2 and the last model: the earliest wins
    policy.observe(6, *model(6), {"local_accuracy": 0.1})  # stage 2 selects among its own models only
    with pytest.warns(UserWarning, match="round 5"):
        assert policy.stage_start_model(switch, *model(5), lambda: {"local_accuracy": 0.2})[0]["w"][0] == 5


class RoundKeyedEvaluation:
    """Stands in for the test-set evaluation: stage-1 accuracies 30, 60, 40 % after rounds 1-3 and 50 % for the
    last stage-1 model (round 4), evaluated at the switch, so stage 2 must start from round 2's model."""

    def __init__(self, rounds_done: int = 0):
        self.rounds_done, self.calls = rounds_done, {}

    def __call__(self, model, weights, data):
        nth = self.calls[self.rounds_done] = self.calls.get(self.rounds_done, -1) + 1
        r = self.rounds_done + 1
        accuracy = 0.5 if (r, nth) == (4, 0) else {1: 0.3, 2: 0.6, 3: 0.4}.get(r, 0.2)
        return {"test_accuracy": accuracy, "local_accuracy": accuracy, "test_loss": 1.0}

    def callback(self, event):
        self.rounds_done = event.round


def test_pffdst_stage_2_starts_from_the_best_stage_1_model_and_resumes_exactly(tmp_path, monkeypatch):
    import torch

    from fl_sparse.engine import server as engine
    from fl_sparse.runtime import checkpoint

    bindings = ("FreezeAtStage.reference_stage2_from_best_test = True", "Experiment.eval_every = 1")
    evaluation = RoundKeyedEvaluation()
    monkeypatch.setattr(engine, "evaluate", evaluation)
    sim = simulation("pffdst", *bindings, rounds=8)
    states = {}
    saver = checkpoint.Checkpointer(tmp_path, 3, sim, "config")
    callbacks = [evaluation.callback, lambda e: states.__setitem__(e.round, e.state),
                 lambda e: saver(e) if e.round == 3 else None]
    with pytest.warns(UserWarning, match="round 4: stage 2 starts from the global model of round 2"):
        final = run_rounds(sim, callbacks=callbacks).state
    chosen = states[2]
    for name, frozen in states[4].frozen.items():
        assert torch.equal(frozen, chosen.mask[name] & (chosen.weights[name] != 0)), name
        assert torch.equal(states[4].weights[name][frozen], chosen.weights[name][frozen]), name
    assert any(not torch.equal(states[3].weights[n], chosen.weights[n]) for n in chosen.weights)

    # Resumed after round 3 (round 2's model is only in the checkpoint), the run ends bitwise the same.
    evaluation = RoundKeyedEvaluation(rounds_done=3)
    monkeypatch.setattr(engine, "evaluate", evaluation)
    resumed_sim = simulation("pffdst", *bindings, rounds=8)
    state, meta = checkpoint.load(checkpoint.latest(tmp_path))
    with pytest.warns(UserWarning, match="round 2"):
        resumed = run_rounds(resumed_sim, checkpoint.apply(resumed_sim, state, meta), callbacks=[evaluation.callback]).state
    for name in final.weights:
        assert torch.equal(resumed.weights[name], final.weights[name]), name
