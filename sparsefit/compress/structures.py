"""Per-layer structures fitted on the data-aware objective, and the choice between them.

The objective of every structure is the layer's output error over the calibration inputs::

    E_x ||(Ŵ − W) x||²  =  tr((Ŵ − W) C (Ŵ − W)ᵀ)  =  ||(Ŵ − W) L||²_F,   C = E[x xᵀ] = L Lᵀ

where ``C`` is the **uncentred** second-moment (Gram) matrix of the layer's inputs, ``(in, in)``
float64: the mean of ``x xᵀ`` over every calibration token, without subtracting the mean input.
(The layer's bias is kept as it is, so the mean input's error is not absorbed by it and must be
part of the objective.) Errors are reported relative: the **data error**
``||(Ŵ − W) L||_F / ||W L||_F`` beside the **weight error** ``||Ŵ − W||_F / ||W||_F``.

``L`` is taken as the symmetric root ``Q Λ^½ Qᵀ`` of ``C + δ·I`` (eigen-decomposition,
``δ = 1e-6 ·`` mean of ``diag C``, so that ``L`` is invertible even when some input direction
never occurs); :class:`Whitening` holds it.

Structures (parameters for an ``m × k`` weight):

* ``lowrank`` — activation-aware truncated SVD, closed form: with ``W L = U Σ Vᵀ``, rank ``r``
  keeps ``A = U_r Σ_r^½`` ``(m, r)`` and ``B = Σ_r^½ V_rᵀ L⁻¹`` ``(r, k)``, the layer computing
  ``x ↦ (x Bᵀ) Aᵀ``. ``r·(m + k)`` parameters. It minimises the (ridge-regularised) data error
  over all rank-``r`` matrices (Eckart–Young applied to ``W L``), and its error at every rank is
  known from the spectrum: ``err²(r) = Σ_{i>r} σ_i² / Σ σ_i²``.
* ``gtilde`` — G~ (uniform or butterfly permutations) fitted by :func:`sparsefit.fit` on the exact
  data loss: the probes are the columns of ``L`` (every step, no probe noise), so the fit's mean
  squared error is ``||(G~ − W) L||²_F`` up to a constant. ``2·width·depth`` parameters.
* ``gtilde+lowrank`` — ``A B + G~``, fitted by alternating exact minimisations of the same loss:
  the low rank starts as the whitened SVD, G~ starts adding nothing (last layer zero) and is fitted
  to the residual, then the low rank is refitted in closed form to ``W − G~``, and so on. No step
  can increase the data error, so it never ends worse than its low-rank start.
* ``dense`` — ``W`` itself, ``m·k`` parameters, error 0.

:func:`choose` fits the candidates at one parameter budget and keeps the one with the smallest
data error; its :class:`Choice` records every candidate's errors (the "why").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import FitConfig, Phase
from ..errors import SparsefitError
from ..operator import GTilde

STRUCTURES = ("lowrank", "gtilde", "gtilde+lowrank", "dense")

#: Ridge added to the Gram matrix, relative to its mean diagonal.
RIDGE = 1e-6


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Whitening:
    """The data-aware metric of one layer input.

    gram: ``C = E[x xᵀ]`` (uncentred), ``(k, k)`` float64, as given. eigenvalues / eigenvectors:
    of ``C + δ·I`` (ascending). root: ``L = Q Λ^½ Qᵀ``; inv_root: ``L⁻¹``.
    """

    gram: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    ridge: float

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]

    @property
    def root(self) -> torch.Tensor:
        q = self.eigenvectors
        return (q * self.eigenvalues.sqrt()) @ q.t()

    @property
    def inv_root(self) -> torch.Tensor:
        q = self.eigenvectors
        return (q * self.eigenvalues.rsqrt()) @ q.t()

    def probe_rows(self, max_rows: int | None = None) -> torch.Tensor:
        """Rows ``x_i = √λ_i q_iᵀ`` (largest ``λ`` first), ``(p, k)``: ``Σ_i ||M x_i||² = ||M L||²_F``
        for any ``M`` when all ``k`` are kept; ``max_rows`` keeps the ``p`` strongest directions."""
        p = self.in_features if max_rows is None else max(1, min(self.in_features, max_rows))
        lam = self.eigenvalues.flip(0)[:p]
        q = self.eigenvectors.flip(1)[:, :p]
        return (q * lam.sqrt()).t().contiguous()


def whitening(gram: torch.Tensor, ridge: float = RIDGE) -> Whitening:
    """The :class:`Whitening` of an uncentred Gram matrix ``gram: (k, k)`` (symmetric, PSD)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise SparsefitError(f"a Gram matrix must be square (in, in), got shape {tuple(gram.shape)}")
    c = gram.detach().to("cpu", torch.float64)
    if not torch.isfinite(c).all():
        raise SparsefitError("the Gram matrix contains NaN or Inf")
    c = 0.5 * (c + c.t())
    mean_diag = float(c.diagonal().mean())
    if not mean_diag > 0:
        raise SparsefitError("the Gram matrix is zero: the calibration inputs of this layer are all zero")
    delta = ridge * mean_diag
    lam, q = torch.linalg.eigh(c + delta * torch.eye(c.shape[0], dtype=torch.float64))
    return Whitening(c, lam.clamp_min(delta), q, delta)


def data_error(w_hat: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative data error ``||(Ŵ − W) L||_F / ||W L||_F = sqrt(tr(D C Dᵀ) / tr(W C Wᵀ))``, ``D = Ŵ − W``."""
    c = gram.to(torch.float64)
    w = w.to(torch.float64)
    d = w_hat.to(torch.float64) - w
    num = float(((d @ c) * d).sum().clamp_min(0))
    den = float(((w @ c) * w).sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def weight_error(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    """Relative weight error ``||Ŵ − W||_F / ||W||_F``."""
    w = w.to(torch.float64)
    den = float(torch.linalg.norm(w))
    num = float(torch.linalg.norm(w_hat.to(torch.float64) - w))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ----------------------------------------------------------------------------------------------
# lowrank: activation-aware truncated SVD
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WhitenedSVD:
    """``W L = U diag(σ) Vᵀ`` for one layer (float64); every rank's factors and error come from it."""

    u: torch.Tensor
    sigma: torch.Tensor
    vh_inv_root: torch.Tensor  # Vᵀ L⁻¹, (min(m, k), k)

    @property
    def max_rank(self) -> int:
        return self.sigma.numel()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: ``A = U_r Σ_r^½`` ``(m, r)``, ``B = Σ_r^½ V_rᵀ L⁻¹`` ``(r, k)``; ``Ŵ = A B``."""
        if not 0 <= rank <= self.max_rank:
            raise SparsefitError(f"rank must be in [0, {self.max_rank}], got {rank}")
        s = self.sigma[:rank].sqrt()
        return self.u[:, :rank] * s, s[:, None] * self.vh_inv_root[:rank]

    def relative_errors(self) -> torch.Tensor:
        """``err(r)`` for ``r = 0 … max_rank``: ``sqrt(Σ_{i>r} σ_i² / Σ σ_i²)`` (float64)."""
        s2 = self.sigma.double() ** 2
        total = float(s2.sum())
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
        return (tail / total).clamp_min(0).sqrt() if total > 0 else torch.zeros(self.max_rank + 1, dtype=torch.float64)


def whitened_svd(w: torch.Tensor, wh: Whitening) -> WhitenedSVD:
    """The SVD of ``W L`` (``w: (m, k)``) in float64, with ``Vᵀ L⁻¹`` precomputed."""
    w64 = w.detach().to("cpu", torch.float64)
    if w64.shape[1] != wh.in_features:
        raise SparsefitError(f"weight has {w64.shape[1]} inputs, the Gram matrix {wh.in_features}")
    u, s, vh = torch.linalg.svd(w64 @ wh.root, full_matrices=False)
    return WhitenedSVD(u, s, vh @ wh.inv_root)


def lowrank_params(rank: int, m: int, k: int) -> int:
    return rank * (m + k)


def lowrank_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD ``W ≈ U V``, ``U: (out, rank)``, ``V: (rank, in)`` (float64): the best
    rank-``rank`` approximation in the Frobenius norm (the data-blind baseline)."""
    u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def lowrank_whitened(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD ``W ≈ U V`` (float64): the rank-``rank`` ``Ŵ`` minimising
    ``||(Ŵ − W) L||_F`` for ``L Lᵀ = gram + δ·I`` — the ``lowrank`` structure (:func:`whitened_svd`)."""
    return whitened_svd(weight, whitening(gram)).factors(rank)


# ----------------------------------------------------------------------------------------------
# gtilde: G~ fitted on the exact data loss
# ----------------------------------------------------------------------------------------------
class DataProbes:
    """Probe source for :func:`sparsefit.fit` that makes its loss the exact data loss.

    Every call returns the same rows ``c·√λ_i q_iᵀ`` (see :meth:`Whitening.probe_rows`), so the
    fit's mean squared error is ``c²/(p·m)·||(G~ − T) L||²_F`` (all ``k`` rows) with no probe noise;
    ``c`` makes the mean squared row norm ``k``, the scale of N(0, I) probes the schedules were
    tuned for. :meth:`loss` is what :func:`sparsefit.fit` compares a warm start against.
    """

    def __init__(self, wh: Whitening, max_rows: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        rows = wh.probe_rows(max_rows)
        k = rows.shape[1]
        ms = float((rows**2).sum(1).mean())
        self.rows64 = rows * math.sqrt(k / ms)
        self.rows = self.rows64.to(dtype)

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return self.rows.to(generator.device)

    @property
    def sweep_rows(self) -> torch.Tensor:
        """The probe rows (float64): least-squares sweeps minimise the same data loss."""
        return self.rows64

    @torch.no_grad()
    def loss(self, op: GTilde, target: Any) -> float:
        """``||(G~ − T) X||²_F`` over the probe rows, in float64 (``target``: a :class:`~sparsefit.targets.Target`)."""
        x = self.rows64.to(op.blocks.device)
        got = op(x.to(op.blocks.dtype), backend="torch").double()
        target.prepare(op.blocks.device, torch.float64)
        ref = target.matmat(x)
        return float(((got - ref) ** 2).sum())


def gtilde_width(m: int, k: int, sampler: str = "uniform") -> int:
    """Width of a layer's G~: ``max(m, k)`` rounded up to even (the next power of two for butterfly)."""
    big = max(m, k)
    if sampler == "butterfly":
        return 1 << max(1, (big - 1).bit_length())
    return big + big % 2


def gtilde_depth(params: int, width: int) -> int:
    """The deepest G~ of this width within ``params`` parameters (0 when not even one layer fits)."""
    return params // (2 * width)


@dataclass(frozen=True)
class GTildeSettings:
    """How candidate G~ are fitted: few steps of Adam on the exact data loss.

    steps: Adam steps per G~ fit (``gtilde``) and per G~ round of the joint fit. rounds: G~/low-rank
    alternations of ``gtilde+lowrank``. lowrank_share: fraction of the joint budget given to the
    low rank. probe_rows: strongest input directions kept in the loss (None: all, exact). sweeps:
    least-squares sweeps on the same data loss after the Adam steps (:mod:`sparsefit.als`).
    """

    steps: int = 300
    lr: float = 1e-2
    sampler: str = "uniform"
    rounds: int = 2
    lowrank_share: float = 0.75
    probe_rows: int | None = None
    seed: int = 0
    sweeps: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.rounds < 1:
            raise SparsefitError("G~ candidate fits need steps >= 1 and rounds >= 1")
        if isinstance(self.sweeps, bool) or not isinstance(self.sweeps, int) or self.sweeps < 0:
            raise SparsefitError(f"sweeps must be a whole number >= 0, got {self.sweeps!r}")
        if not 0 < self.lowrank_share < 1:
            raise SparsefitError(f"lowrank share must be in (0, 1), got {self.lowrank_share}")

    def fit_config(self, depth: int, width: int, *, residual: bool) -> FitConfig:
        # A residual G~ starts at zero: an orthogonality pull would drag it away from that start.
        reg = 0.0 if residual else 0.3
        phases = (Phase(0.8, self.lr, reg), Phase(0.2, self.lr / 10, reg / 10))
        return FitConfig(
            depth=depth,
            width=width,
            steps=self.steps,
            lr=self.lr,
            phases=phases,
            seed=self.seed,
            sampler=self.sampler,
            device="cpu",
            eval_every=max(1, min(50, self.steps)),
            sweeps=self.sweeps,  # on the data loss (DataProbes.sweep_rows)
        )


def _scale(w: torch.Tensor) -> float:
    m, k = w.shape
    norm = float(torch.linalg.norm(w.double()))
    return norm / math.sqrt(min(m, k)) if norm > 0 else 1.0


def fit_gtilde(
    w: torch.Tensor,
    wh: Whitening,
    depth: int,
    settings: GTildeSettings = GTildeSettings(),
    *,
    zero_start: bool = False,
    callbacks: Sequence[Any] = (),
) -> GTilde:
    """G~ of ``depth`` layers fitted to ``w: (m, k)`` on the data loss; returns it (float32, CPU)
    at ``w``'s scale. ``zero_start``: start from an operator that computes zero (last layer's blocks
    zero) instead of a random orthogonal one; the fit never ends worse than its start."""
    from ..fitting import fit

    m, k = w.shape
    width = gtilde_width(m, k, settings.sampler)
    s = _scale(w)
    target = (w.detach().to("cpu", torch.float64) / s).float()
    init = None
    if zero_start:
        init = GTilde(k, m, depth, width, seed=settings.seed, sampler=settings.sampler)
        with torch.no_grad():
            init.blocks[-1].zero_()
    probes = DataProbes(wh, settings.probe_rows)
    cfg = settings.fit_config(depth, width, residual=zero_start)
    op = fit(target, cfg, callbacks, init=init, probes=probes).operator.cpu()
    with torch.no_grad():
        op.blocks[-1].mul_(s)
    return op


# ----------------------------------------------------------------------------------------------
# Candidates and the choice
# ----------------------------------------------------------------------------------------------
@dataclass
class Fitted:
    """One structure fitted at a budget: its dense equivalent and factors, counts and errors."""

    structure: str
    params: int
    data_error: float
    weight_error: float
    rank: int = 0
    depth: int = 0
    width: int = 0
    a: torch.Tensor | None = None  # (m, rank) low-rank left factor
    b: torch.Tensor | None = None  # (rank, k) low-rank right factor
    operator: GTilde | None = None
    seconds: float = 0.0

    def dense(self, w: torch.Tensor) -> torch.Tensor:
        """``Ŵ`` as a float64 ``(m, k)`` tensor (``w`` is the original, used for ``dense``)."""
        if self.structure == "dense":
            return w.detach().to("cpu", torch.float64).clone()
        m, k = w.shape
        out = torch.zeros(m, k, dtype=torch.float64)
        if self.a is not None and self.b is not None:
            out += self.a @ self.b
        if self.operator is not None:
            out += self.operator.to_dense(torch.float64).cpu()
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "params": self.params,
            "data_error": self.data_error,
            "weight_error": self.weight_error,
            "rank": self.rank,
            "depth": self.depth,
            "seconds": round(self.seconds, 3),
        }


def _finish(f: Fitted, w: torch.Tensor, wh: Whitening) -> Fitted:
    d = f.dense(w)
    f.data_error = data_error(d, w, wh.gram)
    f.weight_error = weight_error(d, w)
    return f


def fit_lowrank(w: torch.Tensor, wh: Whitening, rank: int, svd: WhitenedSVD | None = None) -> Fitted:
    """``lowrank`` at ``rank`` (closed form)."""
    m, k = w.shape
    svd = svd if svd is not None else whitened_svd(w, wh)
    a, b = svd.factors(rank)
    return _finish(Fitted("lowrank", lowrank_params(rank, m, k), 0.0, 0.0, rank=rank, a=a, b=b), w, wh)


def fit_joint(
    w: torch.Tensor,
    wh: Whitening,
    rank: int,
    depth: int,
    settings: GTildeSettings = GTildeSettings(),
    svd: WhitenedSVD | None = None,
    callbacks: Sequence[Any] = (),
) -> Fitted:
    """``gtilde+lowrank``: rank-``rank`` low rank plus depth-``depth`` G~, alternating exact
    minimisations of the data loss (see the module doc); never worse than the rank-``rank`` start."""
    m, k = w.shape
    w64 = w.detach().to("cpu", torch.float64)
    svd = svd if svd is not None else whitened_svd(w64, wh)
    a, b = svd.factors(rank)
    best = _finish(Fitted("gtilde+lowrank", 0, 0.0, 0.0, rank=rank, a=a, b=b), w64, wh)
    op = None
    for r in range(settings.rounds):
        resid = w64 - a @ b
        op = fit_gtilde(
            resid,
            wh,
            depth,
            GTildeSettings(**{**settings.__dict__, "seed": settings.seed + r}),
            zero_start=True,
            callbacks=callbacks,
        )
        g = op.to_dense(torch.float64).cpu()
        a, b = whitened_svd(w64 - g, wh).factors(rank)
        cand = _finish(Fitted("gtilde+lowrank", 0, 0.0, 0.0, rank=rank, a=a, b=b, operator=op), w64, wh)
        if cand.data_error < best.data_error:
            best = cand
    best.depth = depth
    best.width = gtilde_width(m, k, settings.sampler)
    best.params = lowrank_params(rank, m, k) + (2 * best.width * depth if best.operator is not None else 0)
    return best


@dataclass
class Choice:
    """The structure a layer takes at its budget, and every candidate tried (``candidates``)."""

    chosen: Fitted
    candidates: list[Fitted] = field(default_factory=list)
    budget: int = 0

    def why(self) -> str:
        others = ", ".join(f"{c.structure} {c.data_error:.4f}" for c in self.candidates if c is not self.chosen)
        return f"smallest data error {self.chosen.data_error:.4f} at {self.budget} params" + (
            f" (others: {others})" if others else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "structure": self.chosen.structure,
            "budget": self.budget,
            "why": self.why(),
            "candidates": [c.summary() for c in self.candidates],
        }


def smallest_params(m: int, k: int, structures: Sequence[str], sampler: str = "uniform") -> int:
    """The fewest parameters any of ``structures`` can have for an ``m × k`` layer (rank 1, one G~ layer)."""
    width = gtilde_width(m, k, sampler)
    least = {"lowrank": m + k, "gtilde": 2 * width, "gtilde+lowrank": m + k + 2 * width, "dense": m * k}
    return min(least[s] for s in structures)


def choose(
    w: torch.Tensor,
    wh: Whitening,
    budget: int,
    structures: Sequence[str] = STRUCTURES,
    settings: GTildeSettings = GTildeSettings(),
    svd: WhitenedSVD | None = None,
    callbacks: Sequence[Any] = (),
) -> Choice:
    """Fit each structure in ``structures`` within ``budget`` parameters and keep the smallest data
    error (ties: the earlier one in :data:`STRUCTURES`, i.e. the simpler). Structures that cannot
    fit the budget (``dense`` over it, G~ with not even one layer) are skipped."""
    import time

    unknown = [s for s in structures if s not in STRUCTURES]
    if unknown:
        raise SparsefitError(f"unknown structure {unknown[0]!r}; choose from {', '.join(STRUCTURES)}")
    m, k = w.shape
    w64 = w.detach().to("cpu", torch.float64)
    svd = svd if svd is not None else whitened_svd(w64, wh)
    cands: list[Fitted] = []
    for s in STRUCTURES:
        if s not in structures:
            continue
        t0 = time.perf_counter()
        f: Fitted | None = None
        if s == "dense" and budget >= m * k:
            f = _finish(Fitted("dense", m * k, 0.0, 0.0), w64, wh)
        elif s == "lowrank" and budget >= m + k:
            f = fit_lowrank(w64, wh, min(svd.max_rank, budget // (m + k)), svd)
        elif s == "gtilde":
            width = gtilde_width(m, k, settings.sampler)
            depth = gtilde_depth(budget, width)
            if depth >= 1:
                op = fit_gtilde(w64, wh, depth, settings, callbacks=callbacks)
                f = _finish(
                    Fitted("gtilde", 2 * width * depth, 0.0, 0.0, depth=depth, width=width, operator=op), w64, wh
                )
        elif s == "gtilde+lowrank":
            width = gtilde_width(m, k, settings.sampler)
            rank = min(svd.max_rank, int(settings.lowrank_share * budget) // (m + k))
            depth = gtilde_depth(budget - lowrank_params(rank, m, k), width)
            if depth >= 1 and rank >= 1:
                f = fit_joint(w64, wh, rank, depth, settings, svd, callbacks)
        if f is not None:
            f.seconds = time.perf_counter() - t0
            cands.append(f)
    if not cands:
        raise SparsefitError(f"no structure fits a budget of {budget} parameters for a {m}x{k} layer")
    best = min(cands, key=lambda c: c.data_error)  # min keeps the first of equal ones
    return Choice(best, cands, budget)
