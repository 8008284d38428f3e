"""Triton kernels for G~ (private; imported lazily by :mod:`sparsefit.kernels.gpu`).

Importing this module imports Triton; ``import sparsefit`` never does. The launchers, the
custom op and the autograd wiring live in :mod:`sparsefit.kernels.gpu`; the design and its
performance model are in ``docs/gpu.md``.

Conventions (as :mod:`sparsefit.operator`): ``perms[j]`` gathers, ``blocks[j, b, r, c]`` maps
``z[2b + c]`` to ``y[2b + r]``, layers in application order, input zero-padded from ``K`` to the
width ``N_W``, output sliced to ``M``. ``ACC`` is the arithmetic dtype (float32, or float64 for
float64 inputs); loads are converted to it and stores convert back to the destination's dtype.

Saved tensors for the backward pass share one layout, ``(depth, batch, width)`` row-major:

* ``save[j]`` — layer ``j``'s gathered input ``(P_j z_{j-1})`` (what the block gradient needs);
* ``v[j]`` — the gradient with respect to layer ``j``'s output.

Kernels
-------
``fwd_fused`` / ``bwd_fused``
    One program owns ``BB`` batch rows and keeps their whole state ``(BB, NP)`` on chip
    (registers; ``tl.gather`` goes through shared memory) across all ``depth`` layers.
``fwd_layer`` / ``bwd_layer``
    One layer per launch, the state in global memory (pointer gathers / scatters); the fallback
    for widths whose state does not fit on chip.
``block_grad``
    ``gB[j, b, r, c] = Σ_rows v[j, row, 2b + r] · save[j, row, 2b + c]``, reduced over a slice of
    the batch per program; the slices are summed by the launcher (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mix(g0, g1, blk_ptr, j, n_w, hcols, hmask, ACC: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Apply layer ``j``'s 2×2 blocks to the pair halves ``(g0, g1)``, shape ``(R, HP)``."""
    base = blk_ptr + j * 2 * n_w + 4 * hcols
    b00 = tl.load(base + 0, mask=hmask, other=0.0).to(ACC)[None, :]
    b01 = tl.load(base + 1, mask=hmask, other=0.0).to(ACC)[None, :]
    b10 = tl.load(base + 2, mask=hmask, other=0.0).to(ACC)[None, :]
    b11 = tl.load(base + 3, mask=hmask, other=0.0).to(ACC)[None, :]
    if TRANSPOSE:
        y0 = b00 * g0 + b10 * g1
        y1 = b01 * g0 + b11 * g1
    else:
        y0 = b00 * g0 + b01 * g1
        y1 = b10 * g0 + b11 * g1
    return y0, y1


@triton.jit
def _row_tile(tile, BB: tl.constexpr, B):
    """Rows ``tile·BB …`` of the batch: indices, in-batch mask and int64 indices for addressing."""
    rows = tile * BB + tl.arange(0, BB)
    return rows, rows < B, rows.to(tl.int64)


@triton.jit
def _load_rows(ptr, rows64, stride, cols, rmask, limit, ACC: tl.constexpr):
    """A ``(rows, cols)`` tile of a row-major matrix in ``ACC``; columns ``>= limit`` (the zero
    padding up to the width) and rows outside the batch read as 0."""
    mask = rmask[:, None] & (cols[None, :] < limit)
    return tl.load(ptr + rows64[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_rows(ptr, rows64, stride, cols, rmask, limit, val):
    """Store a ``(rows, cols)`` tile, keeping the first ``limit`` columns (the output slice)."""
    mask = rmask[:, None] & (cols[None, :] < limit)
    tl.store(ptr + rows64[:, None] * stride + cols[None, :], val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_perm(perm_ptr, j, n_w, hcols, hmask):
    """``perms[j][2b]`` and ``perms[j][2b + 1]`` for the pairs ``b`` in ``hcols``."""
    base = perm_ptr + j * n_w + 2 * hcols
    return tl.load(base, mask=hmask, other=0), tl.load(base + 1, mask=hmask, other=0)


@triton.jit
def _gather_cols(z, idx_ptr, cols, cmask, BB: tl.constexpr, NP: tl.constexpr):
    """``out[r, i] = z[r, idx[i]]`` for an on-chip ``(BB, NP)`` tile (one full-width gather)."""
    idx = tl.load(idx_ptr + cols, mask=cmask, other=0)
    return tl.gather(z, tl.broadcast_to(idx[None, :], (BB, NP)), 1)


@triton.jit
def _store_layer_pairs(ptr, rows64, j, B, n_w, hcols, m2, a0, a1):
    """Store layer ``j``'s pair halves ``(a0, a1)`` into the ``(depth, B, n)`` buffer at ``ptr``."""
    off = (rows64 + j * B)[:, None] * n_w + 2 * hcols[None, :]
    tl.store(ptr + off, a0.to(ptr.dtype.element_ty), mask=m2)
    tl.store(ptr + off + 1, a1.to(ptr.dtype.element_ty), mask=m2)


@triton.jit
def fwd_fused(
    x_ptr,
    blk_ptr,
    perm_ptr,
    y_ptr,
    save_ptr,
    B,
    K,
    M,
    n_w,
    depth,
    stride_x,
    stride_y,
    NP: tl.constexpr,
    BB: tl.constexpr,
    SAVE: tl.constexpr,
    PAIR_GATHER: tl.constexpr,
    ACC: tl.constexpr,
):
    """All layers for ``BB`` rows: ``y[rows] = G~ x[rows]``; optionally saves each gathered input."""
    HP: tl.constexpr = NP // 2
    rows, rmask, rows64 = _row_tile(tl.program_id(0), BB, B)
    cols = tl.arange(0, NP)
    hcols = tl.arange(0, HP)
    hmask = hcols < n_w // 2
    cmask = cols < n_w
    z = _load_rows(x_ptr, rows64, stride_x, cols, rmask, K, ACC)
    for j in range(depth):
        if PAIR_GATHER:
            # two half-width gathers, one per member of each pair
            p0, p1 = _pair_perm(perm_ptr, j, n_w, hcols, hmask)
            g0 = tl.gather(z, tl.broadcast_to(p0[None, :], (BB, HP)), 1)
            g1 = tl.gather(z, tl.broadcast_to(p1[None, :], (BB, HP)), 1)
        else:
            # one full-width gather, then split the interleaved pairs
            g = _gather_cols(z, perm_ptr + j * n_w, cols, cmask, BB, NP)
            g0, g1 = tl.split(tl.reshape(g, (BB, HP, 2)))
        if SAVE:
            gs = tl.reshape(tl.join(g0, g1), (BB, NP))
            soff = (rows64 + j * B)[:, None] * n_w + cols[None, :]
            tl.store(save_ptr + soff, gs.to(save_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        y0, y1 = _mix(g0, g1, blk_ptr, j, n_w, hcols, hmask, ACC, False)
        z = tl.reshape(tl.join(y0, y1), (BB, NP))
    _store_rows(y_ptr, rows64, stride_y, cols, rmask, M, z)


@triton.jit
def bwd_fused(
    gy_ptr,
    blk_ptr,
    inv_ptr,
    gx_ptr,
    v_ptr,
    B,
    K,
    M,
    n_w,
    depth,
    stride_gy,
    stride_gx,
    NP: tl.constexpr,
    BB: tl.constexpr,
    STORE_V: tl.constexpr,
    STORE_X: tl.constexpr,
    ACC: tl.constexpr,
):
    """``gx[rows] = G~ᵀ gy[rows]`` (layers reversed, blocks transposed, inverse gathers);
    optionally stores the gradient of every layer's output for the block gradient."""
    HP: tl.constexpr = NP // 2
    rows, rmask, rows64 = _row_tile(tl.program_id(0), BB, B)
    cols = tl.arange(0, NP)
    hcols = tl.arange(0, HP)
    hmask = hcols < n_w // 2
    cmask = cols < n_w
    d = _load_rows(gy_ptr, rows64, stride_gy, cols, rmask, M, ACC)
    for jj in range(depth):
        j = depth - 1 - jj
        if STORE_V:
            voff = (rows64 + j * B)[:, None] * n_w + cols[None, :]
            tl.store(v_ptr + voff, d.to(v_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        d0, d1 = tl.split(tl.reshape(d, (BB, HP, 2)))
        u0, u1 = _mix(d0, d1, blk_ptr, j, n_w, hcols, hmask, ACC, True)
        u = tl.reshape(tl.join(u0, u1), (BB, NP))
        d = _gather_cols(u, inv_ptr + j * n_w, cols, cmask, BB, NP)
    if STORE_X:
        _store_rows(gx_ptr, rows64, stride_gx, cols, rmask, K, d)


@triton.jit
def fwd_layer(
    src_ptr,
    blk_ptr,
    perm_ptr,
    dst_ptr,
    save_ptr,
    j,
    B,
    K_src,
    M_dst,
    n_w,
    stride_src,
    stride_dst,
    BR: tl.constexpr,
    BH: tl.constexpr,
    SAVE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Layer ``j`` on global-memory state: ``dst = B_j (P_j src)`` for a ``(BR, 2·BH)`` tile.

    ``src`` has ``K_src`` valid columns (reads beyond are the zero padding), ``dst`` keeps the
    first ``M_dst`` columns (the output slice on the last layer)."""
    rows, rmask, rows64 = _row_tile(tl.program_id(0), BR, B)
    hcols = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = hcols < n_w // 2
    p0, p1 = _pair_perm(perm_ptr, j, n_w, hcols, hmask)
    m2 = rmask[:, None] & hmask[None, :]
    src_rows = src_ptr + rows64[:, None] * stride_src
    g0 = tl.load(src_rows + p0[None, :], mask=m2 & (p0[None, :] < K_src), other=0.0).to(ACC)
    g1 = tl.load(src_rows + p1[None, :], mask=m2 & (p1[None, :] < K_src), other=0.0).to(ACC)
    if SAVE:
        _store_layer_pairs(save_ptr, rows64, j, B, n_w, hcols, m2, g0, g1)
    y0, y1 = _mix(g0, g1, blk_ptr, j, n_w, hcols, hmask, ACC, False)
    dst = dst_ptr + rows64[:, None] * stride_dst + 2 * hcols[None, :]
    tl.store(dst, y0.to(dst_ptr.dtype.element_ty), mask=m2 & (2 * hcols[None, :] < M_dst))
    tl.store(dst + 1, y1.to(dst_ptr.dtype.element_ty), mask=m2 & (2 * hcols[None, :] + 1 < M_dst))


@triton.jit
def bwd_layer(
    src_ptr,
    blk_ptr,
    perm_ptr,
    dst_ptr,
    v_ptr,
    j,
    B,
    M_src,
    K_dst,
    n_w,
    stride_src,
    stride_dst,
    BR: tl.constexpr,
    BH: tl.constexpr,
    STORE_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """Transpose of layer ``j`` on global-memory state: ``dst = P_jᵀ B_jᵀ src`` (a scatter
    through ``perms[j]``; a permutation, so every destination is written once)."""
    rows, rmask, rows64 = _row_tile(tl.program_id(0), BR, B)
    hcols = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = hcols < n_w // 2
    m2 = rmask[:, None] & hmask[None, :]
    src = src_ptr + rows64[:, None] * stride_src + 2 * hcols[None, :]
    d0 = tl.load(src, mask=m2 & (2 * hcols[None, :] < M_src), other=0.0).to(ACC)
    d1 = tl.load(src + 1, mask=m2 & (2 * hcols[None, :] + 1 < M_src), other=0.0).to(ACC)
    if STORE_V:
        _store_layer_pairs(v_ptr, rows64, j, B, n_w, hcols, m2, d0, d1)
    u0, u1 = _mix(d0, d1, blk_ptr, j, n_w, hcols, hmask, ACC, True)
    p0, p1 = _pair_perm(perm_ptr, j, n_w, hcols, hmask)
    dst_rows = dst_ptr + rows64[:, None] * stride_dst
    tl.store(dst_rows + p0[None, :], u0.to(dst_ptr.dtype.element_ty), mask=m2 & (p0[None, :] < K_dst))
    tl.store(dst_rows + p1[None, :], u1.to(dst_ptr.dtype.element_ty), mask=m2 & (p1[None, :] < K_dst))


@triton.jit
def block_grad(
    v_ptr,
    s_ptr,
    part_ptr,
    B,
    n_w,
    depth,
    rows_per_split,
    BR: tl.constexpr,
    BH: tl.constexpr,
    ACC: tl.constexpr,
):
    """Partial block gradients of layer ``program_id(0)``, blocks ``program_id(1)·BH …``, over
    batch slice ``program_id(2)``: ``part[split, j, b, r, c] = Σ_rows v[j,row,2b+r]·s[j,row,2b+c]``."""
    j = tl.program_id(0)
    hcols = tl.program_id(1) * BH + tl.arange(0, BH)
    sp = tl.program_id(2)
    hmask = hcols < n_w // 2
    h = n_w // 2
    r_start = sp * rows_per_split
    r_end = tl.minimum(B, r_start + rows_per_split)
    acc00 = tl.zeros((BR, BH), dtype=ACC)
    acc01 = tl.zeros((BR, BH), dtype=ACC)
    acc10 = tl.zeros((BR, BH), dtype=ACC)
    acc11 = tl.zeros((BR, BH), dtype=ACC)
    for r0 in range(r_start, r_end, BR):
        rows = r0 + tl.arange(0, BR)
        m2 = (rows < r_end)[:, None] & hmask[None, :]
        off = (rows.to(tl.int64) + j * B)[:, None] * n_w + 2 * hcols[None, :]
        v0 = tl.load(v_ptr + off, mask=m2, other=0.0).to(ACC)
        v1 = tl.load(v_ptr + off + 1, mask=m2, other=0.0).to(ACC)
        s0 = tl.load(s_ptr + off, mask=m2, other=0.0).to(ACC)
        s1 = tl.load(s_ptr + off + 1, mask=m2, other=0.0).to(ACC)
        acc00 += v0 * s0
        acc01 += v0 * s1
        acc10 += v1 * s0
        acc11 += v1 * s1
    out = part_ptr + ((sp * depth + j) * h + hcols).to(tl.int64) * 4
    tl.store(out + 0, tl.sum(acc00, axis=0), mask=hmask)
    tl.store(out + 1, tl.sum(acc01, axis=0), mask=hmask)
    tl.store(out + 2, tl.sum(acc10, axis=0), mask=hmask)
    tl.store(out + 3, tl.sum(acc11, axis=0), mask=hmask)
