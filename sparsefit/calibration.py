"""Calibration data for data-aware compression: recorded layer inputs and probe sources.

With calibration, a layer ``A`` is fitted on ``E||(G~ − A)x||²`` over the inputs ``x`` the layer
really sees, instead of over Gaussian probes: what the rest of the network never feeds a layer
need not be reproduced.

A calibration file is a safetensors file with one tensor per layer, named like the layer's
module (``encoder.layer.0.attention.self.query``) or its weight
(``encoder.layer.0.attention.self.query.weight``), of shape ``(samples, in_features)``.

Example
-------
>>> acts = record_activations(model, [batch1, batch2], max_rows=4096)   # doctest: +SKIP
>>> save_activations("calib.safetensors", acts)                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparsefitError
from .headers import safetensors_header

#: Fraction of a layer's recorded rows held out to measure the data-aware error.
HOLDOUT = 0.1


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2-style ``Conv1D`` (``y = x W + b`` with ``W: (in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D``: the layers whose inputs are recorded and compressed."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


@torch.no_grad()
def run_batch(model: nn.Module, batch: Any) -> None:
    """Call ``model`` on one calibration batch: a dict of keyword inputs, a tuple of positional
    inputs, or one tensor."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def record_activations(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    max_rows: int = 8192,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``batches`` and record the inputs of its ``nn.Linear`` (and ``Conv1D``) modules.

    batches: each is passed as ``model(**batch)`` when a dict, ``model(*batch)`` when a tuple or
    list, else ``model(batch)``.
    names: module names to record (default: every ``nn.Linear``).
    max_rows: rows kept per layer (a seeded uniform subsample when more were seen).
    Returns ``{module name: (rows, in_features) float32 CPU tensor}``.
    """
    wanted = set(names) if names is not None else None
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float32))

        return record

    for name, module in model.named_modules():
        if is_linear(module) and (wanted is None or name in wanted):
            handles.append(module.register_forward_pre_hook(hook(name)))
    if wanted is not None:
        found = {n for n, m in model.named_modules() if is_linear(m)}
        missing = sorted(wanted - found)
        if missing:
            for h in handles:
                h.remove()
            raise SparsefitError(f"no nn.Linear module named {missing[0]!r} in the model")
    try:
        for batch in batches:
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, parts in seen.items():
        rows = torch.cat(parts)
        if rows.shape[0] > max_rows:
            rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
        out[name] = rows.contiguous()
    return out


def save_activations(path: str | os.PathLike[str], activations: dict[str, torch.Tensor]) -> None:
    """Write recorded activations as a calibration file (atomically)."""
    from .fileformat import save_safetensors

    save_safetensors(path, activations)


class Calibration:
    """A calibration file, opened lazily: one layer's rows are read at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise SparsefitError(f"{self.path}: no such calibration file")
        safetensors_header(self.path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise SparsefitError(f"{self.path}: not a readable safetensors calibration file ({_first(e)})") from None

    def key_for(self, weight_name: str) -> str | None:
        module = re.sub(r"\.weight$", "", weight_name)
        for k in (weight_name, module):
            if k in self.shapes:
                return k
        return None

    def check(self, weight_name: str, in_features: int) -> None:
        """Raise unless the file has ``(samples ≥ 2, in_features)`` rows for this layer."""
        k = self.key_for(weight_name)
        if k is None:
            raise SparsefitError(
                f"{self.path}: no activations for layer {weight_name!r} (expected a tensor named "
                f"{re.sub(r'.weight$', '', weight_name)!r}); record them or leave the layer out with --exclude"
            )
        shape = self.shapes[k]
        if len(shape) != 2 or shape[1] != in_features or shape[0] < 2:
            raise SparsefitError(
                f"{self.path}: activations {k!r} have shape {shape}, expected (samples >= 2, {in_features})"
            )

    def fingerprint(self) -> dict[str, Any]:
        st = self.path.stat()
        return {"file": self.path.name, "bytes": st.st_size}

    def rows(self, weight_name: str) -> torch.Tensor:
        from safetensors import safe_open

        k = self.key_for(weight_name)
        assert k is not None
        with safe_open(str(self.path), framework="pt") as f:
            x = f.get_tensor(k).to(torch.float32)
        if not torch.isfinite(x).all():
            raise SparsefitError(f"{self.path}: activations {k!r} contain NaN or Inf")
        return x


class ActivationProbes:
    """Probe source for :func:`sparsefit.fit`: random rows of recorded activations.

    The rows are shuffled with ``seed`` and split into a training part (drawn uniformly with
    the fit's generator) and a held-out part (:attr:`holdout`) for measuring the error. Rows are
    scaled by one common factor so that ``E||x||² = in_features``, as for N(0, I) probes (a linear
    map does not care, and the loss then has the scale the default schedule was tuned for).
    """

    def __init__(self, rows: torch.Tensor, seed: int = 0, holdout: float = HOLDOUT) -> None:
        if rows.dim() != 2 or rows.shape[0] < 2:
            raise SparsefitError(f"calibration rows must be (samples >= 2, in_features), got {tuple(rows.shape)}")
        gen = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        ms = float((rows.double() ** 2).sum(1).mean())
        scale = (rows.shape[1] / ms) ** 0.5 if ms > 0 else 1.0
        rows = rows * scale
        n_hold = max(1, int(round(rows.shape[0] * holdout)))
        self.holdout = rows[:n_hold].contiguous()
        self.train = rows[n_hold:].contiguous()

    @property
    def sweep_rows(self) -> torch.Tensor:
        """The training rows: least-squares sweeps after the fit minimise the data loss over them."""
        return self.train

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, self.train.shape[0], (batch,), generator=generator, device=generator.device)
        return self.train.to(idx.device)[idx]


@torch.no_grad()
def data_relative_error(op: Any, a: torch.Tensor, x: torch.Tensor) -> float:
    """``||(G~ − A)xᵀ||_F / ||A xᵀ||_F`` over rows ``x: (samples, in_features)``."""
    dev = op.blocks.device
    x = x.to(dev, op.blocks.dtype)
    ref = x @ a.to(dev, op.blocks.dtype).t()
    got = op(x, backend="torch")
    den = float(torch.linalg.norm(ref.double()))
    return float(torch.linalg.norm((got - ref).double())) / den if den > 0 else float("inf")


def _first(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
