"""Fused CPU training step for G~ (numba), beside its plain PyTorch reference.

One call does a whole training step's worth of operator work: forward through all ``N``
layers, the loss ``mean_batch ||G~x − t||² / out_features`` and the gradient with respect to
every block, for a batch of probes. Both functions share one signature::

    fit_step(x, t, blocks, perms, out_features) -> (mse, grad)

* ``x: (batch, in_features)`` probes, ``t: (batch, out_features)`` targets ``A x``;
* ``blocks: (N, n/2, 2, 2)``, ``perms: (N, n)`` (gather convention, see :mod:`sparsefit.operator`);
* ``mse``: a 0-d tensor, ``grad``: same shape and dtype as ``blocks``.

How the fused kernel is laid out (the layer-by-layer torch path pays for N separate gathers,
N batched matmuls and their autograd bookkeeping, each streaming the whole batch through
memory):

* the batch is cut into chunks of :data:`LANES` probes, stored feature-major
  (``act[layer, feature, lane]``) in cache-line-aligned buffers, so each 2×2 mix is a few
  vector operations on two rows (:mod:`.simd`) and a permutation gathers whole lane rows;
* a chunk's backward follows its forward immediately, on activations kept per thread: every
  layer's when they fit in ``cpu_apply.SEGMENT_BYTES`` (about one core's L2), else only the input of
  each segment of ``seglen`` layers, the backward recomputing a segment's inner activations (bit
  for bit the same) just before it walks back through it. Short segments keep more activations in
  the shared L3, long ones recompute more; which is faster depends on how busy the host's L3 is,
  so a fit times a few lengths as it goes (:class:`SegmentTuner`; ``(N + 1)·n·LANES`` values are
  10.5 MB at n = 2048, N = 40);
* the backward pass scatters the input gradient through the permutation (a bijection, so no
  write conflicts) and reduces the block gradient over the chunk's lanes, four blocks' sixteen
  sums in one shuffle tree (:func:`.simd.tree_sums`);
* chunks are spread over a fixed number of groups (not threads), each accumulating its own
  float64 gradient; groups are summed in a fixed order. The result is therefore the same for
  any thread count, so a seed reproduces a fit bit for bit.

Importing this module never fails; :func:`is_available` says whether numba is installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .reference import gtilde_reference

#: Number of gradient accumulators; fixed so that results do not depend on the thread count.
GROUPS = 8

try:  # numba is a declared dependency, but the torch path must keep working without it.
    import numba
    import numpy as np

    from .cpu_apply import (
        LANES,
        _forward_segments,
        _grad_layer_blocks,
        _grad_layer_both,
        _refill_segment,
        _segment_input,
        segment_length,
    )
    from .fpenv import ftz_enter, ftz_exit
    from .simd import aligned_empty

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only on installs without numba
    _HAVE_NUMBA = False


def is_available() -> bool:
    """True when the numba kernel can run."""
    return _HAVE_NUMBA


def fit_step_reference(
    x: torch.Tensor, t: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch oracle: generic autograd through :func:`gtilde_reference`."""
    b = blocks.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = gtilde_reference(x.to(b.dtype), b, perms, out_features)
        mse = ((y - t.to(b.dtype)) ** 2).sum(1).mean() / out_features
        (grad,) = torch.autograd.grad(mse, b)
    return mse.detach(), grad


#: Adam's constants, as ``torch.optim.Adam``'s defaults.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@dataclass
class AdamState:
    """Adam's moments and step count for one ``blocks`` tensor."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int = 0

    @classmethod
    def zeros_like(cls, blocks: torch.Tensor) -> AdamState:
        return cls(torch.zeros_like(blocks), torch.zeros_like(blocks), 0)


def adam_step_reference(
    x: torch.Tensor,
    t: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    out_features: int,
    state: AdamState,
    *,
    lr: float,
    reg: float,
    timings: dict[str, float] | None = None,
    seglen: int | None = None,
) -> torch.Tensor:
    """One training step in plain PyTorch: :func:`fit_step_reference`, plus ``reg`` times the
    orthogonality penalty's gradient, then Adam (``torch.optim.Adam``'s update) on ``blocks`` in
    place. Returns the mse (0-d tensor). The penalty (mean over blocks of ``2·||I − BᵀB||²_F``) is
    differentiated by autograd here, so this also checks the fused pass's closed form.
    ``timings`` and ``seglen`` are the fused step's knobs, accepted and ignored here."""
    mse, grad = fit_step_reference(x, t, blocks, perms, out_features)
    if reg > 0:
        b = blocks.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            eye = torch.eye(2, dtype=b.dtype)
            penalty = 2.0 * ((eye - b.transpose(-1, -2) @ b) ** 2).sum(dim=(-1, -2)).mean()
            (pgrad,) = torch.autograd.grad(penalty, b)
        grad = grad + reg * pgrad
    state.step += 1
    with torch.no_grad():
        state.exp_avg.lerp_(grad, 1 - BETA1)
        state.exp_avg_sq.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        denom = (state.exp_avg_sq.sqrt() / (1 - BETA2**state.step) ** 0.5).add_(EPS)
        blocks.addcdiv_(state.exp_avg, denom, value=-lr / (1 - BETA1**state.step))
    return mse


if _HAVE_NUMBA:
    # reassoc lets LLVM vectorise the lane reductions; no 'nnan'/'ninf' so a diverging fit
    # still produces NaN/Inf that the caller detects.
    _FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

    @numba.njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
    def _fit_step_kernel(x, t, blocks, perms, m, seglen, cp, seg, gbuf, gacc, sq, x_fm, t_fm):  # pragma: no cover
        # Layers run in segments of ``seglen``: the forward keeps only each segment's input
        # (cp[s]) and the output (cp[nseg]); the backward recomputes a segment's inner
        # activations into ``seg`` just before it needs them (see cpu_apply.SEGMENT_BYTES).
        # ``x_fm`` / ``t_fm``: x is stored feature-major, (k, batch), t likewise (m, batch) — the
        # layout probes are drawn in and a target's product comes out in — else row-major.
        if x_fm:
            k, batch = x.shape
        else:
            batch, k = x.shape
        depth, n = perms.shape
        nchunks = (batch + LANES - 1) // LANES
        groups = gacc.shape[0]
        scale = 2.0 / (m * batch)
        zero = blocks.dtype.type(0)
        nseg = (depth + seglen - 1) // seglen
        for g in numba.prange(groups):
            fp_mode = ftz_enter()  # subnormals as zero (kernels/fpenv.py)
            tid = numba.get_thread_id()
            c = cp[tid]
            sb = seg[tid]
            gb = gbuf[tid]
            acc = gacc[g]
            acc[:] = 0.0
            se = 0.0
            c0 = (nchunks * g) // groups
            c1 = (nchunks * (g + 1)) // groups
            for ch in range(c0, c1):
                b0 = ch * LANES
                nl = min(LANES, batch - b0)
                # input, zero-padded to the width and to full lanes
                a0 = c[0]
                a0[:, :] = zero
                if x_fm:
                    for i in range(k):
                        xr = x[i]
                        ar = a0[i]
                        for lane in range(nl):
                            ar[lane] = xr[b0 + lane]
                else:
                    for lane in range(nl):
                        xr = x[b0 + lane]
                        for i in range(k):
                            a0[i, lane] = xr[i]
                # forward, keeping the segments' inputs and the output (cp[nseg])
                _forward_segments(c, sb, seglen, nseg, blocks, perms)
                # loss and its gradient at the output (rows >= m are sliced off: gradient 0)
                out = c[nseg]
                g0 = gb[0]
                g0[:, :] = zero
                if t_fm:
                    for i in range(m):
                        tr = t[i]
                        orow = out[i]
                        grow = g0[i]
                        for lane in range(nl):
                            d = orow[lane] - tr[b0 + lane]
                            se += d * d
                            grow[lane] = scale * d
                else:
                    for lane in range(nl):
                        tr = t[b0 + lane]
                        for i in range(m):
                            d = out[i, lane] - tr[i]
                            se += d * d
                            g0[i, lane] = scale * d
                # backward, segment by segment: gb[cur] holds dL/d(output of layer j)
                cur = 0
                for s in range(nseg - 1, -1, -1):
                    j0 = s * seglen
                    _refill_segment(c, sb, s, seglen, blocks, perms)
                    for j in range(min(depth, j0 + seglen) - 1, j0 - 1, -1):
                        src = _segment_input(c, sb, s, seglen, j)
                        if j > 0:
                            _grad_layer_both(src, gb[cur], gb[1 - cur], perms[j], blocks[j], acc[j])
                        else:  # the input's gradient is not needed
                            _grad_layer_blocks(src, gb[cur], perms[j], acc[j])
                        cur = 1 - cur
            sq[g] = se
            ftz_exit(fp_mode)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _reduce_groups(gacc, out):  # pragma: no cover - compiled
        groups, depth, h = gacc.shape[0], gacc.shape[1], gacc.shape[2]
        for j in numba.prange(depth):
            for blk in range(h):
                for r in range(2):
                    for c in range(2):
                        s = 0.0
                        for g in range(groups):  # fixed order: deterministic
                            s += gacc[g, j, blk, r, c]
                        out[j, blk, r, c] = s

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _reduce_reg_adam(gacc, blocks, m1, m2, reg, inv_count, lr_c, b1, b2, eps, bc2_sqrt):  # pragma: no cover
        # One pass per block: gradient = sum of the groups (fixed order) + reg · d(penalty)/dB,
        # then Adam. d(penalty)/dB = −8·B·(I − BᵀB) / count (see orthogonality_penalty_grad).
        groups, depth, h = gacc.shape[0], gacc.shape[1], gacc.shape[2]
        for j in numba.prange(depth):
            fp_mode = ftz_enter()
            for blk in range(h):
                b00 = float(blocks[j, blk, 0, 0])
                b01 = float(blocks[j, blk, 0, 1])
                b10 = float(blocks[j, blk, 1, 0])
                b11 = float(blocks[j, blk, 1, 1])
                c = -8.0 * reg * inv_count
                m00 = 1.0 - (b00 * b00 + b10 * b10)
                m01 = -(b00 * b01 + b10 * b11)
                m11 = 1.0 - (b01 * b01 + b11 * b11)
                r00 = c * (b00 * m00 + b01 * m01)
                r01 = c * (b00 * m01 + b01 * m11)
                r10 = c * (b10 * m00 + b11 * m01)
                r11 = c * (b10 * m01 + b11 * m11)
                for r in range(2):
                    for cc in range(2):
                        s = 0.0
                        for g in range(groups):  # fixed order: deterministic
                            s += gacc[g, j, blk, r, cc]
                        if r == 0:
                            s += r00 if cc == 0 else r01
                        else:
                            s += r10 if cc == 0 else r11
                        gr = blocks.dtype.type(s)
                        ma = m1[j, blk, r, cc]
                        ma = ma + (1 - b1) * (gr - ma)
                        va = b2 * m2[j, blk, r, cc] + (1 - b2) * gr * gr
                        m1[j, blk, r, cc] = ma
                        m2[j, blk, r, cc] = va
                        blocks[j, blk, r, cc] -= lr_c * ma / (np.sqrt(va) / bc2_sqrt + eps)
            ftz_exit(fp_mode)


_WORKSPACE: dict[tuple, np.ndarray] = {}
#: Shapes kept per scratch buffer (one per segment length a tuner tries).
_WORKSPACE_SHAPES = 4


def _workspace(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A scratch buffer kept between calls: a fit calls the step thousands of times with the
    same shapes, and fresh multi-MB allocations would pay page faults on every step. The last
    :data:`_WORKSPACE_SHAPES` shapes of each buffer are kept, so that a :class:`SegmentTuner`
    switching between segment lengths reuses its buffers."""
    key = (name, shape, np.dtype(dtype).str)
    buf = _WORKSPACE.pop(key, None)
    if buf is None:
        buf = aligned_empty(shape, dtype)
        same_name = [k for k in _WORKSPACE if k[0] == name]
        for k in same_name[: max(0, len(same_name) - _WORKSPACE_SHAPES + 1)]:  # least recently used first
            del _WORKSPACE[k]
    _WORKSPACE[key] = buf  # (re)inserted last: dicts keep insertion order
    return buf


def _layout(a: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, bool]:
    """``a: (batch, features)`` as a numpy array the kernel reads without a copy where possible:
    ``(a.T, True)`` when ``a`` is a transposed contiguous tensor (feature-major, as
    :class:`sparsefit.fitting.RandomProbes` draws probes and as a target's product comes out),
    else ``(a, False)``, row-major."""
    a = a.detach()
    if a.dim() == 2 and a.shape[0] > 1 and a.t().is_contiguous() and not a.is_contiguous():
        return a.t().to(dtype).contiguous().numpy(), True
    return a.to(dtype).contiguous().numpy(), False


def _run_kernel(x, t, blocks, perms, out_features, seglen=None):
    """Runs the fused kernel; returns (sum of squared errors, per-group gradient accumulators).
    ``seglen``: layers per checkpoint segment (default ``cpu_apply.segment_length``); any value gives
    the same bytes (the recomputed activations are the stored ones, bit for bit)."""
    if not _HAVE_NUMBA:  # pragma: no cover
        raise RuntimeError("numba is not installed")
    if x.device.type != "cpu" or blocks.device.type != "cpu":
        raise ValueError("the numba fit step runs on CPU tensors")
    dtype = blocks.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"blocks must be float32 or float64, got {dtype}")
    depth, h = blocks.shape[0], blocks.shape[1]
    n = 2 * h
    batch = x.shape[0]
    xn, x_fm = _layout(x, dtype)
    tn, t_fm = _layout(t, dtype)
    bn = blocks.detach().contiguous().numpy()
    pn = perms.detach().to(torch.int64).contiguous().numpy()  # no copy for a fit's int64 buffer
    nchunks = (batch + LANES - 1) // LANES
    groups = max(1, min(GROUPS, nchunks))
    npdt = bn.dtype
    threads = numba.get_num_threads()
    seglen = segment_length(depth, n, npdt.itemsize, LANES) if seglen is None else int(seglen)
    nseg = (depth + seglen - 1) // seglen
    cp = _workspace("cp", (threads, nseg + 1, n, LANES), npdt)
    seg = _workspace("seg", (threads, max(2, seglen - 1), n, LANES), npdt)
    gbuf = _workspace("gbuf", (threads, 2, n, LANES), npdt)
    gacc = _workspace("gacc", (groups, depth, h, 2, 2), np.float64)
    sq = np.zeros(groups, dtype=np.float64)
    _fit_step_kernel(xn, tn, bn, pn, int(out_features), seglen, cp, seg, gbuf, gacc, sq, x_fm, t_fm)
    return float(sq.sum()), gacc


def adam_step_numba(
    x: torch.Tensor,
    t: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    out_features: int,
    state: AdamState,
    *,
    lr: float,
    reg: float,
    timings: dict[str, float] | None = None,
    seglen: int | None = None,
) -> torch.Tensor:
    """One training step, fused: same signature and result as :func:`adam_step_reference`.

    The kernel computes the loss and the per-group block gradients; one more compiled pass sums
    the groups, adds the regulariser's gradient and applies Adam to ``blocks`` in place (no
    gradient tensor, no autograd, no optimizer object). ``timings`` (optional) receives the
    seconds spent in ``kernel`` and ``optimiser``; ``seglen`` the layers per checkpoint segment
    (default :func:`cpu_apply.segment_length`; every value gives the same bytes, see
    :class:`SegmentTuner`).
    """
    t0 = time.perf_counter()
    sq, gacc = _run_kernel(x, t, blocks, perms, out_features, seglen)
    t1 = time.perf_counter()
    state.step += 1
    bn = blocks.detach().numpy()
    count = blocks.numel() // 4
    _reduce_reg_adam(
        gacc,
        bn,
        state.exp_avg.numpy(),
        state.exp_avg_sq.numpy(),
        float(reg),
        1.0 / count,
        float(lr) / (1 - BETA1**state.step),
        BETA1,
        BETA2,
        EPS,
        (1 - BETA2**state.step) ** 0.5,
    )
    if timings is not None:
        timings["kernel"] = t1 - t0
        timings["regulariser+optimiser"] = time.perf_counter() - t1
    return torch.tensor(sq / (out_features * x.shape[0]), dtype=blocks.dtype)


def segment_candidates(depth: int, width: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The segment lengths worth timing for the fit step: only 1 when every layer's activations
    fit in ``cpu_apply.SEGMENT_BYTES``; else 1 (keep them all, in L3), 2 (keep every other
    layer's, recompute half a forward), 4 and :func:`cpu_apply.segment_length`'s (an L2-sized
    segment, the most recomputation). Which is fastest depends on how contended the shared L3
    is: on a 2-core Xeon, 2 was 10-25 % faster than 8 in a quiet-ish hour, 25 % slower under
    heavy load (benchmarks/NOTES.md)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    default = segment_length(depth, width, itemsize, LANES)
    if default == 1:
        return (1,)
    return tuple(sorted({1, 2, min(4, depth), default}))


class SegmentTuner:
    """Chooses the fit step's checkpoint segment length by timing the kernel while fitting.

    Every segment length gives the same loss and gradient bit for bit (the recomputed
    activations are the stored ones), so the choice changes speed only: a fit's bytes do not
    depend on it. The tuner explores at the start and every ``period`` steps after (each
    candidate ``trials`` times, round robin), then uses the candidate with the lowest median
    kernel time until the next exploration; a host whose load changes during a long fit gets
    a new choice. Call :meth:`next` for the segment length of a step, then :meth:`record` with
    the kernel's seconds.
    """

    def __init__(self, candidates: tuple[int, ...], *, trials: int = 3, period: int = 500) -> None:
        if not candidates:
            raise ValueError("SegmentTuner needs at least one candidate")
        self.candidates = tuple(candidates)
        self.trials, self.period = int(trials), int(period)
        self.choice = self.candidates[-1]
        self.steps = 0
        self._plan: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._explore()

    def _explore(self) -> None:
        if len(self.candidates) > 1:
            self._plan = [c for _ in range(self.trials) for c in self.candidates]
            self._times = {c: [] for c in self.candidates}

    def next(self) -> int:
        """The segment length for the coming step."""
        return self._plan[0] if self._plan else self.choice

    def record(self, seglen: int, seconds: float) -> None:
        """The kernel's time for a step run with ``seglen`` (from :meth:`next`)."""
        self.steps += 1
        if self._plan and seglen == self._plan[0]:
            self._plan.pop(0)
            self._times[seglen].append(seconds)
            if not self._plan:
                medians = {c: sorted(v)[len(v) // 2] for c, v in self._times.items()}
                self.choice = min(self.candidates, key=lambda c: (medians[c], c))
        elif not self._plan and self.steps % self.period == 0:
            self._explore()


def fit_step_numba(
    x: torch.Tensor, t: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused numba step; same signature and results as :func:`fit_step_reference`.

    CPU tensors only. ``x`` and ``t`` are cast to ``blocks.dtype`` (float32 or float64).
    """
    sq, gacc = _run_kernel(x, t, blocks, perms, out_features)
    grad = np.empty(tuple(blocks.shape), dtype=blocks.detach().numpy().dtype)
    _reduce_groups(gacc, grad)
    mse = sq / (out_features * x.shape[0])
    return torch.tensor(mse, dtype=blocks.dtype), torch.from_numpy(grad)
