"""How good is a fit: relative Frobenius error (exact or estimated) and the SVD baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .operator import GTilde
from .targets import Target

#: Dense products up to this many entries are formed exactly (float64: 512 MiB each).
DENSE_BUDGET = 64 * 1024 * 1024


@dataclass(frozen=True)
class ErrorEstimate:
    """``||G~ − A||_F / ||A||_F``: ``method`` is ``exact`` or ``estimated`` (then with a 95 % interval)."""

    value: float
    method: str
    low: float | None = None
    high: float | None = None
    probes: int | None = None


@torch.no_grad()
def relative_error(
    op: GTilde, target: Target, *, max_dense: int = DENSE_BUDGET, probes: int = 1024, seed: int = 0
) -> ErrorEstimate:
    """Exact when both dense matrices fit ``max_dense`` entries; else estimated from Gaussian probes.

    The estimate uses ``E||(G~−A)x||² = ||G~−A||²_F`` on held-out N(0, I) probes (a generator of
    its own, so fitting never saw them), with a delta-method 95 % interval for the ratio.
    """
    m, k = target.shape
    a = target.dense(max_dense) if m * k <= max_dense else None
    if a is not None:
        g = op.to_dense(torch.float64).cpu()
        diff = torch.linalg.norm(g - a)
        norm = torch.linalg.norm(a)
        return ErrorEstimate(float(diff / norm) if norm > 0 else float(diff), "exact")
    dev = op.blocks.device
    gen = torch.Generator(device=dev).manual_seed(10_000 + seed)
    errs, refs = [], []
    chunk = 256
    for start in range(0, probes, chunk):
        b = min(chunk, probes - start)
        x = torch.randn(b, k, generator=gen, device=dev, dtype=torch.float64)
        ax = target.matmat(x.to(op.blocks.dtype)).to(torch.float64)
        gx = op(x.to(op.blocks.dtype), backend="torch").to(torch.float64)
        errs.append(((gx - ax) ** 2).sum(1).cpu())
        refs.append((ax**2).sum(1).cpu())
    e = torch.cat(errs)
    r = torch.cat(refs)
    ratio = float(e.sum() / r.sum()) if r.sum() > 0 else float("inf")
    # delta method for a ratio of means: Var(R) ≈ Var(e − R·r) / (P · mean(r)²)
    resid = e - ratio * r
    se = float(resid.std(unbiased=True) / (math.sqrt(probes) * r.mean())) if probes > 1 else float("inf")
    lo, hi = max(ratio - 1.96 * se, 0.0), ratio + 1.96 * se
    return ErrorEstimate(math.sqrt(ratio), "estimated", math.sqrt(lo), math.sqrt(hi), probes)


@dataclass(frozen=True)
class SvdBaseline:
    """Truncated SVD with at most ``params`` parameters: rank ``params // (out + in)``."""

    rank: int
    relative_error: float | None
    method: str  # "exact", "partial" (top singular values only), or "unavailable: …"


def svd_baseline(target: Target, params: int, *, max_dense: int = DENSE_BUDGET) -> SvdBaseline:
    """Error of the best rank-``r`` approximation with the same parameter budget as G~."""
    m, k = target.shape
    rank = params // (m + k)
    if rank >= min(m, k):
        return SvdBaseline(rank, 0.0, "exact")
    if rank == 0:
        return SvdBaseline(0, 1.0, "exact")
    a = target.dense(max_dense) if m * k <= max_dense else None
    if a is not None and min(m, k) <= 8192:
        s = torch.linalg.svdvals(a)
        total = float((s**2).sum())
        tail = float((s[rank:] ** 2).sum())
        return SvdBaseline(rank, math.sqrt(tail / total) if total > 0 else 0.0, "exact")
    op = target.scipy_operator()
    fro = target.frobenius_norm()
    if op is None or fro is None or rank > 1000 or rank >= min(m, k) - 1:
        return SvdBaseline(rank, None, "unavailable: needs the dense matrix or a sparse one with a small rank")
    import numpy as np
    from scipy.sparse.linalg import svds

    s = svds(op, k=rank, return_singular_vectors=False, random_state=0)
    tail = max(fro**2 - float(np.sum(s**2)), 0.0)
    return SvdBaseline(rank, math.sqrt(tail) / fro if fro > 0 else 0.0, "partial")
