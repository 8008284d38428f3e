"""One parameter budget for many layers, spread by measured benefit.

Each layer brings a curve: the parameter counts it may take (increasing) and the **cost** at each,
a weighted squared error ``cost = weight · err²`` where ``err`` is the layer's relative data error
and ``weight`` says how much that error moves the model's output (see :func:`lowrank_curve`).
:func:`allocate` minimises the total cost ``Σ_layers cost`` subject to
``Σ_layers params ≤ budget``:

1. every layer starts at its smallest option;
2. Lagrangian greedy: the lower convex hull of each curve is walked segment by segment, always
   taking the segment with the largest cost decrease per parameter that still fits (a layer
   whose next segment does not fit stops there);
3. fill: the leftover parameters buy, one at a time, the single move (to any option of any layer,
   hull or not) with the largest cost decrease that fits, until none fits.

Step 2 alone is optimal for the budget it spends when the curves are convex (every point on its
hull); for curves with equal step sizes it is optimal for the whole budget. Step 3 leaves fewer
parameters unspent than any remaining move costs, so the total lands on the budget up to less than
one layer's smallest step (for low rank, ``m + k`` parameters).

Example
-------
>>> curves = [LayerCurve("a", [0, 10, 20], [4.0, 1.0, 0.0], [0, 1, 2]),
...           LayerCurve("b", [0, 10, 20], [2.0, 1.5, 1.0], [0, 1, 2])]
>>> alloc = allocate(curves, budget=20)
>>> alloc.points
{'a': 2, 'b': 0}
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SparsefitError


@dataclass(frozen=True)
class LayerCurve:
    """Options of one layer: ``params[i]`` parameters at cost ``costs[i]`` with knob ``points[i]``
    (e.g. a rank). ``params`` strictly increasing; ``dense_params``: the layer's dense size."""

    name: str
    params: Sequence[int]
    costs: Sequence[float]
    points: Sequence[Any]
    dense_params: int = 0

    def __post_init__(self) -> None:
        n = len(self.params)
        if n == 0 or len(self.costs) != n or len(self.points) != n:
            raise SparsefitError(f"curve {self.name!r}: params, costs and points must be non-empty and of equal length")
        if any(b <= a for a, b in zip(self.params, self.params[1:], strict=False)):
            raise SparsefitError(f"curve {self.name!r}: parameter counts must be strictly increasing")
        if any(not math.isfinite(c) or c < 0 for c in self.costs):
            raise SparsefitError(f"curve {self.name!r}: costs must be finite and >= 0")

    def hull(self) -> list[int]:
        """Indices of the lower convex hull from the first option, keeping only cost decreases."""
        idx: list[int] = [0]
        for i in range(1, len(self.params)):
            if self.costs[i] >= self.costs[idx[-1]]:
                continue  # more parameters for no gain
            while len(idx) >= 2:
                a, b = idx[-2], idx[-1]
                # b lies on or above the chord a -> i: drop it
                lhs = (self.costs[b] - self.costs[a]) * (self.params[i] - self.params[a])
                rhs = (self.costs[i] - self.costs[a]) * (self.params[b] - self.params[a])
                if lhs >= rhs:
                    idx.pop()
                else:
                    break
            idx.append(i)
        return idx


@dataclass
class Allocation:
    """Per layer: the chosen option index (``index``), its knob (``points``), ``params`` and ``costs``."""

    index: dict[str, int]
    points: dict[str, Any]
    params: dict[str, int]
    costs: dict[str, float]
    budget: int
    total_params: int = 0
    total_cost: float = 0.0
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "total_params": self.total_params,
            "total_cost": self.total_cost,
            "params": dict(self.params),
            "points": {k: v for k, v in self.points.items()},
        }


def budget_for(curves: Sequence[LayerCurve], keep: float) -> int:
    """``⌊keep · Σ dense_params⌋``: the budget of a kept fraction of the layers' dense parameters."""
    if not (0 < keep <= 1) or not math.isfinite(keep):
        raise SparsefitError(f"--keep must be a fraction in (0, 1], got {keep}")
    return int(keep * sum(c.dense_params for c in curves))


def allocate(curves: Sequence[LayerCurve], keep: float | None = None, *, budget: int | None = None) -> Allocation:
    """Minimise ``Σ cost`` within ``budget`` parameters (or ``keep`` of the dense total); see the module doc."""
    if (keep is None) == (budget is None):
        raise SparsefitError("give a kept fraction or a parameter budget, not both")
    if budget is None:
        assert keep is not None
        budget = budget_for(curves, keep)
    names = [c.name for c in curves]
    if len(set(names)) != len(names):
        raise SparsefitError("layer curves must have distinct names")
    cur = {c.name: 0 for c in curves}
    used = sum(c.params[0] for c in curves)
    if used > budget:
        raise SparsefitError(
            f"the budget of {budget:,} parameters is below the smallest option of every layer ({used:,}); raise --keep"
        )
    hulls = {c.name: c.hull() for c in curves}
    pos = {c.name: 0 for c in curves}  # position on the hull
    by_name = {c.name: c for c in curves}

    def push(heap: list, c: LayerCurve) -> None:
        h, p = hulls[c.name], pos[c.name]
        if p + 1 < len(h):
            i, j = h[p], h[p + 1]
            gain = (c.costs[i] - c.costs[j]) / (c.params[j] - c.params[i])
            heapq.heappush(heap, (-gain, names.index(c.name), c.name))

    heap: list = []
    for c in curves:
        push(heap, c)
    while heap:
        _, _, name = heapq.heappop(heap)
        c = by_name[name]
        h, p = hulls[name], pos[name]
        step = c.params[h[p + 1]] - c.params[h[p]]
        if used + step > budget:
            continue  # this layer stops here; others may still fit
        used += step
        pos[name] = p + 1
        cur[name] = h[p + 1]
        push(heap, c)
    # fill the leftover with the best single moves that fit
    while True:
        left = budget - used
        best = None
        for c in curves:
            i = cur[c.name]
            for j in range(len(c.params)):
                dp = c.params[j] - c.params[i]
                gain = c.costs[i] - c.costs[j]
                if dp <= left and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, c.name, j, dp)
        if best is None:
            break
        _, name, j, dp = best
        cur[name] = j
        used += dp
    alloc = Allocation(
        index=dict(cur),
        points={c.name: c.points[cur[c.name]] for c in curves},
        params={c.name: int(c.params[cur[c.name]]) for c in curves},
        costs={c.name: float(c.costs[cur[c.name]]) for c in curves},
        budget=int(budget),
    )
    alloc.total_params = sum(alloc.params.values())
    alloc.total_cost = sum(alloc.costs.values())
    return alloc


def lowrank_curve(name: str, svd: Any, shape: tuple[int, int], weight: float = 1.0) -> LayerCurve:
    """The low-rank curve of one layer from its whitened spectrum (no fitting needed).

    Options: rank ``r`` at ``r·(m + k)`` parameters while that is below the dense ``m·k``, then
    ``dense`` (cost 0) at ``m·k``. Cost: ``weight · err(r)²`` with ``err`` the relative data error
    (:meth:`~sparsefit.structures.WhitenedSVD.relative_errors`); with ``weight = ||W L||²_F`` the cost is
    the absolute ``E||(Ŵ − W)x||²``, times a sensitivity to weigh it by its effect on the output.
    Points: the rank (an ``int``), or ``"dense"``.
    """
    m, k = shape
    errs = svd.relative_errors()
    params, costs, points = [], [], []
    for r in range(0, svd.max_rank + 1):
        p = r * (m + k)
        if p >= m * k:
            break
        params.append(p)
        costs.append(weight * float(errs[r]) ** 2)
        points.append(r)
    params.append(m * k)
    costs.append(0.0)
    points.append("dense")
    return LayerCurve(name, params, costs, points, m * k)


def pooled_output(model: Any, batch: Any) -> Any:
    """The model's output as one L2-normalised vector per sample: its last hidden state (or first
    output) mean-pooled over the tokens the attention mask keeps — for sentence encoders such as
    all-MiniLM-L6-v2, the sentence embedding itself."""
    import torch

    out = model(**batch) if isinstance(batch, dict) else model(batch)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    h = h.double()
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if h.dim() == 3:
        if mask is None:
            h = h.mean(1)
        else:
            mk = mask.unsqueeze(-1).to(h.dtype)
            h = (h * mk).sum(1) / mk.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(h.reshape(h.shape[0], -1), dim=-1)


def measure_effects(
    model: Any, batches: Sequence[Any], replaced: dict[str, Any], output: Any = pooled_output
) -> dict[str, float]:
    """Per layer: ``Σ ||Δy||²`` of the model's output ``y = output(model, batch)`` over ``batches``
    when only that layer's weight is swapped for ``replaced[name]`` (an ``(out, in)`` tensor; the
    module ``name`` must be an ``nn.Linear``). The model is left as it was.

    Used as the allocation weight (see :func:`effect_weights`): the output change each layer
    causes at an operating point, measured rather than modelled.
    """
    import torch

    with torch.no_grad():
        refs = [output(model, b) for b in batches]
        effects = {}
        for name, w_hat in replaced.items():
            lin = model.get_submodule(name)
            keep = lin.weight.detach().clone()
            lin.weight.copy_(w_hat.to(keep.dtype))
            try:
                effects[name] = float(
                    sum(((output(model, b) - r) ** 2).sum() for b, r in zip(batches, refs, strict=True))
                )
            finally:
                lin.weight.copy_(keep)
    return effects


def uniform_rank(shape: tuple[int, int], keep: float) -> int:
    """The rank that keeps ``keep`` of an ``m × k`` layer's parameters: ``⌊keep·m·k / (m + k)⌋``."""
    m, k = shape
    return int(keep * m * k / (m + k))


def effect_weight(effect: float, svd: Any, shape: tuple[int, int], keep: float) -> float:
    """The curve weight that makes a layer's cost at the operating point (uniform rank for ``keep``)
    equal its measured output change ``effect`` (:func:`measure_effects`); elsewhere the cost
    follows the data error squared: ``cost(r) = effect · err(r)² / err(r_keep)²``."""
    err = float(svd.relative_errors()[min(uniform_rank(shape, keep), svd.max_rank)])
    return effect / max(err * err, 1e-30)
