"""Budget allocation: the budget is spent exactly (up to less than the smallest step), the greedy is
optimal on convex curves against brute force, hulls, the low-rank curve, bad input."""

import itertools
import math
import random

import pytest
import torch

from sparsefit.compress.budget import LayerCurve, allocate, budget_for, lowrank_curve
from sparsefit.compress.structures import whitened_svd, whitening
from sparsefit.errors import SparsefitError


def _convex_curve(name, rng, n, step):
    """Decreasing, convex costs at equally spaced parameter counts."""
    gains = sorted((rng.uniform(0.01, 1.0) for _ in range(n - 1)), reverse=True)
    costs = [sum(gains)]
    for g in gains:
        costs.append(costs[-1] - g)
    costs = [max(0.0, c) for c in costs]
    return LayerCurve(name, [i * step for i in range(n)], costs, list(range(n)), (n - 1) * step)


def _brute(curves, budget):
    best = math.inf
    for choice in itertools.product(*(range(len(c.params)) for c in curves)):
        if sum(c.params[i] for c, i in zip(curves, choice, strict=True)) <= budget:
            best = min(best, sum(c.costs[i] for c, i in zip(curves, choice, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_on_convex_curves_with_equal_steps(seed):
    rng = random.Random(seed)
    curves = [_convex_curve(f"l{i}", rng, rng.randint(2, 6), 7) for i in range(4)]
    for budget in range(0, sum(c.params[-1] for c in curves) + 8, 7):
        a = allocate(curves, budget=budget)
        assert a.total_params <= budget
        assert a.total_params == min(budget, sum(c.params[-1] for c in curves))  # every parameter spent
        assert a.total_cost == pytest.approx(_brute(curves, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_with_unequal_steps_spends_the_budget_and_is_near_optimal(seed):
    rng = random.Random(100 + seed)
    curves = [_convex_curve(f"l{i}", rng, rng.randint(2, 5), rng.choice([3, 5, 8])) for i in range(4)]
    top = sum(c.params[-1] for c in curves)
    for budget in range(0, top + 1, 4):
        a = allocate(curves, budget=budget)
        assert a.total_params <= budget
        left = budget - a.total_params
        # no remaining single move of any layer fits the leftover
        for c in curves:
            i = a.index[c.name]
            assert all(c.params[j] - c.params[i] > left or c.costs[j] >= c.costs[i] for j in range(len(c.params)))
        # within the largest single step's gain of the optimum (the Lagrangian bound)
        opt = _brute(curves, budget)
        assert opt <= a.total_cost + 1e-12
        assert a.total_cost - opt <= max(c.costs[0] - c.costs[-1] for c in curves) + 1e-12


def test_allocation_favours_layers_with_more_benefit():
    a = LayerCurve("a", [0, 10, 20], [10.0, 1.0, 0.0], [0, 1, 2], 20)
    b = LayerCurve("b", [0, 10, 20], [1.0, 0.5, 0.0], [0, 1, 2], 20)
    got = allocate([a, b], keep=0.5)
    assert got.budget == 20 and got.points == {"a": 2, "b": 0} and got.total_cost == 1.0
    assert allocate([a, b], keep=0.5).to_dict() == got.to_dict()  # deterministic


def test_hull_skips_points_above_the_chord_and_non_improvements():
    c = LayerCurve("x", [0, 1, 2, 3, 4], [10.0, 9.5, 4.0, 6.0, 0.0], [0, 1, 2, 3, 4])
    assert c.hull() == [0, 2, 4]


def test_lowrank_curve_comes_from_the_whitened_spectrum():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    svd = whitened_svd(w, whitening(x.t() @ x / 50))
    c = lowrank_curve("w", svd, (6, 4), weight=2.0)
    # ranks 1, 2 (rank 0 cannot be stored; 3 would be 30 >= 24 dense parameters), then dense
    assert list(c.params) == [10, 20, 24] and list(c.points) == [1, 2, "dense"]
    assert c.costs[-1] == 0.0 and c.costs[0] > c.costs[1] > 0
    assert c.costs[0] == pytest.approx(2.0 * float(svd.relative_errors()[1]) ** 2)
    assert c.dense_params == 24


def test_bad_allocation_input():
    c = LayerCurve("a", [5, 10], [1.0, 0.0], [0, 1], 10)
    with pytest.raises(SparsefitError, match="below the smallest option"):
        allocate([c], budget=4)
    with pytest.raises(SparsefitError, match="not both"):
        allocate([c], 0.5, budget=5)
    with pytest.raises(SparsefitError, match="--keep"):
        budget_for([c], 1.5)
    with pytest.raises(SparsefitError, match="distinct"):
        allocate([c, c], budget=20)
    with pytest.raises(SparsefitError, match="strictly increasing"):
        LayerCurve("b", [0, 0], [1.0, 0.5], [0, 1])
    with pytest.raises(SparsefitError, match="finite"):
        LayerCurve("b", [0, 1], [1.0, math.nan], [0, 1])


def test_measure_effects_swaps_one_layer_at_a_time_and_restores_the_model():
    from torch import nn

    from sparsefit.compress.budget import measure_effects

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(7, 6), torch.randn(3, 6)]
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    eff = measure_effects(model, batches, {"0": w0.clone(), "2": w2 * 0.5})
    assert eff["0"] == 0.0 and eff["2"] > 0  # an unchanged weight moves nothing
    small = measure_effects(model, batches, {"2": w2 * 0.9})["2"]
    assert 0 < small < eff["2"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
