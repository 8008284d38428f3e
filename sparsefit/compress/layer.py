"""One layer: fit a replacement for one ``out × in`` weight and describe it in a :class:`LayerRecord`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SparsefitError
from ..operator import GTilde, extend_operator
from .calibrate import LayerStats
from .config import CompressConfig
from .replacement import Replacement


@dataclass
class LayerRecord:
    """The outcome for one selected weight (one entry of the manifest)."""

    name: str
    shape: tuple[int, int]
    dtype: str
    status: str  # "compressed" or "dense"
    depth: int | None
    width: int
    params_before: int
    params_after: int
    relative_error: float | None
    relative_error_method: str | None
    data_relative_error: float | None
    svd_rank: int | None
    svd_relative_error: float | None
    depths_tried: list[int]
    errors_tried: list[float]
    seconds: float = 0.0  # fitting time: in reports only, never in files (same command, same bytes)
    reason: str = ""
    file: str = ""
    rank: int = 0
    structure: str = "gtilde"  # "gtilde", "lowrank", "gtilde+lowrank" or "dense" (sparsefit.compress.structures)
    transposed: bool = False
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the structure choice's "why"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    def to_file_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the run's timing: what layer files and the manifest store."""
        d = self.to_dict()
        del d["seconds"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        rec = cls(**{k: v for k, v in d.items() if k in known})
        rec.shape = tuple(rec.shape)  # type: ignore[assignment]
        if "structure" not in d:  # format version 1 records
            rec.structure = "gtilde" if rec.status == "compressed" else "dense"
        return rec


class Interrupted(KeyboardInterrupt):
    """A fit was stopped (Ctrl-C); finished layers are on disk and the run can be resumed."""


def compress_matrix(
    a: torch.Tensor,
    config: CompressConfig,
    *,
    name: str = "matrix",
    probes: Any = None,
    callbacks: Sequence[Any] = (),
    max_params: int | None = None,
) -> tuple[LayerRecord, GTilde | None]:
    """Fit G~ to one weight ``a: (out, in)`` per ``config``; returns ``(record, operator or None if dense)``.

    The fit runs on ``a / s`` with ``s = ||a||_F / sqrt(min(out, in))`` (mean squared singular
    value 1, the scale of the orthogonal start the schedule was made for); the last layer's blocks
    are multiplied by ``s`` afterwards. ``probes`` (an :class:`~sparsefit.calibration.ActivationProbes`)
    makes the fit data-aware and the target error refer to its held-out rows. ``max_params``
    (budget mode): the deepest G~ with at most this many parameters is fitted.
    """
    from ..fitting import fit

    if not config.has_rule and max_params is None:
        raise SparsefitError("give --depth, --target-error or --keep (the depth rule for every layer)")
    m, k = a.shape
    if max_params is None and config.keep is not None:  # one uniform ratio until a budget allocator gives more
        max_params = int(config.keep * m * k)
    width = config.layer_width(m, k)
    cap = config.max_depth(m, k) if max_params is None else max_params // (2 * width)
    a = a.detach().to("cpu", torch.float32)
    rec = LayerRecord(
        name,
        (m, k),
        "",
        "dense",
        None,
        width,
        m * k,
        m * k,
        None,
        None,
        None,
        None,
        None,
        [],
        [],
        0.0,
        structure="dense",
    )
    if cap < 1:
        limit = f"{config.max_params_ratio:g}×{m * k}" if max_params is None else str(max_params)
        rec.reason = f"even depth 1 ({2 * width} params) exceeds the cap of {limit}"
        return rec, None
    if max_params is not None:
        depths = [cap]
    elif config.depth is not None:
        depths = [config.depth]
    else:
        depths = config.ladder(m, k)
    if max_params is None and config.depth is not None and config.depth > cap:
        rec.reason = f"depth {config.depth} exceeds the cap (max depth {cap} at ratio {config.max_params_ratio:g})"
        return rec, None
    norm = float(torch.linalg.norm(a.double()))
    scale = norm / math.sqrt(min(m, k)) if norm > 0 else 1.0
    target = a / scale
    t0 = time.perf_counter()
    prev: GTilde | None = None
    chosen = None
    for d in depths:
        # a depth doubling fit (fit.grow) starts shallower by itself, so it takes no warm start
        init = extend_operator(prev, d, seed=config.fit.seed + d) if prev is not None and not config.fit.grow else None
        # compress sweeps only when asked: a default-sized sweep per layer would outlast the fits
        fc = config.fit.replace(depth=d, width=width, sweeps=config.fit.sweeps or 0)
        result = fit(target, fc, callbacks, init=init, probes=probes)
        if result.interrupted:
            raise Interrupted(name)
        err = result.metrics.relative_error
        data_err = None
        if probes is not None:
            from ..calibration import data_relative_error

            data_err = data_relative_error(result.operator, target, probes.holdout)
        judged = data_err if data_err is not None else err
        rec.depths_tried.append(d)
        rec.errors_tried.append(judged)
        chosen = (result, data_err)
        if config.target_error is None or judged <= config.target_error:
            break
        prev = result.operator
    rec.seconds = time.perf_counter() - t0
    assert chosen is not None
    result, data_err = chosen
    met = result.metrics
    rec.depth, rec.relative_error, rec.relative_error_method = met.depth, met.relative_error, met.relative_error_method
    rec.data_relative_error = data_err
    rec.svd_rank, rec.svd_relative_error = met.svd_rank, met.svd_relative_error
    if config.target_error is not None and rec.errors_tried[-1] > config.target_error:
        rec.reason = f"target {config.target_error:g} not met within the cap: best {min(rec.errors_tried):.4g} at depth {rec.depths_tried[-1]}"
        return rec, None
    op = result.operator.cpu()
    with torch.no_grad():
        op.blocks[-1].mul_(scale)
    rec.status, rec.structure = "compressed", "gtilde"
    rec.params_after = op.num_parameters
    return rec, op


def fit_layer(
    weight: torch.Tensor,
    stats: LayerStats | None,
    budget: int | None,
    config: CompressConfig,
    *,
    name: str = "matrix",
    callbacks: Sequence[Any] = (),
) -> tuple[Replacement | None, LayerRecord]:
    """The one per-layer path (the checkpoint workflow and :func:`~sparsefit.compress_` both use it).

    weight: ``(out, in)`` (already transposed for ``Conv1D``); stats: the layer's calibration
    statistics or None (then Gaussian probes, the Frobenius objective); budget: the most
    parameters the replacement may have, or None for ``config``'s per-layer rule (``depth`` /
    ``target_error`` / the ``keep`` ratio). Returns ``(replacement or None when the layer stays
    dense, record)``; with ``stats`` the record's ``data_relative_error`` is ``‖(Ŵ − W)L‖_F / ‖WL‖_F``
    over every calibration input.
    """
    from ..calibration import ActivationProbes

    if stats is not None and budget is not None:
        return choose_layer(weight, stats, budget, config, name=name, callbacks=callbacks)
    probes = ActivationProbes(stats.rows, seed=config.fit.seed) if stats is not None else None
    rec, op = compress_matrix(weight, config, name=name, probes=probes, callbacks=callbacks, max_params=budget)
    rep = Replacement(op) if op is not None else None
    if stats is not None:
        rec.data_relative_error = stats.data_relative_error(rep.to_dense() if rep is not None else weight, weight)
    return rep, rec


def choose_layer(
    weight: torch.Tensor,
    stats: LayerStats,
    budget: int,
    config: CompressConfig,
    *,
    name: str = "matrix",
    callbacks: Sequence[Any] = (),
) -> tuple[Replacement | None, LayerRecord]:
    """Budget mode with calibration: every structure of ``config.structures`` is fitted within
    ``budget`` parameters on the data loss (:func:`sparsefit.compress.structures.choose`) and the
    smallest data error wins; the record lists every candidate's errors (``candidates``, ``reason``)."""
    from .structures import GTildeSettings, choose, smallest_params, whitening

    m, k = weight.shape
    t0 = time.perf_counter()
    settings = GTildeSettings(steps=config.candidate_steps, seed=config.fit.seed, sweeps=config.fit.sweeps or 0)
    least = smallest_params(m, k, config.structures)
    if budget < least:
        rec = LayerRecord(name, (m, k), "", "dense", None, 0, m * k, m * k, *([None] * 5), [], [], 0.0)
        rec.structure, rec.reason = "dense", f"no structure fits {budget} parameters (the smallest needs {least})"
        return None, rec
    c = choose(weight, whitening(stats.gram), budget, config.structures, settings, callbacks=callbacks)
    f = c.chosen
    rec = LayerRecord(
        name, (m, k), "", "dense" if f.structure == "dense" else "compressed",
        f.depth or None, f.width, m * k, f.params, f.weight_error, "exact", f.data_error,
        f.rank if f.a is not None else None, None, [], [], time.perf_counter() - t0,
        reason=c.why(), structure=f.structure, candidates=[x.summary() for x in c.candidates],
    )  # fmt: skip
    if f.structure == "dense":
        return None, rec
    lowrank = (f.a.float(), f.b.float()) if f.a is not None and f.b is not None else (None, None)
    return Replacement(f.operator, *lowrank), rec


def uniform_budgets(shapes: dict[str, tuple[int, int]], config: CompressConfig) -> dict[str, int | None]:
    """Per-layer parameter budgets: ``keep · out · in`` for every layer (None without ``keep``).

    The global allocator (per-layer error-versus-parameters curves) replaces this one ratio.
    """
    if config.keep is None:
        return dict.fromkeys(shapes)
    return {n: int(config.keep * m * k) for n, (m, k) in shapes.items()}
