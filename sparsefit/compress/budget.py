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

    Options: rank ``r ≥ 1`` at ``r·(m + k)`` parameters while that is below the dense ``m·k``, then
    ``dense`` (cost 0) at ``m·k``. Cost: ``weight · err(r)²`` with ``err`` the relative data error
    (:meth:`~sparsefit.structures.WhitenedSVD.relative_errors`); with ``weight = ||W L||²_F`` the cost is
    the absolute ``E||(Ŵ − W)x||²``, times a sensitivity to weigh it by its effect on the output.
    Points: the rank (an ``int``), or ``"dense"``.
    """
    m, k = shape
    errs = svd.relative_errors()
    params, costs, points = [], [], []
    for r in range(1, svd.max_rank + 1):
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


def pooled_similarity(model: Any, batch: Any) -> Any:
    """The pairwise cosine similarities of a batch's :func:`pooled_output` vectors ``(b, b)`` (the
    vectors themselves for a batch of one). Effects measured on these keep the ranking of pair
    similarities (the Spearman measure) as well as each embedding: on all-MiniLM-L6-v2 at keep 0.5
    they beat the uniform ratio on both, the embeddings alone only on the cosine."""
    e = pooled_output(model, batch)
    return e @ e.t() if e.shape[0] > 1 else e


class EffectMeter:
    """How much the model's output moves when one layer's weight is swapped (the others intact).

    ``meter(module_name, w_hat)`` returns ``Σ ||Δy||²`` over ``batches`` of ``y = output(model,
    batch)`` with module ``module_name``'s weight replaced by ``w_hat`` (``(out, in)``; a GPT-2
    ``Conv1D``'s ``(in, out)`` weight is handled), then restores the weight. The reference
    outputs are computed once. Used as the allocation weight (:func:`effect_weight`): the output
    change each layer causes at an operating point, measured rather than modelled.
    """

    def __init__(self, model: Any, batches: Sequence[Any], output: Any = pooled_similarity) -> None:
        import torch

        self.model, self.batches, self.output = model, list(batches), output
        with torch.no_grad():
            self.refs = [output(model, b) for b in self.batches]

    def __call__(self, module_name: str, w_hat: Any) -> float:
        import torch

        lin = self.model.get_submodule(module_name)
        keep = lin.weight.detach().clone()
        new = w_hat if tuple(w_hat.shape) == tuple(keep.shape) else w_hat.t()
        with torch.no_grad():
            lin.weight.copy_(new.to(keep.dtype))
            try:
                return float(
                    sum(
                        ((self.output(self.model, b) - r) ** 2).sum()
                        for b, r in zip(self.batches, self.refs, strict=True)
                    )
                )
            finally:
                lin.weight.copy_(keep)


def measure_effects(
    model: Any, batches: Sequence[Any], replaced: dict[str, Any], output: Any = pooled_similarity
) -> dict[str, float]:
    """:class:`EffectMeter` for several layers, one swapped at a time: ``{name: Σ ||Δy||²}``."""
    meter = EffectMeter(model, batches, output)
    return {name: meter(name, w_hat) for name, w_hat in replaced.items()}


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


def global_allocation(
    names: Sequence[str],
    weight: Any,
    gram: Any,
    keep: float,
    effect: Any,
) -> Allocation:
    """``--keep`` over many layers: whitened-SVD curves weighted by measured output effects.

    names: the layers; weight(name) -> ``(out, in)`` tensor and gram(name) -> its input Gram
    matrix (read one layer at a time: only the curves are kept); effect(name, w_hat) -> the
    model's output change with that layer alone replaced by ``w_hat`` (an :class:`EffectMeter`
    call), measured at the uniform-ratio rank. Returns the :class:`Allocation` (``params`` per
    layer: the budgets for the structure choice).
    """
    from .structures import whitened_svd, whitening

    curves = []
    for name in names:
        w = weight(name)
        svd = whitened_svd(w, whitening(gram(name)))
        shape = (int(w.shape[0]), int(w.shape[1]))
        a, b = svd.factors(min(uniform_rank(shape, keep), svd.max_rank))
        e = effect(name, (a @ b).float())
        curves.append(lowrank_curve(name, svd, shape, effect_weight(e, svd, shape, keep)))
        del w, svd, a, b
    return allocate(curves, keep)


#: Calibration samples the effects are measured on (the first ones of the calibration text).
EFFECT_SAMPLES = 128


def keep_budgets(model: Any, plans: Sequence[Any], stats: Any, keep: float, batches: Sequence[Any]) -> dict[str, int]:
    """Per-layer budgets for ``--keep`` on a model in memory: :func:`global_allocation` with the
    weights read from ``model``, the Grams from ``stats(name)`` and the effects measured on
    ``batches`` (model inputs). plans: the selected layers (``name``, ``transposed``)."""
    from .hf import resolve_module

    modules = {p.name: resolve_module(model, p.name) for p in plans}
    transposed = {p.name: bool(getattr(p, "transposed", False)) for p in plans}
    meter = EffectMeter(model, batches)

    def weight(name: str) -> Any:
        w = model.get_submodule(modules[name]).weight.detach().to("cpu")
        return w.t() if transposed[name] else w

    alloc = global_allocation(
        [p.name for p in plans], weight, lambda n: stats(n).gram, keep, lambda n, w_hat: meter(modules[n], w_hat)
    )
    return dict(alloc.params)


def text_batches(tokenizer: Any, samples: Sequence[str], max_length: int = 128, batch: int = 32) -> list[dict]:
    """Model inputs for the effect measurement: padded batches (one sample each without a pad token)."""
    size = batch if getattr(tokenizer, "pad_token", None) is not None else 1
    return [
        dict(
            tokenizer(
                list(samples[i : i + size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(samples), size)
    ]


def checkpoint_budgets(source: Any, plans: Sequence[Any], stats_source: Any, config: Any) -> dict[str, int | None]:
    """The checkpoint workflow's budgets: the global allocation when ``--keep`` comes with text
    calibration (the model is loaded once to measure effects), else one uniform ratio."""
    from .calibrate import calibration_samples, is_activation_file
    from .layer import uniform_budgets

    if config.keep is None or stats_source is None or is_activation_file(config.calibration):
        return uniform_budgets({p.name: p.shape for p in plans}, config)
    from .hf import load_model

    model, tok, _ = load_model(source)
    samples = calibration_samples(config.calibration)[:EFFECT_SAMPLES]
    budgets = keep_budgets(model, plans, stats_source.get, config.keep, text_batches(tok, samples))
    del model
    return dict(budgets)
