"""Quality of a compressed model on held-out text, against the baselines a user would pick.

Encoders (``AutoModel``): sentence embeddings are the attention-masked mean of the last hidden
states (as sentence-transformers does for all-MiniLM-L6-v2); against the original model's:
``cosine_mean`` / ``cosine_min`` (per sentence), ``spearman`` (Spearman correlation of all
pairwise cosine similarities) and ``neighbors_at10`` (mean overlap of each sentence's 10 nearest
neighbours). Causal LMs: ``perplexity`` of each model on the text (and ``perplexity_ratio`` to
the original's).

Baselines at the same per-layer budgets (a layer compressed to ``p`` parameters gets rank
``⌊p / (out + in)⌋``; dense layers stay dense): ``svd`` (truncated SVD of ``W``) and
``svd_whitened`` (activation-aware SVD with the calibration Gram matrix, see
:mod:`.structures`). :func:`baseline_curve` gives the baselines at uniform kept fractions (for
the plot).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError
from .calibrate import LayerStats, is_conv1d
from .layer import LayerRecord
from .structures import lowrank_svd, lowrank_whitened

BASELINES = ("svd", "svd_whitened")
ENCODER_METRICS = ("cosine_mean", "cosine_min", "spearman", "neighbors_at10")
CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch: int = 32, max_length: int = 128
) -> torch.Tensor:
    """Attention-masked mean of the last hidden states, ``(sentences, hidden)`` float64."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(
            list(sentences[i : i + batch]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state.double()
        mask = enc["attention_mask"].unsqueeze(-1).double()
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
    return torch.cat(out)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, sentences: Sequence[str], max_length: int = 128) -> float:
    """Token-level perplexity over the sentences (one per forward pass, so no padding)."""
    nll, count = 0.0, 0
    for s in sentences:
        ids = tokenizer(s, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    if count == 0:
        raise SparsefitError("the evaluation text has no sentence of two tokens or more")
    return math.exp(nll / count)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[torch.argsort(x)] = torch.arange(x.numel(), dtype=x.dtype)
    return r


def encoder_metrics(ref: torch.Tensor, got: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Compare embeddings ``got`` with ``ref`` (both ``(n, d)``); see the module docstring."""
    n = ref.shape[0]
    if n < k + 2:
        raise SparsefitError(f"the evaluation needs at least {k + 2} sentences, got {n}")
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    rn = torch.nn.functional.normalize(ref, dim=-1)
    gn = torch.nn.functional.normalize(got, dim=-1)
    sr, sg = rn @ rn.t(), gn @ gn.t()
    iu = torch.triu_indices(n, n, 1)
    a, b = _ranks(sr[iu[0], iu[1]]), _ranks(sg[iu[0], iu[1]])
    a, b = a - a.mean(), b - b.mean()
    spearman = float((a @ b) / (a.norm() * b.norm()))
    eye = torch.eye(n, dtype=torch.bool)
    nr = sr.masked_fill(eye, -math.inf).topk(k, dim=1).indices
    ng = sg.masked_fill(eye, -math.inf).topk(k, dim=1).indices
    overlap = sum(len(set(nr[i].tolist()) & set(ng[i].tolist())) for i in range(n)) / (n * k)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "spearman": spearman,
        "neighbors_at10": overlap,
    }


def rank_for(params: int, shape: Sequence[int]) -> int:
    """The low-rank rank with at most ``params`` parameters for an ``(out, in)`` layer."""
    return int(params) // (int(shape[0]) + int(shape[1]))


@torch.no_grad()
def baseline_model(
    original: nn.Module,
    modules: dict[str, str],
    ranks: dict[str, int],
    method: str,
    stats: Callable[[str], LayerStats] | None,
) -> nn.Module:
    """A copy of ``original`` whose layers (weight name → module name in ``modules``) are replaced by
    their rank-``ranks[name]`` approximation by ``method`` (``svd`` or ``svd_whitened``)."""
    if method not in BASELINES:
        raise SparsefitError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")
    if method == "svd_whitened" and stats is None:
        raise SparsefitError("the svd_whitened baseline needs calibration statistics")
    model = copy.deepcopy(original)
    for name, rank in ranks.items():
        module = model.get_submodule(modules[name])
        w = module.weight.detach()
        conv = is_conv1d(module)
        w64 = (w.t() if conv else w).double()
        if method == "svd":
            u, v = lowrank_svd(w64, rank)
        else:
            assert stats is not None
            u, v = lowrank_whitened(w64, stats(name).gram, rank)
        approx = u @ v
        module.weight.copy_((approx.t() if conv else approx).to(w.dtype))
    return model


class Evaluator:
    """Held-out quality of models against one original (its reference outputs computed once)."""

    def __init__(self, original: nn.Module, tokenizer: Any, task: str, sentences: Sequence[str]) -> None:
        if task not in ("encoder", "causal"):
            raise SparsefitError(f"task must be 'encoder' or 'causal', got {task!r}")
        self.original, self.tokenizer, self.task, self.sentences = original, tokenizer, task, list(sentences)
        if task == "encoder":
            self.reference: Any = embed(original, tokenizer, self.sentences)
        else:
            self.reference = perplexity(original, tokenizer, self.sentences)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        if self.task == "encoder":
            return encoder_metrics(self.reference, embed(model, self.tokenizer, self.sentences))
        ppl = perplexity(model, self.tokenizer, self.sentences)
        return {"perplexity": ppl, "perplexity_ratio": ppl / self.reference}

    def header(self) -> dict[str, Any]:
        d: dict[str, Any] = {"task": self.task, "sentences": len(self.sentences)}
        if self.task == "causal":
            d["original_perplexity"] = self.reference
        return d


def evaluate_methods(
    evaluator: Evaluator,
    compressed: nn.Module,
    records: Iterable[LayerRecord],
    modules: dict[str, str],
    stats: Callable[[str], LayerStats] | None,
    baselines: Sequence[str] = BASELINES,
) -> dict[str, Any]:
    """``{"task", "sentences", "kept_fraction", "methods": {"sparsefit": metrics, "svd": …, "svd_whitened": …,
    "svd_uniform": …, "svd_whitened_uniform": …}}``.

    ``svd``/``svd_whitened``: the baselines at the compressed model's per-layer budgets (a layer kept
    dense stays dense); ``*_uniform``: every selected layer at one ratio, the compressed model's
    kept fraction ``F`` (rank ``⌊F·m·k/(m+k)⌋``), i.e. what a user would pick at the same total budget.

    records: the compressed layers' records (their ``params_after`` set the baselines' ranks);
    modules: weight name → module name in ``evaluator.original``.
    """
    recs = list(records)
    ranks = {r.name: rank_for(r.params_after, r.shape) for r in recs if r.status == "compressed"}
    before = sum(r.params_before for r in recs)
    out = evaluator.header()
    out["kept_fraction"] = sum(r.params_after for r in recs) / before if before else 1.0
    methods: dict[str, Any] = {"sparsefit": evaluator(compressed)}
    for b in baselines:
        if b == "svd_whitened" and stats is None:
            continue
        kept = sum(ranks[r.name] * (r.shape[0] + r.shape[1]) if r.name in ranks else r.params_after for r in recs)
        methods[b] = {
            **evaluator(baseline_model(evaluator.original, modules, ranks, b, stats)),
            "kept_fraction": kept / before,
        }
    # What a user would pick instead at the same total budget: every selected layer at one ratio.
    f = out["kept_fraction"]
    shapes = {r.name: (int(r.shape[0]), int(r.shape[1])) for r in recs}
    for b in baselines:
        if b == "svd_whitened" and stats is None:
            continue
        uranks = {n: rank_for(int(f * m * k), (m, k)) for n, (m, k) in shapes.items()}
        kept = sum(uranks[n] * (m + k) for n, (m, k) in shapes.items())
        methods[f"{b}_uniform"] = {
            **evaluator(baseline_model(evaluator.original, modules, uranks, b, stats)),
            "kept_fraction": kept / before,
        }
    methods["sparsefit"]["kept_fraction"] = out["kept_fraction"]
    out["methods"] = methods
    return out


def baseline_curve(
    evaluator: Evaluator,
    shapes: dict[str, tuple[int, int]],
    modules: dict[str, str],
    stats: Callable[[str], LayerStats] | None,
    fractions: Sequence[float] = CURVE_FRACTIONS,
    baselines: Sequence[str] = BASELINES,
) -> list[dict[str, Any]]:
    """The baselines with every layer at one kept fraction ``F`` (rank ``⌊F·m·k/(m+k)⌋``)."""
    rows = []
    for b in baselines:
        if b == "svd_whitened" and stats is None:
            continue
        for f in fractions:
            ranks = {n: rank_for(int(f * m * k), (m, k)) for n, (m, k) in shapes.items()}
            metrics = evaluator(baseline_model(evaluator.original, modules, ranks, b, stats))
            rows.append({"method": b, "kept_fraction": f, **metrics})
    return rows


def save_plot(result: dict[str, Any], path: str, metric: str | None = None) -> None:
    """Quality against kept fraction as a PNG: the baselines' curves and each method's point.

    Needs matplotlib (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparsefitError("--plot needs matplotlib: pip install matplotlib") from None
    metric = metric or ("cosine_mean" if result["task"] == "encoder" else "perplexity")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    curve = result.get("curve", [])
    for i, b in enumerate(sorted({r["method"] for r in curve})):
        pts = sorted((r["kept_fraction"], r[metric]) for r in curve if r["method"] == b)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i + 1}", label=f"{b} (uniform ratio)")
    for i, (name, m) in enumerate(result["methods"].items()):
        ax.scatter(
            [m["kept_fraction"]], [m[metric]], marker="*", s=160, color=f"C{i}", zorder=3, label=f"{name} (this run)"
        )
    ax.set_xlabel("kept fraction of the selected layers' parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..fileformat import atomic_output

    try:
        with atomic_output(path) as f:  # never half a PNG, nor a device node replaced
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def evaluate_compressed(
    source: str | os.PathLike[str],
    compressed: str | os.PathLike[str],
    *,
    calibration: str | None = None,
    heldout: str | None = None,
    curve: bool = False,
    baselines: Sequence[str] = BASELINES,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Evaluate the compressed folder ``compressed`` of model folder ``source`` on held-out text.

    calibration: the text whose Gram matrices whiten the ``svd_whitened`` baseline; default the
    statistics saved in ``compressed`` (when it was made with text calibration), else the
    manifest's ``--calibration``, else ``builtin``. heldout: a text file/folder, default the
    builtin held-out sentences (which no calibration uses). curve: add the baselines at uniform
    kept fractions (for :func:`save_plot`). callbacks: ``on_eval(stage: str)`` before each model.
    """
    from ..fitting import _emit
    from .calibrate import (
        BUILTIN,
        STATS_FILE,
        ActivationStats,
        StatsFile,
        builtin_sentences,
        is_activation_file,
        read_stats_key,
        read_text_samples,
        text_stats,
    )
    from .format import read_manifest
    from .hf import empty_model, load_model, resolve_module
    from .load import load_compressed

    folder = Path(compressed)
    man = read_manifest(folder)
    records = [LayerRecord.from_dict(r) for r in man["layers"]]
    names = [r.name for r in records]
    _emit(callbacks, "on_eval", "original")
    original, tok, task = load_model(source)
    modules = {n: resolve_module(original, n) for n in names}
    sentences = builtin_sentences("heldout") if heldout is None else read_text_samples(heldout)
    saved = folder / STATS_FILE
    spec = calibration or (man.get("config") or {}).get("calibration") or BUILTIN
    stats_source: Any
    with tempfile.TemporaryDirectory() as tmp:
        if calibration is None and read_stats_key(saved) is not None and all(n in StatsFile(saved) for n in names):
            stats_source = StatsFile(saved)
        elif is_activation_file(spec):
            stats_source = ActivationStats(spec)
        else:
            stats_source = text_stats(source, names, spec, Path(tmp) / STATS_FILE, callbacks=callbacks)
        evaluator = Evaluator(original, tok, task, sentences)
        _emit(callbacks, "on_eval", "compressed")
        model = empty_model(folder)
        load_compressed(model, folder)
        result = evaluate_methods(evaluator, model, records, modules, stats_source.get, baselines)
        if curve:
            _emit(callbacks, "on_eval", "curve")
            shapes = {r.name: (int(r.shape[0]), int(r.shape[1])) for r in records}
            result["curve"] = baseline_curve(evaluator, shapes, modules, stats_source.get, baselines=baselines)
    result["heldout"] = "builtin" if heldout is None else str(heldout)
    result["calibration"] = str(spec)
    return result
