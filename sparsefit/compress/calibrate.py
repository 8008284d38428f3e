"""Calibration statistics: what each selected layer sees, gathered from text or recorded inputs.

For every selected layer, :class:`LayerStats` holds the input Gram matrix ``Σ x xᵀ`` (float64,
accumulated while streaming, so activations are never all in memory), the input sum and count
(the mean), and a bounded uniform sample of input rows (reservoir sampling, seeded). With
``L Lᵀ`` the Gram matrix, ``‖(Ŵ − W) L‖²_F`` is the squared error of a replacement ``Ŵ`` summed
over every calibration input, the data-aware objective.

Sources:

* text: ``--calibration FILE|DIR`` (plain text, one sample per line; or JSONL, one JSON string or
  object with a ``"text"`` key per line; a folder: its ``*.txt``/``*.jsonl`` files in sorted
  order), tokenised with the checkpoint's own tokenizer and run through the original model in
  right-padded batches whose padded positions are masked out of the statistics (no padding
  enters them; padded positions do not change the real tokens' activations under the attention
  mask);
* ``builtin``: 2,000 English sentences from Python standard-library docstrings shipped with
  sparsefit (``sparsefit/data/builtin_calibration.txt``, made by ``scripts/make_builtin_corpus.py``);
  300 further sentences (``builtin_heldout.txt``) are for evaluation only;
* a safetensors file of recorded layer inputs (:func:`sparsefit.record_activations`).

Example
-------
>>> stats = collect_stats(model, tokenizer_batches(tok, builtin_sentences()), {"encoder.layer.0.attention.self.query": q})  # doctest: +SKIP
>>> stats["encoder.layer.0.attention.self.query"].gram.shape                                   # doctest: +SKIP
torch.Size([384, 384])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import is_conv1d, run_batch
from ..errors import SparsefitError

#: Rows kept per layer in the reservoir sample (the G~ fits draw their probes from them).
MAX_ROWS = 4096
#: Tokens per calibration sample at most (longer samples are truncated).
MAX_LENGTH = 128
STATS_FILE = "calibration.safetensors"
BUILTIN = "builtin"


#: The parts of the shipped corpus (``scripts/make_builtin_corpus.py`` says how each was made).
BUILTIN_PARTS = ("calibration", "heldout", "distill")


def builtin_sentences(part: str = "calibration") -> list[str]:
    """The shipped English corpus: ``"calibration"`` (2,000 sentences of the standard library's
    docstrings), ``"heldout"`` (300 others, which nothing trains or calibrates on) or ``"distill"``
    (10,000 sentences of other packages' docstrings, disjoint from both: the extra text that
    distillation trains on when the calibration is ``builtin``)."""
    if part not in BUILTIN_PARTS:
        raise SparsefitError(f"builtin corpus part must be one of {', '.join(BUILTIN_PARTS)}; got {part!r}")
    from importlib.resources import files

    text = files("sparsefit").joinpath("data", f"builtin_{part}.txt").read_text(encoding="utf-8")
    return [s for s in text.splitlines() if s.strip()]


def read_text_samples(path: str | os.PathLike[str]) -> list[str]:
    """Samples from a text file, a JSONL file or a folder of them (empty lines skipped)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".txt", ".jsonl", ".json"))
        if not files:
            raise SparsefitError(f"{p}: no .txt or .jsonl files in the calibration folder")
    elif p.is_file():
        files = [p]
    else:
        raise SparsefitError(f"{p}: no such calibration file or folder")
    out: list[str] = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SparsefitError(f"{f}: cannot read as UTF-8 text ({e})") from None
        jsonl = f.suffix in (".jsonl", ".json")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise SparsefitError(f"{f}:{i}: not a JSON line ({e})") from None
                if isinstance(obj, dict):
                    obj = obj.get("text")
                if not isinstance(obj, str):
                    raise SparsefitError(f'{f}:{i}: expected a JSON string or an object with a "text" string')
                line = obj
            out.append(line)
    if not out:
        raise SparsefitError(f"{p}: the calibration text is empty")
    return out


def is_activation_file(spec: str | os.PathLike[str]) -> bool:
    """True when ``--calibration`` names a safetensors file of recorded inputs (the older kind)."""
    return str(spec) != BUILTIN and Path(spec).suffix == ".safetensors"


def calibration_samples(spec: str) -> list[str]:
    """The text samples ``--calibration`` names: ``builtin`` or a file/folder."""
    return builtin_sentences("calibration") if spec == BUILTIN else read_text_samples(spec)


def distillation_samples(spec: str) -> list[str]:
    """The text that distillation trains on for ``--calibration spec``: the calibration text, and
    for ``builtin`` also the corpus's ``distill`` part (statistics need a few thousand sentences;
    distillation keeps improving on held-out text with more)."""
    if spec == BUILTIN:
        return builtin_sentences("calibration") + builtin_sentences("distill")
    return read_text_samples(spec)


def samples_digest(samples: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


@dataclass
class LayerStats:
    """Streaming statistics of one layer's inputs ``x: (rows, in_features)``.

    gram: ``Σ x xᵀ`` (float64, ``(in, in)``); total: ``Σ x`` (float64); count: rows seen;
    rows: a uniform sample of at most ``max_rows`` of them (float32, reservoir sampling).
    """

    in_features: int
    max_rows: int = MAX_ROWS
    seed: int = 0
    gram: torch.Tensor = field(init=False)
    total: torch.Tensor = field(init=False)
    count: int = 0
    rows: torch.Tensor = field(init=False)
    _gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        k = self.in_features
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.total = torch.zeros(k, dtype=torch.float64)
        self.rows = torch.empty(0, k, dtype=torch.float32)
        self._gen = torch.Generator().manual_seed(self.seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x: (..., in_features)`` (any dtype and device)."""
        x = x.detach().reshape(-1, self.in_features)
        xd = x.to("cpu", torch.float64)
        self.gram.addmm_(xd.t(), xd)
        self.total.add_(xd.sum(0))
        x32 = xd.to(torch.float32)
        n, seen = x32.shape[0], self.count
        self.count += n
        room = max(0, self.max_rows - self.rows.shape[0])
        if room:
            self.rows = torch.cat([self.rows, x32[:room]])
        rest = x32[room:]
        if rest.shape[0]:
            # Algorithm R: row t (0-based, t >= max_rows) replaces slot j ~ U{0..t} when j < max_rows.
            t = torch.arange(seen + room, seen + n, dtype=torch.float64)
            j = (torch.rand(rest.shape[0], generator=self._gen, dtype=torch.float64) * (t + 1)).long()
            for i in torch.nonzero(j < self.max_rows).flatten().tolist():
                self.rows[j[i]] = rest[i]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(1, self.count)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, max_rows: int = MAX_ROWS, seed: int = 0) -> LayerStats:
        s = cls(rows.shape[1], max_rows, seed)
        s.update(rows)
        return s

    def data_relative_error(self, approx: torch.Tensor, weight: torch.Tensor) -> float:
        """``‖(Ŵ − W)L‖_F / ‖W L‖_F`` over every calibration input (``L Lᵀ`` = the Gram matrix)."""
        e = approx.double() - weight.double()
        num = float(torch.einsum("ij,jk,ik->", e, self.gram, e))
        den = float(torch.einsum("ij,jk,ik->", weight.double(), self.gram, weight.double()))
        return (max(num, 0.0) / den) ** 0.5 if den > 0 else float("inf")


def tokenizer_batches(
    tokenizer: Any, samples: Sequence[str], max_length: int = MAX_LENGTH, batch_size: int = 16
) -> Iterator[dict]:
    """Model inputs of ``batch_size`` samples each, truncated to ``max_length`` tokens.

    Batches are right-padded and carry their ``attention_mask``, which :func:`collect_stats` uses
    to drop the padded positions' rows; a tokenizer without a pad token, or one padding on the
    left, gets one sample per batch (no padding at all).
    """
    if getattr(tokenizer, "pad_token", None) is None or getattr(tokenizer, "padding_side", "right") != "right":
        batch_size = 1
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i : i + batch_size])
        yield dict(tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


def module_in_features(module: nn.Module) -> int:
    """Input width of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return int(module.weight.shape[0])
    raise SparsefitError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module],
    *,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, LayerStats]:
    """Run ``model`` on ``batches`` (each passed as ``model(**b)``, ``model(*b)`` or ``model(b)``) and
    accumulate :class:`LayerStats` of the inputs of ``modules`` (name → ``nn.Linear`` or ``Conv1D``).

    A dict batch with an ``attention_mask`` (right padding, as :func:`tokenizer_batches` makes)
    has its padded positions' rows dropped, so no padding enters the statistics: every layer's
    input must then have one row per token (``(batch, seq, in)``). Other batches must carry no
    padding. on_batch: called with the number of batches done.
    """
    stats = {n: LayerStats(module_in_features(m), max_rows, seed + i) for i, (n, m) in enumerate(modules.items())}
    handles = []
    keep: list[torch.Tensor | None] = [None]  # the current batch's token mask, flattened

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = keep[0]
            if mask is not None:
                rows = x.reshape(-1, x.shape[-1])
                if rows.shape[0] != mask.numel():
                    raise SparsefitError(
                        f"calibration: layer {name} sees {rows.shape[0]} rows for {mask.numel()} token positions; "
                        "use one sample per batch"
                    )
                x = rows[mask.to(rows.device)]
            stats[name].update(x)

        return record

    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        for i, batch in enumerate(batches, 1):
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            keep[0] = mask.reshape(-1).bool() if mask is not None else None
            run_batch(model, batch)
            if on_batch is not None:
                on_batch(i)
    finally:
        for h in handles:
            h.remove()
    for name, s in stats.items():
        if s.count < 2:
            raise SparsefitError(f"calibration: layer {name} saw {s.count} inputs; it is not used by the forward pass")
    return stats


def save_stats(path: str | os.PathLike[str], stats: dict[str, LayerStats], key: dict[str, Any]) -> None:
    """Write statistics (atomically) with ``key`` (what produced them) as metadata."""
    from ..fileformat import save_safetensors

    tensors: dict[str, torch.Tensor] = {}
    counts = {}
    for name, s in stats.items():
        tensors[f"{name}.gram"] = s.gram
        tensors[f"{name}.total"] = s.total
        tensors[f"{name}.rows"] = s.rows.contiguous()
        counts[name] = s.count
    meta = {"sparsefit.calibration": json.dumps({"key": key, "counts": counts}, sort_keys=True)}
    save_safetensors(path, tensors, metadata=meta)


class StatsFile:
    """Saved statistics, read one layer at a time (:func:`save_stats` writes them)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["sparsefit.calibration"])
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise SparsefitError(f"{self.path}: not a sparsefit calibration statistics file ({e})") from None
        self.key: dict[str, Any] = meta["key"]
        self.counts: dict[str, int] = meta["counts"]

    def __contains__(self, name: str) -> bool:
        return name in self.counts

    def get(self, name: str) -> LayerStats:
        from safetensors import safe_open

        if name not in self.counts:
            raise SparsefitError(f"{self.path}: no statistics for layer {name!r}")
        with safe_open(str(self.path), framework="pt") as f:
            gram, total, rows = (f.get_tensor(f"{name}.{t}") for t in ("gram", "total", "rows"))
        s = LayerStats(gram.shape[0], max(1, rows.shape[0]))
        s.gram, s.total, s.rows, s.count = gram, total, rows, self.counts[name]
        return s


def read_stats_key(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The key of a saved statistics file, or None when absent or unreadable (then it is redone)."""
    if not Path(path).is_file():
        return None
    try:
        return StatsFile(path).key
    except SparsefitError:
        return None


class ActivationStats:
    """Statistics of a recorded-activations file (:func:`sparsefit.record_activations`), per layer on demand."""

    def __init__(self, path: str | os.PathLike[str], max_rows: int = MAX_ROWS) -> None:
        from ..calibration import Calibration

        self.calibration = Calibration(path)
        self.max_rows = max_rows

    def fingerprint(self) -> dict[str, Any]:
        return self.calibration.fingerprint()

    def get(self, weight_name: str) -> LayerStats:
        rows = self.calibration.rows(weight_name)
        return LayerStats.from_rows(rows, max_rows=max(self.max_rows, rows.shape[0]))


def text_stats(
    source: str | os.PathLike[str],
    weight_names: Sequence[str],
    spec: str,
    path: str | os.PathLike[str],
    *,
    max_rows: int = MAX_ROWS,
    max_length: int = MAX_LENGTH,
    seed: int = 0,
    callbacks: Sequence[Any] = (),
) -> StatsFile:
    """Statistics of the layers ``weight_names`` of model folder ``source`` over the text ``spec``
    (``builtin``, a file or a folder), saved at ``path``; reused when ``path`` holds the same ones.

    callbacks: ``on_calibration_start(samples: int)`` and ``on_calibration_step(done: int)``.
    """
    from ..fitting import _emit
    from .hf import load_model, resolve_module

    samples = calibration_samples(spec)
    key = {
        "source": str(Path(source).resolve().name),
        "samples": len(samples),
        "digest": samples_digest(samples),
        "layers": sorted(weight_names),
        "max_rows": max_rows,
        "max_length": max_length,
        "seed": seed,
    }
    if read_stats_key(path) == key:
        return StatsFile(path)
    model, tok, _ = load_model(source)
    modules = {n: model.get_submodule(resolve_module(model, n)) for n in weight_names}
    _emit(callbacks, "on_calibration_start", len(samples))
    stats = collect_stats(
        model,
        tokenizer_batches(tok, samples, max_length),
        modules,
        max_rows=max_rows,
        seed=seed,
        on_batch=lambda i: _emit(callbacks, "on_calibration_step", i),
    )
    del model
    save_stats(path, stats, key)
    return StatsFile(path)
