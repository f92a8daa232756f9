"""Sparsity schedules: plain functions of the round index, shared by mask and freeze policies.

Rounds are 1-based as in the paper. Within a stage of length R, the mask is readjusted after every
round r with ``r % readjust_every == 0 and r < readjust_until``; at ``r == readjust_until`` it is pruned
to the stage's target sparsity and fixed (Algorithm 1 of the PFFDST paper).
"""

from __future__ import annotations

import gin

from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import Phase, SparsitySchedule


def _check_stage(name: str, sparsity: float, differential: float, stage_rounds: int,
                 readjust_every: int, readjust_until: int) -> None:
    check(0.0 <= sparsity < 1.0, f"{name}: sparsity {sparsity} is outside [0, 1); use e.g. --sparsity 0.8")
    check(0.0 <= differential <= sparsity,
          f"{name}: differential sparsity f={differential} must lie in [0, s={sparsity}] so that s - f >= 0")
    check(differential <= 1.0 - sparsity,
          f"{name}: differential sparsity f={differential} exceeds 1 - s = {1.0 - sparsity:g}; use f <= 1 - s")
    check(stage_rounds >= 1, f"{name}: {stage_rounds} rounds per stage; give at least 1 round per stage")
    check(readjust_every >= 1, f"{name}.readjust_every={readjust_every} must be >= 1 (the paper uses 10)")
    check(0 <= readjust_until <= stage_rounds,
          f"{name}.readjust_until={readjust_until} must lie in [0, {stage_rounds}] (rounds of one stage)")


@gin.configurable
class Constant(SparsitySchedule):
    """A fixed sparsity with no readjustment (RandomMask, and dense runs with sparsity 0)."""

    def __init__(self, sparsity: float = gin.REQUIRED):
        _check_stage("Constant", sparsity, 0.0, 1, 1, 0)
        self.sparsity = sparsity

    def phase(self, round: int) -> Phase:
        return Phase(round, 0, self.sparsity, 0.0, False, False, False, 1.0)


@gin.configurable
class Readjusting(SparsitySchedule):
    """One stage: readjust every ``readjust_every`` rounds until ``readjust_until``, then fix the mask.

    ``differential`` is the PFFDST differential sparsity f (0 for FedDST, which keeps density 1 - s;
    None for f = (1 - s) * ``differential_ratio``, the paper's (1 - s)/4 by default; the PFFDST authors' code
    runs w/o PF with 0.5, the readjustment ratio the paper recommends). ``readjust_until`` defaults to
    ``rounds * until_fraction``.
    """

    def __init__(self, sparsity: float = gin.REQUIRED, rounds: int = gin.REQUIRED,
                 differential: float | None = 0.0, readjust_every: int = 10, readjust_until: int | None = None,
                 until_fraction: float = 0.25, differential_ratio: float = 0.25):
        check(0.0 < differential_ratio <= 1.0, f"Readjusting.differential_ratio={differential_ratio} must lie "
                                               "in (0, 1]: f = (1 - s) * ratio")
        if differential is None:
            differential = (1.0 - sparsity) * differential_ratio
        self.stage_rounds = self.total_rounds = rounds
        self.readjust_until = (max(1, int(rounds * until_fraction)) if readjust_until is None
                               else readjust_until)
        _check_stage(type(self).__name__, sparsity, differential, rounds, readjust_every, self.readjust_until)
        self.sparsity, self.differential, self.readjust_every = sparsity, differential, readjust_every

    def _stage_phase(self, round: int, local: int, stage: int, sparsity: float, differential: float,
                     last_stage: bool) -> Phase:
        readjust = local % self.readjust_every == 0 and local < self.readjust_until
        finalize = local == self.readjust_until
        stage_ends = local == self.stage_rounds and not last_stage
        progress = min(1.0, local / max(1, self.readjust_until))
        return Phase(round, stage, sparsity, differential, readjust, finalize, stage_ends, progress)

    def phase(self, round: int) -> Phase:
        return self._stage_phase(round, round, 0, self.sparsity, self.differential, True)


@gin.configurable
class TwoStage(Readjusting):
    """PFFDST's two stages (Algorithm 2): stage 1 at s1 = (1+s)/2, stage 2 at s2 = s, each ``rounds/2``
    long, with differential sparsity f1 = f2 = (1-s)/4 unless bound otherwise.

    ``reference_schedule = True`` (opt-in, never a default) runs the schedule as the public reference code
    executes it rather than as the paper writes it. Its configuration tests flags with ``~`` on Python
    bools (``~True == -2``, truthy), so for PFFDST all three configuration blocks run and the last wins
    (SPEC section 5): the differential phase lasts a quarter of *all* rounds, not of a stage (SMR every
    ``readjust_every`` rounds until round ``rounds // 4``, then the prune to s1; the reference prunes at
    the start of its 0-based round ``rounds // 4``, which is after our round ``rounds // 4`` when that is a
    multiple of ``readjust_every`` and after round ``rounds // 4 + 1`` otherwise); stage 2 neither
    readjusts nor prunes back to s2: it keeps the density 1 - s + f it grew to at the stage switch until
    the end. The reference's f is (1 - s1)/2 for its ``--sparsity`` s1, which is this schedule's default
    f = (1 - s)/4. This is what the reference runs for PFFDST (``--freeze --server-readjustment``). For
    PFFDST w/o SMR (``--freeze`` alone) only the second block runs there, so this flag does not describe it.
    """

    def __init__(self, sparsity: float = gin.REQUIRED, rounds: int = gin.REQUIRED,
                 stage1_sparsity: float | None = None, differential: float | None = None,
                 readjust_every: int = 10, readjust_until: int | None = None, until_fraction: float = 0.25,
                 reference_schedule: bool = False, differential_ratio: float = 0.25):
        check(0.0 < differential_ratio <= 1.0, f"TwoStage.differential_ratio={differential_ratio} must lie in "
                                               "(0, 1]: f = (1 - s) * ratio")
        stage1 = (1.0 + sparsity) / 2.0 if stage1_sparsity is None else stage1_sparsity
        f = (1.0 - sparsity) * differential_ratio if differential is None else differential
        check(0.0 <= sparsity < 1.0, f"TwoStage: sparsity {sparsity} is outside [0, 1); use e.g. --sparsity 0.8")
        check(stage1 > sparsity, f"TwoStage.stage1_sparsity={stage1} must be > s2={sparsity}: stage 2 "
                                 "trains the weights added on top of the frozen stage-1 ones")
        check(f <= 1.0 - sparsity, f"TwoStage.differential={f:g} exceeds 1 - s = {1.0 - sparsity:g}")
        check(rounds >= 2, f"TwoStage: {rounds} rounds cannot hold two stages; use --rounds 2 or more")
        self.reference_schedule = bool(reference_schedule)
        if self.reference_schedule:
            check(readjust_until is None, "TwoStage.reference_schedule fixes the differential phase to the "
                                          "reference's rounds // 4; unbind TwoStage.readjust_until")
            quarter = rounds // 4
            readjust_until = quarter if quarter % readjust_every == 0 else quarter + 1
        super().__init__(stage1, rounds // 2, f, readjust_every, readjust_until, until_fraction)
        self.stage1_sparsity, self.stage2_sparsity, self.total_rounds = stage1, sparsity, rounds
        _check_stage("TwoStage (stage 2)", sparsity, f, rounds - rounds // 2, readjust_every,
                     self.readjust_until)

    def phase(self, round: int) -> Phase:
        if round <= self.stage_rounds:
            return self._stage_phase(round, round, 0, self.stage1_sparsity, self.differential, False)
        if self.reference_schedule:  # the reference's stage 2: fixed at s2 - f to the end
            return Phase(round, 1, self.stage2_sparsity - self.differential, 0.0, False, False, False, 1.0)
        return self._stage_phase(round, round - self.stage_rounds, 1, self.stage2_sparsity,
                                 self.differential, True)
