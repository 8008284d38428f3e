"""Fused CPU kernels (numba) applying G~ and its gradients: the ``cpu`` backend.

Launchers :func:`forward` and :func:`backward` (same shapes as the GPU launchers in
:mod:`sparsefit.kernels.gpu`), wrapped as the custom ops ``sparsefit::gtilde_cpu_fwd`` /
``sparsefit::gtilde_cpu_bwd`` in :mod:`sparsefit.kernels.ops`; the functional is
:func:`sparsefit.kernels.ops.gtilde_fused_cpu`. The reference is
:func:`sparsefit.kernels.reference.gtilde_reference` (same contract).

Layout (why it is fast): G~'s parameters are small (``N·n`` 2×2 blocks: 786 KB at n = 4096,
N = 24) while the dense layer is ``n²``, so the aim is to stream the input once and keep the
state in cache through all ``N`` layers.

* **Chunks of rows** (batch ≥ :data:`MIN_LANES_BATCH`): :data:`LANES` rows at a time, stored
  feature-major (``state[feature, lane]``) in 64-byte-aligned buffers, so a permutation gathers
  whole lane rows (contiguous loads) and each 2×2 mix is a few vector operations on two rows
  (:mod:`.simd`); the two ping-pong state buffers (``2·n·LANES`` values, 1 MB at n = 4096) stay
  in L2 through every layer. Chunks are
  spread over threads (``prange``); each row's arithmetic is the same whichever thread runs it.
* **Rows one by one, along the width** (batches below :data:`MIN_LANES_BATCH`): the state is
  one vector of ``n`` values (L1-resident up to n = 4096 in float32), one gather and one 2×2 mix
  per entry and layer. (Storing each layer's output de-interleaved, so that the stores are
  contiguous and the loop vectorises with SIMD gathers, measured 25 % slower on Zen 4.)
* **Padding and slicing are fused**: the input is copied into the zero-padded state, the first
  ``out_features`` entries of the result are written to ``y`` directly.
* **Backward** recomputes a chunk's forward (only ``x`` is kept from the forward pass, no
  activations), keeping each layer's state for that chunk — or, when that exceeds
  :data:`SEGMENT_BYTES`, only every :func:`segment_length`-th, the reverse pass recomputing the
  layers between from it — then runs the layers in reverse:
  the input gradient is scattered through the permutation (a bijection: no write conflicts)
  and the block gradient is reduced over the chunk's lanes (four blocks' sums in one shuffle
  tree, :func:`.simd.tree_sums`) into one of a fixed number of
  float64 accumulators (:data:`GROUPS`), summed in a fixed order — the same bits for any
  thread count.

Dtypes: float32 and float64 run natively (arithmetic in the input's dtype); bfloat16 and
float16 inputs or blocks are stored as such and computed in float32 (converted at the
boundary). Everything is compiled on first use and cached on disk (``cache=True``); importing
this module compiles nothing, and ``import sparsefit`` does not import it.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .fpenv import ftz_enter, ftz_exit
from .simd import (
    LANES,
    QUAD,
    aligned_empty,
    grad_blocks_one,
    grad_blocks_quad,
    grad_both_one,
    grad_both_quad,
    grad_input_block,
    layer_block,
)

#: Batches below this run row by row (a 32-lane chunk costs about six rows' time).
MIN_LANES_BATCH = 6
#: Calls with fewer entry-layer updates than this run on one thread (about 0.3 ms of work).
PARALLEL_MIN_WORK = 1 << 21
#: Block-gradient accumulators; fixed, so the result does not depend on the thread count.
GROUPS = 4
#: Activation memory per thread that a chunk's reverse pass may keep (about one core's L2 cache).
#: Deeper or wider operators run in checkpoint segments (:func:`segment_length`): the forward
#: keeps each segment's input only, and the reverse pass recomputes a segment's inner activations
#: (bit for bit the stored ones) just before it walks back through it — one more forward's
#: arithmetic for a working set that stays in cache. Shared with the fit step (``kernels/cpu.py``),
#: where at width 2048, depth 40 it took a busy host's kernel from 142-150 ms to 59-61 ms.
SEGMENT_BYTES = 2 * 2**20


def segment_length(depth: int, width: int, itemsize: int, lanes: int = LANES) -> int:
    """Layers per checkpoint segment: 1 (keep every layer's activations) when ``depth + 1`` of
    them fit in :data:`SEGMENT_BYTES`, else as many layers as fit there (at least 2)."""
    layer = width * lanes * itemsize
    if (depth + 1) * layer <= SEGMENT_BYTES:
        return 1
    return max(2, min(depth, SEGMENT_BYTES // layer))


# reassoc/contract let LLVM vectorise and fuse; no 'nnan'/'ninf', so NaN and Inf propagate.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_JIT = {"fastmath": _FASTMATH, "cache": True, "nogil": True, "boundscheck": False}


# ----------------------------------------------------------------------------------------------
# Kernels (compiled on first use)
# ----------------------------------------------------------------------------------------------
@numba.njit(inline="always", **_JIT)
def _row_layer(src, dst, p, w):  # pragma: no cover - compiled
    """``dst = B_j (P_j src)`` for one row (vectors of length n)."""
    for b in range(p.shape[0] // 2):
        u0 = src[p[2 * b]]
        u1 = src[p[2 * b + 1]]
        dst[2 * b] = w[b, 0, 0] * u0 + w[b, 0, 1] * u1
        dst[2 * b + 1] = w[b, 1, 0] * u0 + w[b, 1, 1] * u1


@numba.njit(inline="always", **_JIT)
def _row_input(xr, u):  # pragma: no cover - compiled
    """``u = x`` zero-padded to the width."""
    k = xr.shape[0]
    for i in range(k):
        u[i] = xr[i]
    for i in range(k, u.shape[0]):
        u[i] = u.dtype.type(0)


@numba.njit(inline="always", **_JIT)
def _row_forward(xr, blocks, perms, yr, u, v):  # pragma: no cover - compiled
    """One row, vectorised along the width: ``u``, ``v`` are scratch vectors of length n."""
    fp_mode = ftz_enter()  # subnormals as zero in every kernel body (kernels/fpenv.py)
    _row_input(xr, u)
    src, dst = u, v
    for j in range(perms.shape[0]):
        _row_layer(src, dst, perms[j], blocks[j])
        src, dst = dst, src
    for i in range(yr.shape[0]):
        yr[i] = src[i]
    ftz_exit(fp_mode)


@numba.njit(**_JIT)
def _bwd_rows(gy, x, blocks, perms, gx, need_x, need_blocks, states, gbuf, acc):  # pragma: no cover
    """The reverse pass row by row (small batches, where a chunk of :data:`LANES` lanes would be
    mostly padding): each row's forward keeps every layer's input in ``states: (depth, n)``, then
    the layers run in reverse; a block's gradient from one row is an outer product, no lane sums.
    Rows add into ``acc`` in order (one accumulator: the same bits for any thread count)."""
    fp_mode = ftz_enter()
    depth, n = perms.shape
    h = n // 2
    k = x.shape[1]
    if need_blocks:
        acc[:] = 0.0
    for r in range(x.shape[0]):
        if need_blocks:  # every layer's input; the output is not needed
            _row_input(x[r], states[0])
            for j in range(depth - 1):
                _row_layer(states[j], states[j + 1], perms[j], blocks[j])
        g = gbuf[0]
        _row_input(gy[r], g)
        cur = 0
        for j in range(depth - 1, -1, -1):
            gout = gbuf[cur]
            gin = gbuf[1 - cur]
            p = perms[j]
            w = blocks[j]
            src = states[j if need_blocks else 0]  # (one row when the block gradient is not wanted)
            for b in range(h):
                i0 = p[2 * b]
                i1 = p[2 * b + 1]
                e0 = gout[2 * b]
                e1 = gout[2 * b + 1]
                if need_blocks:
                    u0 = float(src[i0])
                    u1 = float(src[i1])
                    acc[j, b, 0, 0] += e0 * u0
                    acc[j, b, 0, 1] += e0 * u1
                    acc[j, b, 1, 0] += e1 * u0
                    acc[j, b, 1, 1] += e1 * u1
                gin[i0] = w[b, 0, 0] * e0 + w[b, 1, 0] * e1
                gin[i1] = w[b, 0, 1] * e0 + w[b, 1, 1] * e1
            cur = 1 - cur
        if need_x:
            g = gbuf[cur]
            for i in range(k):
                gx[r, i] = g[i]
    ftz_exit(fp_mode)


@numba.njit(**_JIT)
def _fwd_rows_serial(x, blocks, perms, y, work):  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        _row_forward(x[r], blocks, perms, y[r], work[0, 0], work[0, 1])


@numba.njit(parallel=True, **_JIT)
def _fwd_rows_parallel(x, blocks, perms, y, work):  # pragma: no cover - compiled
    for r in numba.prange(x.shape[0]):
        tid = numba.get_thread_id()
        _row_forward(x[r], blocks, perms, y[r], work[tid, 0], work[tid, 1])


@numba.njit(inline="always", **_JIT)
def _load_chunk(x, b0, nl, a):  # pragma: no cover - compiled
    """Rows ``b0 .. b0+nl`` of ``x`` into feature-major ``a: (n, LANES)``, zero-padded."""
    k = x.shape[1]
    n = a.shape[0]
    zero = a.dtype.type(0)
    for i in range(k):
        ai = a[i]
        for lane in range(nl):
            ai[lane] = x[b0 + lane, i]
        for lane in range(nl, LANES):
            ai[lane] = zero
    for i in range(k, n):
        a[i, :] = zero


@numba.njit(inline="always", **_JIT)
def _layer_lanes(src, dst, p, w):  # pragma: no cover - compiled
    """``dst = B_j (P_j src)`` on feature-major chunks ``(n, LANES)`` (one vector per row, :mod:`.simd`)."""
    for b in range(p.shape[0] // 2):
        layer_block(src, dst, p, w, b)


@numba.njit(inline="always", **_JIT)
def _fwd_chunk(x, blocks, perms, y, ch, src, dst):  # pragma: no cover - compiled
    """Rows ``ch·LANES ...`` of ``x`` through every layer, ``src``/``dst``: ``(n, LANES)`` scratch."""
    fp_mode = ftz_enter()
    batch = x.shape[0]
    depth = perms.shape[0]
    m = y.shape[1]
    b0 = ch * LANES
    nl = min(LANES, batch - b0)
    _load_chunk(x, b0, nl, src)
    for j in range(depth):
        _layer_lanes(src, dst, perms[j], blocks[j])
        src, dst = dst, src
    for lane in range(nl):
        yr = y[b0 + lane]
        for i in range(m):
            yr[i] = src[i, lane]
    ftz_exit(fp_mode)


@numba.njit(**_JIT)
def _fwd_chunks_serial(x, blocks, perms, y, work):  # pragma: no cover - compiled
    for ch in range((x.shape[0] + LANES - 1) // LANES):
        _fwd_chunk(x, blocks, perms, y, ch, work[0, 0], work[0, 1])


@numba.njit(parallel=True, **_JIT)
def _fwd_chunks_parallel(x, blocks, perms, y, work):  # pragma: no cover - compiled
    for ch in numba.prange((x.shape[0] + LANES - 1) // LANES):
        tid = numba.get_thread_id()
        _fwd_chunk(x, blocks, perms, y, ch, work[tid, 0], work[tid, 1])


@numba.njit(inline="always", **_JIT)
def _grad_layer_both(src, gout, gin, p, w, acc):  # pragma: no cover - compiled
    """One layer of the reverse pass: ``gin = P_jᵀ B_jᵀ gout`` (scattered through the
    permutation) and ``acc[b] += Σ_lanes gout_pair ⊗ (P_j src)_pair``, in one sweep over each
    block's rows; the lane sums of four blocks are reduced together (:mod:`.simd`)."""
    h = p.shape[0] // 2
    quads = h - h % QUAD
    for b in range(0, quads, QUAD):
        grad_both_quad(src, gout, gin, p, w, acc, b)
    for b in range(quads, h):
        grad_both_one(src, gout, gin, p, w, acc, b)


@numba.njit(inline="always", **_JIT)
def _grad_layer_blocks(src, gout, p, acc):  # pragma: no cover - compiled
    """The block-gradient half of :func:`_grad_layer_both`."""
    h = p.shape[0] // 2
    quads = h - h % QUAD
    for b in range(0, quads, QUAD):
        grad_blocks_quad(src, gout, p, acc, b)
    for b in range(quads, h):
        grad_blocks_one(src, gout, p, acc, b)


@numba.njit(inline="always", **_JIT)
def _grad_layer_input(gout, gin, p, w):  # pragma: no cover - compiled
    """The input-gradient half of :func:`_grad_layer_both`."""
    for b in range(p.shape[0] // 2):
        grad_input_block(gout, gin, p, w, b)


@numba.njit(inline="always", **_JIT)
def _forward_segments(c, sb, seglen, nrun, blocks, perms):  # pragma: no cover - compiled
    """The first ``nrun`` checkpoint segments of a chunk's forward: segment ``s`` reads its
    input ``c[s]`` and writes its output to ``c[s + 1]``; inner layers ping-pong in ``sb[0:2]``."""
    depth = perms.shape[0]
    for s in range(nrun):
        j0 = s * seglen
        j1 = min(depth, j0 + seglen)
        for j in range(j0, j1):
            src = c[s] if j == j0 else sb[(j - j0 - 1) % 2]
            dst = c[s + 1] if j == j1 - 1 else sb[(j - j0) % 2]
            _layer_lanes(src, dst, perms[j], blocks[j])


@numba.njit(inline="always", **_JIT)
def _refill_segment(c, sb, s, seglen, blocks, perms):  # pragma: no cover - compiled
    """Recompute segment ``s``'s inner layer inputs from its checkpoint: the input of layer
    ``j0 + i`` goes to ``sb[i - 1]`` (layer ``j0``'s input is ``c[s]``, see :func:`_segment_input`)."""
    depth = perms.shape[0]
    j0 = s * seglen
    j1 = min(depth, j0 + seglen)
    for j in range(j0, j1 - 1):
        _layer_lanes(_segment_input(c, sb, s, seglen, j), sb[j - j0], perms[j], blocks[j])


@numba.njit(inline="always", **_JIT)
def _segment_input(c, sb, s, seglen, j):  # pragma: no cover - compiled
    """The input of layer ``j`` of segment ``s`` after :func:`_refill_segment`."""
    j0 = s * seglen
    return c[s] if j == j0 else sb[j - j0 - 1]


@numba.njit(inline="always", **_JIT)
def _bwd_group(gy, x, blocks, perms, gx, seglen, need_x, need_blocks, g, groups, c, sb, gb, acc):  # pragma: no cover
    """Group ``g``'s chunks: recompute each chunk's forward (keeping the input of every segment
    of ``seglen`` layers in ``c``), then the reverse pass, segment by segment (inner activations
    recomputed into ``sb``); the block gradient accumulates into ``acc``."""
    fp_mode = ftz_enter()
    batch = gy.shape[0]
    k = x.shape[1]
    depth = perms.shape[0]
    nseg = (depth + seglen - 1) // seglen
    nchunks = (batch + LANES - 1) // LANES
    if need_blocks:
        acc[:] = 0.0
    c0 = (nchunks * g) // groups
    c1 = (nchunks * (g + 1)) // groups
    for ch in range(c0, c1):
        b0 = ch * LANES
        nl = min(LANES, batch - b0)
        if need_blocks:  # the block gradient needs every layer's input; the output is not needed
            _load_chunk(x, b0, nl, c[0])
            _forward_segments(c, sb, seglen, nseg - 1, blocks, perms)
        _load_chunk(gy, b0, nl, gb[0])
        cur = 0
        for s in range(nseg - 1, -1, -1):
            j0 = s * seglen
            if need_blocks:
                _refill_segment(c, sb, s, seglen, blocks, perms)
            for j in range(min(depth, j0 + seglen) - 1, j0 - 1, -1):
                gout = gb[cur]
                gin = gb[1 - cur]
                p = perms[j]
                w = blocks[j]
                if need_blocks:
                    src = _segment_input(c, sb, s, seglen, j)
                    if need_x or j > 0:
                        _grad_layer_both(src, gout, gin, p, w, acc[j])
                    else:  # layer 0 without the input gradient
                        _grad_layer_blocks(src, gout, p, acc[j])
                else:
                    _grad_layer_input(gout, gin, p, w)
                cur = 1 - cur
        if need_x:
            g0 = gb[cur]
            for lane in range(nl):
                gr = gx[b0 + lane]
                for i in range(k):
                    gr[i] = g0[i, lane]
    ftz_exit(fp_mode)


@numba.njit(**_JIT)
def _bwd_serial(gy, x, blocks, perms, gx, seglen, need_x, need_blocks, cp, seg, gbuf, gacc):  # pragma: no cover
    groups = gacc.shape[0]
    for g in range(groups):
        _bwd_group(gy, x, blocks, perms, gx, seglen, need_x, need_blocks, g, groups, cp[0], seg[0], gbuf[0], gacc[g])


@numba.njit(parallel=True, **_JIT)
def _bwd_parallel(gy, x, blocks, perms, gx, seglen, need_x, need_blocks, cp, seg, gbuf, gacc):  # pragma: no cover
    groups = gacc.shape[0]
    for g in numba.prange(groups):
        tid = numba.get_thread_id()
        _bwd_group(
            gy,
            x,
            blocks,
            perms,
            gx,
            seglen,
            need_x,
            need_blocks,
            g,
            groups,
            cp[tid],
            seg[tid],
            gbuf[tid],
            gacc[g],
        )


@numba.njit(**_JIT)
def _reduce_groups(gacc, out):  # pragma: no cover - compiled
    groups, depth, h = gacc.shape[0], gacc.shape[1], gacc.shape[2]
    for j in range(depth):
        for b in range(h):
            for r in range(2):
                for c in range(2):
                    s = 0.0
                    for g in range(groups):  # fixed order: deterministic
                        s += gacc[g, j, b, r, c]
                    out[j, b, r, c] = s


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
_NATIVE = (torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for inputs stored in ``dtype`` (float64 stays float64, else float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return t.detach().numpy()


def _perms_numpy(perms: torch.Tensor) -> np.ndarray:
    # int32 and int64 both run as they are: a conversion per call would cost more than it saves
    if perms.dtype not in (torch.int32, torch.int64):
        perms = perms.to(torch.int64)
    return (perms if perms.is_contiguous() else perms.contiguous()).numpy()


def _threads(work: int) -> int:
    """Threads for a call doing ``work`` entry-layer updates: one below :data:`PARALLEL_MIN_WORK`
    (waking a thread team costs more than it saves, and on a busy machine a team waits for its
    slowest member's time slice), else numba's thread count. Results do not depend on it."""
    return 1 if work < PARALLEL_MIN_WORK else numba.get_num_threads()


def forward(x: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, out_features: int) -> torch.Tensor:
    """``y = G~ x`` on CPU tensors. x: ``(batch, in_features)``; blocks ``(depth, n/2, 2, 2)``;
    perms ``(depth, n)`` integer; returns ``(batch, out_features)`` in ``x``'s dtype."""
    cdt = compute_dtype(torch.promote_types(x.dtype, blocks.dtype))
    batch = x.shape[0]
    depth, n = perms.shape
    xn = _as_numpy(x, cdt)
    bn = _as_numpy(blocks, cdt)
    pn = _perms_numpy(perms)
    y = torch.empty(batch, out_features, dtype=cdt)
    if batch == 0:
        return y.to(x.dtype)
    yn = y.numpy()
    threads = _threads(batch * n * depth)
    npdt = xn.dtype
    if batch < MIN_LANES_BATCH:
        work = np.empty((threads, 2, n), dtype=npdt)
        (_fwd_rows_serial if threads == 1 else _fwd_rows_parallel)(xn, bn, pn, yn, work)
    else:
        work = aligned_empty((threads, 2, n, LANES), npdt)
        (_fwd_chunks_serial if threads == 1 else _fwd_chunks_parallel)(xn, bn, pn, yn, work)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    need_x: bool,
    need_blocks: bool,
    seglen: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``y = G~ x`` given ``gy = ∂L/∂y``: ``(∂x, ∂blocks)`` (``None`` where not
    needed). ``∂x`` has ``x``'s dtype, ``∂blocks`` the blocks' dtype. ``seglen``: layers per
    checkpoint segment (default :func:`segment_length`); every value gives the same bytes."""
    cdt = compute_dtype(torch.promote_types(x.dtype, blocks.dtype))
    batch, k = x.shape
    depth, n = perms.shape
    h = n // 2
    gx = torch.empty(batch, k, dtype=cdt) if need_x else None
    gb = None
    if need_blocks:
        gb = (torch.zeros if batch == 0 else torch.empty)(depth, h, 2, 2, dtype=cdt)
    if batch == 0 or not (need_x or need_blocks):
        return (gx.to(x.dtype) if gx is not None else None), (gb.to(blocks.dtype) if gb is not None else None)
    gyn = _as_numpy(gy, cdt)
    xn = _as_numpy(x, cdt)
    bn = _as_numpy(blocks, cdt)
    pn = _perms_numpy(perms)
    gxn = gx.numpy() if gx is not None else np.empty((0, 0), dtype=xn.dtype)
    if batch < MIN_LANES_BATCH:
        states = np.empty((depth if need_blocks else 1, n), dtype=xn.dtype)
        acc = np.empty((depth, h, 2, 2) if need_blocks else (0, 0, 2, 2), dtype=np.float64)
        _bwd_rows(gyn, xn, bn, pn, gxn, need_x, need_blocks, states, np.empty((2, n), dtype=xn.dtype), acc)
        if gb is not None:
            gb.copy_(torch.from_numpy(acc))
        return (gx.to(x.dtype) if gx is not None else None), (gb.to(blocks.dtype) if gb is not None else None)
    threads = _threads(3 * batch * n * depth)
    nchunks = -(-batch // LANES)
    groups = min(GROUPS, nchunks)
    npdt = xn.dtype
    if seglen is None:
        seglen = segment_length(depth, n, npdt.itemsize)
    seglen = int(seglen) if need_blocks else depth  # without the block gradient nothing is kept
    nseg = -(-depth // seglen)
    cp = aligned_empty((threads, nseg if need_blocks else 1, n, LANES), npdt)
    seg = aligned_empty((threads, max(2, seglen - 1) if need_blocks else 1, n, LANES), npdt)
    gbuf = aligned_empty((threads, 2, n, LANES), npdt)
    gacc = np.empty((groups, depth, h, 2, 2) if need_blocks else (groups, 0, 0, 2, 2), dtype=np.float64)
    (_bwd_serial if threads == 1 else _bwd_parallel)(
        gyn, xn, bn, pn, gxn, seglen, need_x, need_blocks, cp, seg, gbuf, gacc
    )
    if gb is not None:
        _reduce_groups(gacc, gb.numpy())
    return (gx.to(x.dtype) if gx is not None else None), (gb.to(blocks.dtype) if gb is not None else None)
