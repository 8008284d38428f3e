"""Layer-wise least squares on the exact loss ("ALS sweeps"): each layer's blocks in closed form.

``G~`` is linear in each layer's blocks. With the layers above layer ``j`` collapsed into
``Q_j = S·L_{N-1}···L_{j+1}`` (``out × n``; ``S`` keeps the first ``out`` entries) and the ones
below into ``Z_j = P_j·L_{j-1}···L_0·E`` (``n × in``; ``E`` zero-pads the input),
``G~ = Q_j B_j Z_j`` and ``||G~ − A||²_F`` is a quadratic in ``B_j``'s ``2n`` entries. For the
entry in row ``p`` and column ``q`` of ``B_j`` (``p`` and ``q`` in the same 2×2 block) its Hessian
is ``H[(p,q),(p',q')] = (Q_jᵀQ_j)[p,p'] · (Z_jZ_jᵀ)[q,q']`` and its right-hand side
``(Q_jᵀ A Z_jᵀ)[p,q]``. A sweep solves these ``2n × 2n`` systems for ``j = 0, …, N−1`` in turn,
each by :data:`CG_ITERS` conjugate-gradient steps from the current blocks, preconditioned by the
Hessian's 4 × 4 diagonal blocks, with the Hessian never formed (its product is ``O(n²)``,
:mod:`sparsefit.kernels.sweep`); ``exact=True`` factorises it instead (Cholesky, ``O(n³)``: a
sweep 2.8× slower at width 2048, up to 6 % more progress per sweep, ``docs/quality.md`` §12).
The factors never need a product of two dense matrices: going up, ``Z_jZ_jᵀ`` and ``A Z_jᵀ`` are
carried from layer to layer in ``O(n²)``; ``Q_j`` and ``M_j = Q_jᵀQ_j`` are carried down from
the top the same way, kept only at checkpoints every ``√N`` layers and carried down again between
them when the sweep reaches them (:func:`_layers_above`; fused kernels in
:mod:`sparsefit.kernels.sweep`). Each solve is damped towards the current blocks
(Levenberg–Marquardt, ``λ·||B_j − B_j^old||²`` with ``λ`` a tiny fraction of the Hessian's mean
diagonal), so no layer raises the loss and the gauge freedom between layers cannot make a step
blow up.

With input rows ``x`` (``als_sweeps(..., x=…)``, e.g. calibration activations) the loss is the
data loss ``||(G~ − A)·xᵀ||²_F``: the same algebra with ``Z_j`` ending in ``E·xᵀ`` instead of ``E``.

This is block-coordinate Gauss–Newton (exact Newton, since the model is linear in each block): it
needs the dense target (and the rows, for the data loss) but no probes, and it is a polish, not a fit from scratch — started from a
random orthogonal operator it stalls far above what the Adam schedule reaches
(``docs/quality.md`` §10). Everything runs in float64 on the operator's device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import SparsefitError
from .kernels.sweep import congruence, hessian_product, mix_gather

__all__ = [
    "ALS_MAX_WIDTH",
    "AUTO_SWEEPS",
    "SWEEPS_PER_ROUND",
    "SweepInfo",
    "affordable_sweeps",
    "als_sweeps",
    "check_als_width",
]

#: The widest operator a sweep is allowed on: a sweep keeps ``Q_j`` (``out × width``) and
#: ``Q_jᵀQ_j`` (``width²``) in float64 for about ``2·√depth`` layers (width 4096, depth 44: 2.8 GB),
#: and the exact solve factorises a ``2·width``-square matrix (8192²: 0.5 GB).
ALS_MAX_WIDTH = 4096
#: Levenberg–Marquardt damping, relative to the mean diagonal of each layer's Hessian.
DAMPING = 1e-9
#: A sweep that lowers the loss by less than this fraction ends the sweeps.
TOLERANCE = 1e-4
#: The most sweeps the default (``FitConfig.sweeps = None``) runs.
AUTO_SWEEPS = 15
#: Sweeps per round by default (``FitConfig.rounds = None``): between two rounds, Adam steps on
#: the same loss move all layers at once and the next sweep gains most (``docs/quality.md`` §14).
SWEEPS_PER_ROUND = 2
#: What one sweep costs in Adam steps with one probe, per unit of width: a sweep is ``depth`` layer
#: solves of ``O(width²)`` work each (no dense products), an Adam step ``depth·width·batch``.
#: ``benchmarks/bench_sweep.py`` measures it: 73 at width 2048, depth 40 on a 2-core Xeon (a sweep
#: 5.7 s, a batch-1024 step 39 ms; ``docs/quality.md`` §13); machines whose steps are faster
#: relative to their memory bandwidth give more, hence the round 100.
SWEEP_COST = 100
#: Conjugate-gradient steps per layer solve, and the drop in the preconditioned residual
#: (``rᵀP⁻¹r``, relative to the start) that ends them sooner.
CG_ITERS = 10
CG_TOLERANCE = 1e-20


@dataclass(frozen=True)
class SweepInfo:
    """Reported to callbacks' ``on_sweep`` after each sweep: the exact loss
    ``||G~ − A||²_F / out`` (the scale of the training MSE) before any sweep (``sweep = 0``) and
    after each, and the seconds since the sweeps started; in a fit with ``rounds``, the round the
    sweep belongs to (sweeps are counted across rounds)."""

    sweep: int
    total: int
    mse: float
    seconds: float
    round: int = 1
    rounds: int = 1


def check_als_width(width: int) -> None:
    if width > ALS_MAX_WIDTH:
        raise SparsefitError(
            f"least-squares sweeps solve a {2 * width}-square system per layer; width {width} is above "
            f"the limit of {ALS_MAX_WIDTH}: use --sweeps 0"
        )


def affordable_sweeps(width: int, steps: int, batch: int) -> int:
    """The default number of sweeps: as many as cost no more than the ``steps`` Adam steps of
    ``batch`` probes before them (by :data:`SWEEP_COST`, the same on every machine, so the same
    command gives the same bytes), at most :data:`AUTO_SWEEPS`; none above :data:`ALS_MAX_WIDTH`.
    At the note's protocol for a 1024 × 1024 target (width 2048, 12000 steps, batch 1024) that is
    15, at width 2048 with 3000 steps of batch 256 three."""
    if width > ALS_MAX_WIDTH or steps < 1:
        return 0
    return min(AUTO_SWEEPS, int(steps * batch / (SWEEP_COST * width)))


def _above_step(
    q: torch.Tensor, m: torch.Tensor, b: torch.Tensor, inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q_{j−1}, M_{j−1})`` from ``(Q_j, M_j)`` and layer ``j`` (blocks ``b``, inverse permutation
    ``inv``): ``Q_{j−1} = Q_j·B_j·P_j`` (column ``perm[i]`` of it is column ``i`` of ``Q_j·B_j``) and
    ``M_{j−1} = Q_{j−1}ᵀQ_{j−1} = P_jᵀ·B_jᵀ·M_j·B_j·P_j``, both in ``O(n²)``."""
    bt = b.transpose(1, 2)
    return mix_gather(q, bt, inv), congruence(m, bt, inv)


def _layers_above(
    blocks: torch.Tensor, perms: torch.Tensor, out: int, segment: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(Q_j, M_j)`` for ``j = 0, 1, …, N−1`` in turn, each from the blocks of the layers above
    ``j`` as they are when it is yielded (a sweep updates the layers below). ``Q_j`` is carried down
    from ``Q_{N−1} = S`` once; only the top layer of each segment ``[lo, lo + segment)`` is kept
    (a checkpoint), and a segment's other layers are carried down from it again when the sweep
    reaches it: ``N / segment + segment`` pairs in memory instead of ``N``, at twice the work."""
    depth, n = perms.shape
    q = torch.zeros(out, n, dtype=blocks.dtype, device=blocks.device)
    q[:, :out] = torch.eye(out, dtype=blocks.dtype, device=blocks.device)
    m = torch.diag((torch.arange(n, device=blocks.device) < out).to(blocks.dtype))
    invs = torch.argsort(perms, dim=1)
    tops = [min(lo + segment, depth) - 1 for lo in range(0, depth, segment)]
    checkpoints = {}
    for j in range(depth - 1, tops[0] - 1, -1):
        if j in tops:
            checkpoints[j] = (q, m)
        if j > tops[0]:
            q, m = _above_step(q, m, blocks[j], invs[j])
    del q, m
    for lo, top in zip(range(0, depth, segment), tops, strict=True):
        above = [checkpoints.pop(top)]
        for j in range(top, lo, -1):
            above.append(_above_step(*above[-1], blocks[j], invs[j]))
        while above:
            yield above.pop()


def _layer_system(
    q: torch.Tensor, m: torch.Tensor, c: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One layer's normal equations in the factored form both solvers use (``M = QᵀQ``, ``C``):
    the right-hand side ``(Qᵀ U)[p, q]`` over the blocks' entries ``(h, 2, 2)``, the 4 × 4 diagonal
    blocks of the Hessian ``(h, 4, 4)`` and the damping ``λ``."""
    h = q.shape[1] // 2
    rhs = torch.einsum("obr,obc->brc", q.reshape(q.shape[0], h, 2), u.reshape(u.shape[0], h, 2))
    mb = m.reshape(h, 2, h, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    cb = c.reshape(h, 2, h, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    diag_blocks = (mb[:, :, None, :, None] * cb[:, None, :, None, :]).reshape(h, 4, 4)
    lam = DAMPING * float(diag_blocks.diagonal(dim1=1, dim2=2).mean()) + 1e-300
    return rhs, diag_blocks, lam


def _solve_layer(
    q: torch.Tensor, m: torch.Tensor, c: torch.Tensor, u: torch.Tensor, b_old: torch.Tensor, iters: int = CG_ITERS
) -> torch.Tensor:
    """The damped least-squares blocks of one layer (see the module docstring), approximately:
    ``iters`` conjugate-gradient steps from the current blocks, preconditioned by the Hessian's
    4 × 4 diagonal blocks (one per 2 × 2 block). Each step lowers the damped quadratic, so the
    result never raises the loss; with ``iters ≥ 2n`` it is the exact solve
    (:func:`_solve_layer_exact`) up to rounding."""
    h = b_old.shape[0]
    rhs, diag_blocks, lam = _layer_system(q, m, c, u)
    eye = torch.eye(4, dtype=m.dtype, device=m.device)
    # any SPD preconditioner keeps CG correct; the floor keeps all-zero blocks (padding) invertible
    floor = 1e-6 * diag_blocks.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None] + lam
    precond = torch.linalg.inv(diag_blocks + floor * eye)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return hessian_product(m, c, v) + lam * v

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return torch.bmm(precond, r.reshape(h, 4, 1)).reshape(h, 2, 2)

    x = b_old.clone()
    r = rhs - hessian_product(m, c, x)  # the damping term vanishes at x = b_old
    z = precondition(r)
    p = z.clone()
    rz = float(torch.sum(r * z))
    rz0 = rz
    for _ in range(iters):
        if not rz > CG_TOLERANCE * rz0:  # converged (or nothing to do: rz0 = 0)
            break
        ap = apply(p)
        pap = float(torch.sum(p * ap))
        if not pap > 0:  # rounding: no direction of descent left
            break
        step = rz / pap
        x.add_(p, alpha=step)
        r.sub_(ap, alpha=step)
        z = precondition(r)
        rz_next = float(torch.sum(r * z))
        p = z.add_(p, alpha=rz_next / rz)
        rz = rz_next
    return x


def _solve_layer_exact(
    q: torch.Tensor, m: torch.Tensor, c: torch.Tensor, u: torch.Tensor, b_old: torch.Tensor, iters: int = CG_ITERS
) -> torch.Tensor:
    """The reference for :func:`_solve_layer`: the same damped system solved exactly, by a
    Cholesky factorisation of the dense ``2n × 2n`` Hessian (``iters`` is ignored)."""
    h = b_old.shape[0]
    rhs, _, lam = _layer_system(q, m, c, u)
    m4 = m.reshape(h, 2, h, 2)
    c4 = c.reshape(h, 2, h, 2)
    # H[(b, r, c), (b', r', c')] = M[2b+r, 2b'+r'] · C[2b+c, 2b'+c']
    hess = (m4[:, :, None, :, :, None] * c4[:, None, :, :, None, :]).reshape(4 * h, 4 * h)
    diag = hess.diagonal()
    theta_old = b_old.reshape(4 * h)
    rhs = rhs.reshape(4 * h)
    for _ in range(8):
        diag.add_(lam)
        factor, info = torch.linalg.cholesky_ex(hess)
        if int(info) == 0:
            theta = torch.cholesky_solve((rhs + lam * theta_old)[:, None], factor)[:, 0]
            return theta.reshape(h, 2, 2)
        diag.sub_(lam)
        lam *= 1e3
    return b_old.clone()  # numerically singular even when heavily damped: leave the layer as it is


def als_sweeps(
    blocks: torch.Tensor,
    perms: torch.Tensor,
    a: torch.Tensor,
    sweeps: int,
    *,
    on_sweep: Callable[[SweepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    exact: bool = False,
    x: torch.Tensor | None = None,
) -> list[float]:
    """Run ``sweeps`` least-squares sweeps on ``blocks`` (float64, ``(depth, n/2, 2, 2)``, updated
    in place) for the dense target ``a`` (``(out, in)``). Returns the exact loss
    ``||G~ − A||²_F / out`` before the first sweep and after each completed one (each also goes to
    ``on_sweep`` as a :class:`SweepInfo`); it never rises.
    Stops early when a sweep lowers the loss by less than :data:`TOLERANCE` of it or
    ``should_stop()`` is true. ``exact=True`` solves each layer by Cholesky
    (:func:`_solve_layer_exact`) instead of :data:`CG_ITERS` conjugate-gradient steps.

    ``x`` (float64 ``(rows, in)``, e.g. calibration inputs) makes the loss a data loss,
    ``||(G~ − A)·xᵀ||²_F / out``: the layer below then starts as ``Z_0 = P_0·E·xᵀ`` instead of
    ``P_0·E`` and the right-hand sides use ``A·xᵀ`` (``None``: the identity, the plain loss).

    On ``KeyboardInterrupt`` the blocks hold the last layer solved (each solve lowers the loss) and
    the interrupt propagates."""
    if blocks.dtype != torch.float64 or a.dtype != torch.float64 or (x is not None and x.dtype != torch.float64):
        raise TypeError("als_sweeps works in float64")
    if x is not None and (x.dim() != 2 or x.shape[1] != a.shape[1]):
        raise ValueError(f"x must be (rows, {a.shape[1]}), got {tuple(x.shape)}")
    depth, n = perms.shape
    out, k = a.shape
    segment = max(1, math.isqrt(depth))
    solve = _solve_layer_exact if exact else _solve_layer
    t0 = time.perf_counter()

    def emit(i: int, mse: float) -> None:
        if on_sweep is not None:
            on_sweep(SweepInfo(i, sweeps, mse, time.perf_counter() - t0))

    target = a if x is None else a @ x.t()  # what G~ applied to the inputs should give
    # what every sweep starts from (it depends on P_0 and x only): Z_0ᵀ (rows × n), C_0 = Z_0 Z_0ᵀ
    # and U_0 = target·Z_0ᵀ (out × n)
    p0 = perms[0]
    if x is None:  # Z_0 = P_0 E: a 0/1 matrix, C_0 diagonal
        zt0 = torch.eye(n, dtype=a.dtype, device=a.device)[:k][:, p0]
        c0 = torch.diag((p0 < k).to(a.dtype))
        a_pad = torch.zeros(out, n, dtype=a.dtype, device=a.device)
        a_pad[:, :k] = a
        u0 = a_pad[:, p0]
    else:
        x_pad = torch.zeros(n, x.shape[0], dtype=a.dtype, device=a.device)
        x_pad[:k] = x.t()
        zt0 = x_pad[p0].t().contiguous()
        c0, u0 = zt0.t() @ zt0, target @ zt0
    # the permutation after each layer (none after the last)
    nexts = [*perms[1:], torch.arange(n, device=a.device)]

    def loss(zt_top: torch.Tensor) -> float:
        return float(torch.sum((zt_top[:, :out].t() - target) ** 2)) / out

    zt = zt0
    for j in range(depth):
        zt = mix_gather(zt, blocks[j], nexts[j])
    losses = [loss(zt)]
    emit(0, losses[0])
    for s in range(sweeps):
        zt, c, u = zt0, c0, u0
        for j, (q, m) in enumerate(_layers_above(blocks, perms, out, segment)):
            b = solve(q, m, c, u, blocks[j])
            blocks[j] = b
            del q, m
            zt = mix_gather(zt, b, nexts[j])
            if j + 1 < depth:
                c = congruence(c, b, nexts[j])
                u = mix_gather(u, b, nexts[j])
        mse = loss(zt)
        losses.append(mse)
        emit(s + 1, mse)
        if not math.isfinite(mse) or losses[-2] - mse <= TOLERANCE * losses[-2]:
            break
        if should_stop is not None and should_stop():
            break
    return losses
