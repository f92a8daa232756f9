"""Properties of the exact prune / grow primitives (fl_sparse.sparse.mask_ops), checked against a plain-Python
reference of the documented rule: keep / grow the highest scores, ties to the lower flat index."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from codec_helpers import bits
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_sparse.sparse import mask_ops
from fl_sparse.sparse.budgets import ERK, Uniform

pytestmark = pytest.mark.property

# Few distinct magnitudes so that ties (including +0.0 vs -0.0) are common; plus arbitrary float32 values.
TIE_VALUES = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0]
values = st.one_of(st.sampled_from(TIE_VALUES), st.floats(width=32, allow_nan=False))
small_shape = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5).filter(lambda s: math.prod(s) <= 160)


@st.composite
def sparse_state(draw, max_tensors: int = 3):
    """(weights, mask, frozen, names): 1-3 float32 tensors with a random mask and a frozen subset of it.
    Weights outside the mask are left arbitrary on purpose, so that 'set to exactly 0' is observable."""
    count = draw(st.integers(1, max_tensors))
    weights, mask, frozen = {}, {}, {}
    for i in range(count):
        name = f"layer{i}.weight"
        shape = draw(small_shape)
        weights[name] = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=values)))
        mask[name] = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
        if draw(st.booleans()):
            frozen[name] = mask[name] & torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    return weights, mask, frozen


def counts_for(draw, mask) -> dict[str, int]:
    return {name: draw(st.integers(0, m.numel() + 1)) for name, m in mask.items()}


def reference_top(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> set[int]:
    """The k highest scores among eligible flat positions; equal scores: lower index first."""
    flat_scores, flat_eligible = scores.flatten().tolist(), eligible.flatten().tolist()
    positions = sorted((i for i, ok in enumerate(flat_eligible) if ok), key=lambda i: (-flat_scores[i], i))
    return set(positions[:max(0, k)])


def as_mask(positions: set[int], like: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros(like.numel(), dtype=torch.bool)
    flat[sorted(positions)] = True
    return flat.view_as(like)


def snapshot(tensors):
    return {name: t.clone() for name, t in tensors.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if a[name].dtype == torch.bool:
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.equal(bits(a[name]), bits(b[name])), name


# ------------------------------------------------------------------------------------------------ prune_to

@given(state=sparse_state(), data=st.data(), custom_scores=st.booleans())
def test_prune_keeps_exactly_the_top_k_with_frozen_always_kept(state, data, custom_scores):
    weights, mask, frozen = state
    counts = counts_for(data.draw, mask)
    scores = ({name: torch.from_numpy(data.draw(hnp.arrays(np.float32, m.shape, elements=st.sampled_from(TIE_VALUES))))
               for name, m in mask.items()} if custom_scores else None)
    before = (snapshot(weights), snapshot(mask), snapshot(frozen))
    new_weights, new_mask = mask_ops.prune_to(weights, mask, counts, frozen, scores)
    assert_same(weights, before[0]), assert_same(mask, before[1]), assert_same(frozen, before[2])  # pure
    assert new_weights.keys() == weights.keys() and new_mask.keys() == mask.keys()
    for name, active in mask.items():
        kept, w, nw = new_mask[name], weights[name], new_weights[name]
        locked = frozen.get(name, torch.zeros_like(active))
        n_active, n_locked, k = int(active.sum()), int(locked.sum()), counts[name]
        if n_active <= k:
            assert torch.equal(kept, active) and torch.equal(bits(nw), bits(w)), "nothing to prune"
            continue
        assert int(kept.sum()) == max(k, n_locked)  # == min(k, active) unless the frozen part alone exceeds k
        score = scores[name] if scores else w.abs()
        expected = as_mask(reference_top(score, active & ~locked, k - n_locked), active) | locked
        assert torch.equal(kept, expected), "not the top-k by score with ties to the lower index"
        assert not torch.any(kept & ~active) and torch.all(kept[locked])
        assert torch.equal(bits(nw)[kept], bits(w)[kept]), "kept (and frozen) values must be bitwise unchanged"
        assert torch.all(bits(nw)[~kept] == 0), "dropped and inactive weights must be exactly +0.0"


@given(state=sparse_state(), data=st.data())
def test_prune_is_idempotent(state, data):
    weights, mask, frozen = state
    counts = counts_for(data.draw, mask)
    once = mask_ops.prune_to(weights, mask, counts, frozen)
    twice = mask_ops.prune_to(*once, counts, frozen)
    assert_same(twice[0], once[0])
    assert_same(twice[1], once[1])


def test_prune_tie_break_prefers_the_lower_flat_index():
    weights = {"w": torch.tensor([[1.0, -2.0, 2.0], [-0.0, 2.0, 0.0]])}
    mask = {"w": torch.ones(2, 3, dtype=torch.bool)}
    _, kept = mask_ops.prune_to(weights, mask, {"w": 2})
    assert kept["w"].flatten().tolist() == [False, True, True, False, False, False]
    _, kept = mask_ops.prune_to(weights, mask, {"w": 5})  # the +0.0 / -0.0 tie: index 3 beats index 5
    assert kept["w"].flatten().tolist() == [True, True, True, True, True, False]


@given(state=sparse_state(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_prune_with_a_random_tie_break_keeps_exact_counts_and_redraws_only_the_ties(state, data, seed):
    weights, mask, frozen = state
    counts = counts_for(data.draw, mask)
    by_index = mask_ops.prune_to(weights, mask, counts, frozen)
    by_draw = mask_ops.prune_to(weights, mask, counts, frozen, tie_break=torch.Generator().manual_seed(seed))
    again = mask_ops.prune_to(weights, mask, counts, frozen, tie_break=torch.Generator().manual_seed(seed))
    assert_same(by_draw[0], again[0]), assert_same(by_draw[1], again[1])  # seeded: the same draw again
    for name, active in mask.items():
        kept, w, nw = by_draw[1][name], weights[name], by_draw[0][name]
        locked = frozen.get(name, torch.zeros_like(active))
        assert int(kept.sum()) == int(by_index[1][name].sum()), "the same exact count as the index tie-break"
        assert not torch.any(kept & ~active) and torch.all(kept[locked])
        changed = kept ^ by_index[1][name]
        # Only coordinates tied at the cut can differ: the same number swapped in as out, all of one score.
        assert int((changed & kept).sum()) == int((changed & ~kept).sum())
        assert len(set(w.abs()[changed].tolist())) <= 1
        if not changed.any():
            assert torch.equal(bits(nw), bits(by_index[0][name]))
        else:
            assert torch.equal(bits(nw)[kept], bits(w)[kept]) and torch.all(bits(nw)[~kept] == 0)


def test_random_tie_break_spreads_the_kept_zeros_over_the_tensor():
    """FedDST's case: 10 non-zero weights and 990 zeros (regrown, averaged to 0); keep 50."""
    weights = {"w": torch.zeros(1000)}
    weights["w"][torch.arange(10) * 100 + 7] = 1.0
    mask = {"w": torch.ones(1000, dtype=torch.bool)}
    _, by_index = mask_ops.prune_to(weights, mask, {"w": 50})
    _, by_draw = mask_ops.prune_to(weights, mask, {"w": 50}, tie_break=torch.Generator().manual_seed(0))
    zeros_by_index = (by_index["w"] & (weights["w"] == 0)).nonzero().squeeze(1)
    zeros_by_draw = (by_draw["w"] & (weights["w"] == 0)).nonzero().squeeze(1)
    assert int(by_draw["w"].sum()) == 50 and torch.all(by_draw["w"][weights["w"] != 0])
    assert zeros_by_index.tolist() == [i for i in range(41) if i != 7]  # the positional bias
    assert len(zeros_by_draw) == 40 and zeros_by_draw.max() > 500  # drawn across the whole tensor


# ------------------------------------------------------------------------------------------------- grow_to

@given(state=sparse_state(), data=st.data(), use_exclude=st.booleans())
def test_grow_adds_exactly_the_requested_number_where_the_mask_was_off(state, data, use_exclude):
    weights, mask, _ = state
    counts = counts_for(data.draw, mask)
    scores = {name: torch.from_numpy(data.draw(hnp.arrays(np.float32, m.shape, elements=values)))
              for name, m in mask.items()}
    exclude = ({name: torch.from_numpy(data.draw(hnp.arrays(np.bool_, m.shape))) for name, m in mask.items()
                if data.draw(st.booleans())} if use_exclude else None)
    before = (snapshot(weights), snapshot(mask), snapshot(scores))
    new_weights, new_mask = mask_ops.grow_to(weights, mask, counts, scores, exclude)
    assert_same(weights, before[0]), assert_same(mask, before[1]), assert_same(scores, before[2])  # pure
    for name, active in mask.items():
        w, nw, grown_to = weights[name], new_weights[name], new_mask[name]
        missing = counts[name] - int(active.sum())
        if missing <= 0:
            assert torch.equal(grown_to, active) and torch.equal(bits(nw), bits(w))
            continue
        eligible = ~active & ~(exclude or {}).get(name, torch.zeros_like(active))
        grown = grown_to & ~active
        assert torch.all(grown_to[active]), "growing never deactivates"
        assert int(grown.sum()) == min(missing, int(eligible.sum()))
        assert not torch.any(grown & ~eligible), "grown only where the mask was off and not excluded"
        assert torch.equal(grown, as_mask(reference_top(scores[name], eligible, missing), active))
        assert torch.all(bits(nw)[grown] == 0), "grown weights start at exactly +0.0"
        assert torch.equal(bits(nw)[~grown], bits(w)[~grown]), "everything else is bitwise unchanged"


@given(state=sparse_state(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_grow_is_idempotent_and_random_growth_is_seeded(state, data, seed):
    weights, mask, _ = state
    counts = counts_for(data.draw, mask)
    scores = mask_ops.random_scores(mask, torch.Generator().manual_seed(seed))
    again = mask_ops.random_scores(mask, torch.Generator().manual_seed(seed))
    assert_same(scores, again)
    once = mask_ops.grow_to(weights, mask, counts, scores)
    assert_same(mask_ops.grow_to(*once, counts, scores)[1], once[1])
    assert_same(mask_ops.grow_to(*once, counts, scores)[0], once[0])


# ------------------------------------------------------------------------------------- prune, then grow

shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), min_size=1, max_size=4)


@given(layer_shapes=shapes, s=st.floats(0.0, 0.95), f_fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1),
       budget=st.sampled_from([Uniform(), ERK()]), freeze=st.booleans())
def test_readjustment_prunes_to_s_and_regrows_to_s_minus_f_exactly(layer_shapes, s, f_fraction, seed, budget, freeze):
    """SMR's cycle on exact counts: start at s - f (random growth from empty, as initial_mask does), prune by
    magnitude to s, regrow at random to s - f. Frozen weights survive and keep their values."""
    names = {f"layer{i}.weight": shape for i, shape in enumerate(layer_shapes)}
    f = f_fraction * min(s, 1 - s)
    total = sum(math.prod(shape) for shape in names.values())
    g = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=g) for name, shape in names.items()}
    empty = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in names.items()}
    start_counts, prune_counts = budget.counts(names, s - f), budget.counts(names, s)
    weights, mask = mask_ops.grow_to(weights, empty, start_counts, mask_ops.random_scores(empty, g))
    weights = mask_ops.apply_mask(weights, mask)
    assert mask_ops.active_counts(mask) == start_counts
    assert sum(start_counts.values()) == round((1 - (s - f)) * total)
    frozen = {}
    if freeze:  # freeze at most the s-budget worth of active weights, as PFFDST's stage 2 does
        for name, m in mask.items():
            chosen = mask_ops._top_positions(torch.rand(m.shape, generator=g), m, prune_counts[name])
            frozen[name] = torch.zeros(m.numel(), dtype=torch.bool)
            frozen[name][chosen] = True
            frozen[name] = frozen[name].view_as(m)
    pruned_weights, pruned = mask_ops.prune_to(weights, mask, prune_counts, frozen)
    for name in names:  # exact wherever the budget is nested (see test_per_layer_counts_never_increase_...)
        assert int(pruned[name].sum()) == min(prune_counts[name], start_counts[name])
    regrown_weights, regrown = mask_ops.grow_to(pruned_weights, pruned, start_counts,
                                                mask_ops.random_scores(pruned, g))
    assert mask_ops.active_counts(regrown) == start_counts
    assert sum(mask_ops.active_counts(regrown).values()) == round((1 - (s - f)) * total)
    for name, m in regrown.items():
        assert torch.all(regrown_weights[name][~m] == 0)
        if name in frozen:
            assert torch.all(m[frozen[name]])
            assert torch.equal(bits(regrown_weights[name])[frozen[name]], bits(weights[name])[frozen[name]])


@given(state=sparse_state())
def test_apply_mask_zeroes_exactly_the_outside(state):
    weights, mask, _ = state
    out = mask_ops.apply_mask(weights, mask)
    for name, m in mask.items():
        assert torch.all(bits(out[name])[~m] == 0)
        assert torch.equal(bits(out[name])[m], bits(weights[name])[m])
