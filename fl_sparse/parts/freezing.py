"""Freeze policies: which non-zero weights stop being trained and transmitted."""

from __future__ import annotations

import warnings

import gin
import torch

from fl_sparse.core.interfaces import FreezePolicy

BEST_TEST_METRIC = "local_accuracy"  # the reference's selection metric: the mean of the clients' test accuracies


@gin.configurable
class NoFreeze(FreezePolicy):
    """Nothing is ever frozen."""

    def server_step(self, ctx, weights, mask, frozen):
        return frozen


@gin.configurable
class FreezeAtStage(FreezePolicy):
    """PFFDST parameter freezing (Algorithm 2): when a stage of the schedule ends, every non-zero
    weight of the stage's model is frozen for the rest of the run. Frozen weights are never trained,
    never pruned and sent to each client only once. The stage's model is the last aggregate under the mask
    the stage trained (the one its last round's clients were sent): coordinates that clients only proposed in
    that round (FLASH's JointDST moves masks on the clients, flash_pf.gin) are not frozen; the mask policy
    keeps or drops them for the next stage. Where clients keep the server's mask (PFFDST) the two are the same.

    ``reference_stage2_from_best_test = True`` (opt-in, never a default) is the reference code's behaviour
    and is MODEL SELECTION ON THE TEST SET: at the stage switch the reference loads ``best_params``, the
    global model of the ending stage with the highest mean client test accuracy (strictly higher than every
    earlier one, so the earliest round wins a tie), then freezes and grows from it. Here the candidates are
    the models evaluated after the stage's rounds (by ``local_accuracy``, the reference's metric, which equals
    the test-set accuracy under this library's partition) and the stage's last aggregated model, evaluated
    at the switch. Algorithm 2 continues from the last model, which is the default. Each switch is logged
    as a warning that names the chosen round.
    """

    def __init__(self, reference_stage2_from_best_test: bool = False):
        self.reference_stage2_from_best_test = bool(reference_stage2_from_best_test)
        self.best: dict | None = None  # {"accuracy", "round", "weights", "mask"} of the best evaluated model
        self.started_from_best = False  # set by stage_start_model for the server_step that follows it

    def server_step(self, ctx, weights, mask, frozen):
        if not ctx.phase.stage_ends:
            return frozen
        # A best model's mask is a global one already; otherwise the aggregate's mask may hold clients' proposals.
        trained = mask if self.started_from_best or ctx.sent_mask is None else ctx.sent_mask
        self.started_from_best = False
        new_frozen = {}
        for name, active in mask.items():
            nonzero = active & trained[name] & (weights[name] != 0)
            new_frozen[name] = nonzero | frozen[name] if name in frozen else nonzero
        return new_frozen

    def observe(self, round, weights, mask, evaluation):
        accuracy = evaluation.get(BEST_TEST_METRIC)
        if self.reference_stage2_from_best_test and accuracy is not None and (
                self.best is None or accuracy > self.best["accuracy"]):
            self.best = {"accuracy": float(accuracy), "round": int(round),
                         "weights": {k: v.clone() for k, v in weights.items()},
                         "mask": {k: v.clone() for k, v in mask.items()}}

    def stage_start_model(self, ctx, weights, mask, evaluate):
        if not (self.reference_stage2_from_best_test and ctx.phase.stage_ends):
            return weights, mask
        best, self.best = self.best, None  # the next stage selects among its own models
        last = evaluate()[BEST_TEST_METRIC]
        if best is None or last > best["accuracy"]:
            chosen, weights_mask = (ctx.phase.round, last), (weights, mask)
        else:
            chosen, weights_mask = (best["round"], best["accuracy"]), (best["weights"], best["mask"])
            self.started_from_best = True
        warnings.warn(f"round {ctx.phase.round}: stage {ctx.phase.stage + 2} starts from the global model of round "
                      f"{chosen[0]} ({BEST_TEST_METRIC} {chosen[1]:.4f}; the stage's last model has {last:.4f}): "
                      "FreezeAtStage.reference_stage2_from_best_test selects the model on the TEST set, as the "
                      "reference code does", stacklevel=2)
        return weights_mask

    def state_dict(self):
        if self.best is None:
            return {}
        return {"best/accuracy": torch.tensor(self.best["accuracy"], dtype=torch.float64),
                "best/round": torch.tensor(self.best["round"], dtype=torch.int64),
                **{f"best/weights/{k}": v for k, v in self.best["weights"].items()},
                **{f"best/mask/{k}": v for k, v in self.best["mask"].items()}}

    def load_state_dict(self, state):
        if "best/accuracy" not in state:
            self.best = None
            return

        def group(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        self.best = {"accuracy": float(state["best/accuracy"]), "round": int(state["best/round"]),
                     "weights": group("best/weights/"), "mask": group("best/mask/")}
