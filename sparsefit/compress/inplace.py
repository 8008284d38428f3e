"""The in-memory verb: :func:`compress_` replaces a model's linear layers in place.

Same selection, per-layer fit (:func:`~sparsefit.compress.layer.fit_layer`) and budgets as the
checkpoint workflow, on a model that is already in memory.

Example
-------
>>> from sparsefit.compress import CompressConfig, builtin_sentences, tokenizer_batches
>>> report = sparsefit.compress_(model, CompressConfig(keep=0.5),                       # doctest: +SKIP
...                              calibration=tokenizer_batches(tok, builtin_sentences()))
>>> report.kept_fraction                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import TensorEntry
from ..distill import DistillConfig
from ..distill import distill as run_distill
from ..errors import SparsefitError
from ..fitting import _emit
from .budget import EFFECT_SAMPLES, keep_budgets
from .calibrate import ActivationStats, LayerStats, collect_stats, is_activation_file, is_conv1d
from .config import CompressConfig, select_layers
from .layer import fit_layer, uniform_budgets
from .load import swap_module
from .writer import CompressReport

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and GPT-2 ``Conv1D`` of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


@torch.no_grad()
def compress_(
    model: nn.Module,
    config: CompressConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration: Mapping[str, LayerStats] | Iterable[Any] | None = None,
    callbacks: Sequence[Any] = (),
    distill: DistillConfig | int | str | None = None,
) -> CompressReport:
    """Replace the selected linear layers of ``model`` (in place) by fitted :class:`~sparsefit.SparseLinear`
    modules in each layer's dtype and device; returns the report (``output`` None).

    config: selection (``include``/``exclude`` regexes on ``"<module>.weight"``, else the default
    rule) and the depth rule or ``keep`` budget. filter_fn: ``(module, qualified name) -> bool``,
    applied first (torchao's convention). calibration: ``{module or weight name: LayerStats}``, or
    an iterable of model inputs (each passed as ``model(**b)``, ``model(*b)`` or ``model(b)``, one
    unpadded sample each, e.g. :func:`~sparsefit.compress.tokenizer_batches`), or None (then
    ``config.calibration`` if it names a recorded-activations file, else no calibration).
    callbacks: as for :func:`~sparsefit.compress_checkpoint`, plus those of :func:`sparsefit.distill.distill`.
    distill: after the swap, distil the model against a copy of the original on the calibration
    inputs (:class:`~sparsefit.distill.DistillConfig`, or its ``steps``: a number or ``"auto"``);
    needs ``calibration`` as model inputs. The report's ``distill`` holds the outcome.
    """
    if not config.has_rule:
        raise SparsefitError("give depth, target_error or keep (the depth rule for every layer)")
    t0 = time.perf_counter()
    candidates = {n: m for n, m in linear_layers(model).items() if filter_fn is None or filter_fn(m, n)}
    if not candidates:
        raise SparsefitError("no nn.Linear or Conv1D layer left to compress (check filter_fn)")
    entries = [
        TensorEntry(f"{n}.weight", tuple(m.weight.shape), _DTYPE_NAMES.get(m.weight.dtype, "float32"), 0)
        for n, m in candidates.items()
    ]
    transposed = frozenset(f"{n}.weight" for n, m in candidates.items() if is_conv1d(m))
    plans = select_layers(entries, config, transposed, frozenset(e.name for e in entries))
    plans_modules = {p.name: candidates[p.module] for p in plans}
    dcfg = distill if isinstance(distill, DistillConfig) or distill is None else DistillConfig(steps=distill)
    teacher = None
    if dcfg is not None:
        if calibration is None or isinstance(calibration, Mapping):
            raise SparsefitError(
                "distill= trains on calibration inputs: pass calibration=tokenizer_batches(tok, samples)"
            )
        teacher = copy.deepcopy(model)
    if calibration is not None and not isinstance(calibration, Mapping):
        calibration = list(calibration)  # used twice: statistics, then the effects of the budget
    stats = _stats(model, plans_modules, calibration, config)
    if config.keep is not None and stats is not None and isinstance(calibration, list):
        budgets: dict[str, int | None] = dict(
            keep_budgets(model, plans, stats, config.keep, calibration[:EFFECT_SAMPLES])
        )
    else:
        budgets = uniform_budgets({p.name: p.shape for p in plans}, config)
    _emit(callbacks, "on_plan", plans)
    records = []
    for plan in plans:
        module = plans_modules[plan.name]
        _emit(callbacks, "on_layer_start", plan)
        w = module.weight.detach().to("cpu", torch.float32)
        w = w.t().contiguous() if plan.transposed else w
        if not torch.isfinite(w).all():
            raise SparsefitError(f"{plan.name}: the weight contains NaN or Inf")
        layer_stats = stats(plan.name) if stats is not None else None
        rep, rec = fit_layer(w, layer_stats, budgets[plan.name], config, name=plan.name, callbacks=callbacks)
        rec.dtype, rec.transposed = plan.entry.dtype, plan.transposed
        if rep is not None:
            swap_module(model, plan.module, rep)
        records.append(rec)
        _emit(callbacks, "on_layer_end", plan, rec, False)
    total = sum(p.numel() for p in model.parameters())
    total += sum(r.params_before - r.params_after for r in records)  # the count before compression
    report = CompressReport(type(model).__name__, None, records, total, config=config.to_dict())
    if dcfg is not None:
        assert teacher is not None and calibration is not None
        with torch.enable_grad():
            report.distill = run_distill(teacher, model, calibration, dcfg, callbacks=callbacks).to_dict()
    report.seconds = time.perf_counter() - t0
    return report


def _stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    calibration: Mapping[str, LayerStats] | Iterable[Any] | None,
    config: CompressConfig,
) -> Callable[[str], LayerStats] | None:
    if calibration is None:
        if config.calibration is None:
            return None
        if not is_activation_file(config.calibration):
            raise SparsefitError(
                "compress_ cannot tokenise text itself: pass calibration=tokenizer_batches(tokenizer, samples)"
            )
        acts = ActivationStats(config.calibration)
        return acts.get
    if isinstance(calibration, Mapping):
        given = dict(calibration)

        def lookup(name: str) -> LayerStats:
            for k in (name, name.removesuffix(".weight")):
                if k in given:
                    return given[k]
            raise SparsefitError(f"calibration has no statistics for layer {name!r}")

        for n in modules:
            lookup(n)
        return lookup
    collected = collect_stats(model, calibration, modules, seed=config.fit.seed)
    return collected.__getitem__
