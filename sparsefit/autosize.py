"""Choosing the depth of G~: the smallest one that reaches an error, or the best within a budget.

:func:`fit_auto` searches over the depth ``N`` (the width stays fixed, so the parameter count
``2·n·N`` is linear in ``N``):

1. a geometric ladder ``N0, 2·N0, 4·N0, …`` from ``N0 = ceil(log2 n)`` (the depth at which every
   output can first see every input) up to the depth allowed by ``max_params`` (or, without a
   budget, the depth at which G~ would have as many parameters as the dense matrix);
2. with ``target_error``: the ladder stops at the first depth that reaches it, and a bisection
   between it and the last depth that did not (``refine`` more fits) finds a smaller one;
   without: every ladder depth is fitted and the lowest error wins (the note saw errors rise
   again past a "goldilocks" depth, so the deepest is not always the best).

Deeper fits are warm-started from the best shallower one (:func:`extend_operator`: identity
layers inserted between the trained ones, permutations adjusted so that the operator is
unchanged), so no trial starts worse than the one before it.

Example
-------
>>> import sparsefit
>>> from sparsefit.autosize import fit_auto
>>> A = sparsefit.synth("perm", size=16)
>>> auto = fit_auto(A, sparsefit.FitConfig(steps=300, batch=64), target_error=0.5)   # doctest: +SKIP
>>> auto.depth, [t.relative_error for t in auto.search]                              # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import FitConfig
from .errors import SparsefitError
from .fitting import FitResult, _emit, fit
from .operator import extend_operator, gtilde_num_parameters
from .targets import Target, as_target


@dataclass(frozen=True)
class Trial:
    """One fit of the search: its depth, parameter count, relative error and wall time."""

    depth: int
    params: int
    relative_error: float
    relative_error_method: str
    seconds: float
    warm_start: bool
    reached_target: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AutoFitResult:
    """The chosen fit (``result``), its ``depth``, and every trial in the order run (``search``)."""

    result: FitResult
    depth: int
    search: list[Trial] = field(default_factory=list)
    target_error: float | None = None
    max_params: int | None = None
    target_met: bool | None = None

    def search_dicts(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.search]


def max_depth_for(max_params: int, width: int) -> int:
    """The deepest G~ of this width with at most ``max_params`` parameters (``2·width`` per layer)."""
    return max_params // gtilde_num_parameters(1, width)


def depth_ladder(d_min: int, d_max: int, growth: float = 2.0) -> list[int]:
    """``d_min, ⌈growth·d_min⌉, …`` capped at and always ending with ``d_max``."""
    out = [d_min]
    while out[-1] < d_max:
        out.append(min(d_max, max(out[-1] + 1, math.ceil(out[-1] * growth))))
    return out


def fit_auto(
    target: Any,
    config: FitConfig | None = None,
    *,
    target_error: float | None = None,
    max_params: int | None = None,
    callbacks: Sequence[Any] = (),
    shape: tuple[int, int] | None = None,
    min_depth: int | None = None,
    refine: int = 2,
    warm_start: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> AutoFitResult:
    """Fit G~ at several depths and keep the smallest that reaches ``target_error`` (or, without
    one, the most accurate within ``max_params``); see the module docstring for the search.

    target, shape: as for :func:`sparsefit.fit`. config: every setting but ``depth`` (which must be
    None) applies to each trial; ``steps`` is per trial. target_error: relative Frobenius error
    to reach, in (0, 1). max_params: largest parameter count allowed (at least one layer,
    ``2·width``). At least one of the two is needed. min_depth: first depth tried (default
    ``ceil(log2 width)``). refine: bisection fits after the ladder brackets the target.
    warm_start: start deeper trials from the best shallower fit (uniform permutations only;
    other samplers, closed-form inits and ``grow`` fits start fresh). callbacks: passed to every trial's fit;
    an ``on_trial(Trial)`` method, if present, is called after each trial.

    Returns an :class:`AutoFitResult`. A target that no allowed depth reaches is not an error:
    ``target_met`` is then False and the most accurate fit is returned.
    """
    config = config or FitConfig()
    if config.depth is not None:
        raise SparsefitError(
            "the depth is what the search chooses; leave --depth unset with --target-error/--max-params"
        )
    if target_error is None and max_params is None:
        raise SparsefitError("give a target error, a parameter budget, or both (--target-error / --max-params)")
    if target_error is not None and not (0 < target_error < 1 and math.isfinite(target_error)):
        raise SparsefitError(
            f"--target-error must be a relative error in (0, 1), got {target_error} (1 is the zero matrix's error)"
        )
    if refine < 0:
        raise SparsefitError(f"refine must be >= 0, got {refine}")
    tgt: Target = as_target(target, shape)
    m, k = tgt.shape
    width, _ = config.resolve_shape(m, k)
    per_layer = gtilde_num_parameters(1, width)
    if max_params is not None:
        if max_params < per_layer:
            raise SparsefitError(
                f"--max-params {max_params} is less than one layer at width {width} ({per_layer} parameters); "
                f"raise it or lower --width"
            )
        d_max = max_depth_for(max_params, width)
    else:
        d_max = max(1, math.ceil(m * k / per_layer))  # beyond this G~ is no smaller than A
    levels = max(1, math.ceil(math.log2(width)))
    d_min = min(d_max, min_depth if min_depth is not None else levels)
    if d_min < 1:
        raise SparsefitError(f"min_depth must be at least 1, got {min_depth}")
    warm = warm_start and config.sampler == "uniform" and config.init == "random" and not config.grow

    fits: dict[int, FitResult] = {}
    search: list[Trial] = []

    def run(depth: int) -> Trial:
        start = None
        if warm:
            shallower = [d for d in fits if d < depth]
            if shallower:
                base = min(shallower, key=lambda d: (fits[d].metrics.relative_error, -d))
                start = extend_operator(fits[base].operator, depth, seed=config.seed + depth)
        t0 = time.perf_counter()
        r = fit(tgt, config.replace(depth=depth), callbacks, init=start, should_stop=should_stop)
        seconds = time.perf_counter() - t0
        fits[depth] = r
        met = None if target_error is None else r.metrics.relative_error <= target_error
        trial = Trial(
            depth,
            r.metrics.params,
            r.metrics.relative_error,
            r.metrics.relative_error_method,
            seconds,
            start is not None,
            met,
        )
        search.append(trial)
        _emit(callbacks, "on_trial", trial)
        return trial

    lo, hi = None, None
    for d in depth_ladder(d_min, d_max):
        t = run(d)
        if fits[d].interrupted:
            break
        if t.reached_target:
            hi = d
            break
        lo = d
    if hi is not None and lo is not None:
        for _ in range(refine):
            if hi - lo <= 1 or fits[hi].interrupted:
                break
            mid = (lo + hi) // 2
            if run(mid).reached_target:
                hi = mid
            else:
                lo = mid
            if fits[mid].interrupted:
                break
    if hi is not None:
        chosen = hi
    else:
        chosen = min(fits, key=lambda d: (fits[d].metrics.relative_error, d))
    return AutoFitResult(
        result=fits[chosen],
        depth=chosen,
        search=search,
        target_error=target_error,
        max_params=max_params,
        target_met=None if target_error is None else hi is not None,
    )
