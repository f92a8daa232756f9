"""Properties of the layer-wise density budgets (fl_sparse.sparse.budgets): exact global counts, per-layer
bounds, ERK proportionality (checked against an independent bisection solve) and monotonicity in sparsity."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fl_sparse.sparse.budgets import ERK, Uniform

pytestmark = pytest.mark.property

# 1-4 tensors of 1-4 dims with small sizes, as a masked model would have.
shape = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
shapes = st.lists(shape, min_size=1, max_size=4).map(lambda ss: {f"layer{i}.weight": s for i, s in enumerate(ss)})
sparsity = st.one_of(st.floats(0.0, 0.999, allow_nan=False), st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.95, 0.99]))
budgets = st.one_of(st.just(Uniform()), st.just(ERK()),
                    st.sampled_from([0.5, 2.0]).map(lambda p: ERK(power_scale=p)))


def sizes_of(shapes: dict) -> dict[str, int]:
    return {name: math.prod(s) for name, s in shapes.items()}


@given(shapes=shapes, s=sparsity, budget=budgets)
def test_counts_sum_exactly_and_stay_within_each_layer(shapes, s, budget):
    counts = budget.counts(shapes, s)
    sizes = sizes_of(shapes)
    assert set(counts) == set(shapes)
    assert all(isinstance(c, int) for c in counts.values())
    assert sum(counts.values()) == round((1 - s) * sum(sizes.values()))
    for name, count in counts.items():
        assert 0 <= count <= sizes[name], name


@given(shapes=shapes, s=sparsity)
def test_uniform_gives_every_layer_the_same_density_up_to_one_weight(shapes, s):
    counts = Uniform().counts(shapes, s)
    sizes = sizes_of(shapes)
    density = round((1 - s) * sum(sizes.values())) / sum(sizes.values())
    for name, count in counts.items():
        assert abs(count - density * sizes[name]) < 1.0, (name, count, density * sizes[name])


def erk_ideal(shapes: dict, target: int, power: float) -> dict[str, float]:
    """Real-valued ERK counts min(size, scale * score * size) summing to ``target``, with the scale found by
    bisection (an independent solve; the library iterates over saturated layers instead)."""
    sizes = sizes_of(shapes)
    weight = {name: (sum(s) / sizes[name]) ** power * sizes[name] for name, s in shapes.items()}

    def kept(scale: float) -> float:
        return sum(min(sizes[n], scale * weight[n]) for n in shapes)

    lo, hi = 0.0, 1.0
    while kept(hi) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
    return {n: min(sizes[n], hi * weight[n]) for n in shapes}


@given(shapes=shapes, s=sparsity, power=st.sampled_from([0.5, 1.0, 2.0]))
def test_erk_counts_are_the_saturated_proportional_split_up_to_one_weight(shapes, s, power):
    counts = ERK(power_scale=power).counts(shapes, s)
    sizes = sizes_of(shapes)
    ideal = erk_ideal(shapes, round((1 - s) * sum(sizes.values())), power)
    for name, count in counts.items():
        assert abs(count - ideal[name]) < 1.0 + 1e-6, (name, count, ideal[name])


@given(shapes=shapes, s=sparsity)
def test_erk_densities_are_proportional_to_sum_over_prod_among_unsaturated_layers(shapes, s):
    """density_i = c * sum(dims_i) / prod(dims_i) for every layer that is not dense, i.e. count_i is within one
    weight of c * sum(dims_i), so count_i / sum_i and count_j / sum_j differ by less than 1/sum_i + 1/sum_j."""
    counts = ERK().counts(shapes, s)
    sizes = sizes_of(shapes)
    free = [n for n in shapes if counts[n] < sizes[n]]
    for i in free:
        for j in free:
            gap = abs(counts[i] / sum(shapes[i]) - counts[j] / sum(shapes[j]))
            assert gap < 1 / sum(shapes[i]) + 1 / sum(shapes[j]) + 1e-9, (i, j, counts)


@given(shapes=shapes, s=sparsity)
def test_erk_saturates_the_highest_scoring_layers_first(shapes, s):
    """A layer with a lower sum/prod score is never denser than one with a higher score (beyond rounding)."""
    counts = ERK().counts(shapes, s)
    sizes = sizes_of(shapes)
    score = {n: sum(shapes[n]) / sizes[n] for n in shapes}
    for i in shapes:
        for j in shapes:
            if score[i] > score[j]:
                assert counts[i] / sizes[i] >= counts[j] / sizes[j] - 1 / sizes[i] - 1 / sizes[j] - 1e-9, (i, j, counts)


def kept_pair(shapes_strategy=shapes):
    """(shapes, s_low, s_high) with kept counts k_low >= k_high that are often only a few weights apart."""
    @st.composite
    def build(draw):
        layers = draw(shapes_strategy)
        total = sum(sizes_of(layers).values())
        k_high = draw(st.integers(1, total))
        k_low = draw(st.one_of(st.integers(k_high, min(total, k_high + 3)), st.integers(k_high, total)))
        return layers, 1 - k_low / total, 1 - k_high / total
    return build()


@given(case=kept_pair(), power=st.sampled_from([None, 1.0, 0.5]))
def test_a_layer_whose_quota_grows_by_a_whole_weight_never_loses_one(case, power):
    """Largest remainder gives every layer floor or ceil of its real quota, so a layer whose quota grows by at
    least 1 between two sparsities keeps at least as many weights at the lower sparsity."""
    layers, low, high = case
    budget = Uniform() if power is None else ERK(power_scale=power)
    sizes = sizes_of(layers)
    total = sum(sizes.values())
    targets = {s: round((1 - s) * total) for s in (low, high)}
    if power is None:
        quota = {s: {n: t * sizes[n] / total for n in layers} for s, t in targets.items()}
    else:
        quota = {s: erk_ideal(layers, t, power) for s, t in targets.items()}
    dense, sparse = budget.counts(layers, low), budget.counts(layers, high)
    for name in layers:
        if quota[low][name] - quota[high][name] >= 1 + 1e-6:
            assert sparse[name] <= dense[name], (name, dense, sparse)


# Uniform over layers of 15, 5 and 1 weights: 10 kept -> (7, 2, 1), but 11 kept -> (8, 3, 0). The 1-weight
# layer loses its weight when the budget grows (quotas 0.476 -> 0.524, while the others' remainders overtake it).
KNOWN_ALABAMA = ({"layer0.weight": (5, 3), "layer1.weight": (5,), "layer2.weight": (1,)}, 1 - 11 / 21, 1 - 10 / 21)


@pytest.mark.xfail(strict=True, reason=(
    "largest-remainder apportionment is not house-monotone (Alabama paradox): a layer can get one weight "
    "MORE at a higher sparsity, so prune_to(counts(s)) from a mask at counts(s - f) cannot reach counts(s) "
    "exactly when s and s - f are only a few weights apart (tiny models or tiny f; LeNet/ResNet18 with the "
    "paper's f are unaffected). Remove this marker once budgets use a house-monotone split."))
@example(case=KNOWN_ALABAMA, budget=Uniform())
@given(case=kept_pair(), budget=budgets)
def test_per_layer_counts_never_increase_with_sparsity(case, budget):
    """Nested masks need this: pruning from s - f to s can only remove weights, so a budget at the higher
    sparsity must not ask any layer for more weights than at the lower one."""
    layers, low, high = case
    dense, sparse = budget.counts(layers, low), budget.counts(layers, high)
    for name in layers:
        assert sparse[name] <= dense[name], (name, low, high, dense, sparse)


@given(shapes=shapes, s=sparsity, budget=budgets)
def test_counts_do_not_depend_on_layer_order(shapes, s, budget):
    reordered = dict(reversed(list(shapes.items())))
    assert budget.counts(reordered, s) == budget.counts(shapes, s)
