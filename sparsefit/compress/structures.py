"""Closed-form low-rank replacements (minimal version for the evaluation baselines).

PLACEHOLDER: the data-aware structures module (G~ with covariance probes, gtilde+lowrank, the
per-layer structure choice) replaces this file; these two closed forms are what it must keep
(the evaluation imports them).
"""

from __future__ import annotations

import torch

#: Added to the Gram matrix's diagonal, relative to its mean diagonal, before the Cholesky factor.
WHITEN_EPS = 1e-6


def lowrank_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``W ≈ U V`` with ``U: (out, rank)``, ``V: (rank, in)`` (float64), the best
    rank-``rank`` approximation in the Frobenius norm."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def lowrank_whitened(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD: the rank-``rank`` ``Ŵ = U V`` minimising ``‖(Ŵ − W) L‖_F``
    with ``L Lᵀ = gram + ε·mean(diag(gram))·I`` (Cholesky; ε = :data:`WHITEN_EPS`): SVD of
    ``W L``, truncated, times ``L⁻¹`` (float64)."""
    g = gram.double()
    eps = max(WHITEN_EPS * float(torch.diagonal(g).mean()), 1e-300)
    chol = torch.linalg.cholesky(g + eps * torch.eye(g.shape[0], dtype=g.dtype))
    u, s, vh = torch.linalg.svd(weight.double() @ chol, full_matrices=False)
    v = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)
    return u[:, :rank] * s[:rank], v
