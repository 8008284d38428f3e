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
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, NP)
    hcols = tl.arange(0, HP)
    hmask = hcols < n_w // 2
    cmask = cols < n_w
    z = tl.load(
        x_ptr + rows64[:, None] * stride_x + cols[None, :],
        mask=rmask[:, None] & (cols[None, :] < K),
        other=0.0,
    ).to(ACC)
    for j in range(depth):
        pbase = perm_ptr + j * n_w
        if PAIR_GATHER:
            # two half-width gathers, one per member of each pair
            p0 = tl.load(pbase + 2 * hcols, mask=hmask, other=0)
            p1 = tl.load(pbase + 2 * hcols + 1, mask=hmask, other=0)
            g0 = tl.gather(z, tl.broadcast_to(p0[None, :], (BB, HP)), 1)
            g1 = tl.gather(z, tl.broadcast_to(p1[None, :], (BB, HP)), 1)
        else:
            # one full-width gather, then split the interleaved pairs
            p = tl.load(pbase + cols, mask=cmask, other=0)
            g = tl.gather(z, tl.broadcast_to(p[None, :], (BB, NP)), 1)
            g0, g1 = tl.split(tl.reshape(g, (BB, HP, 2)))
        if SAVE:
            gs = tl.reshape(tl.join(g0, g1), (BB, NP))
            soff = (rows64 + j * B)[:, None] * n_w + cols[None, :]
            tl.store(save_ptr + soff, gs.to(save_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        y0, y1 = _mix(g0, g1, blk_ptr, j, n_w, hcols, hmask, ACC, False)
        z = tl.reshape(tl.join(y0, y1), (BB, NP))
    tl.store(
        y_ptr + rows64[:, None] * stride_y + cols[None, :],
        z.to(y_ptr.dtype.element_ty),
        mask=rmask[:, None] & (cols[None, :] < M),
    )


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
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, NP)
    hcols = tl.arange(0, HP)
    hmask = hcols < n_w // 2
    cmask = cols < n_w
    d = tl.load(
        gy_ptr + rows64[:, None] * stride_gy + cols[None, :],
        mask=rmask[:, None] & (cols[None, :] < M),
        other=0.0,
    ).to(ACC)
    for jj in range(depth):
        j = depth - 1 - jj
        if STORE_V:
            voff = (rows64 + j * B)[:, None] * n_w + cols[None, :]
            tl.store(v_ptr + voff, d.to(v_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        d0, d1 = tl.split(tl.reshape(d, (BB, HP, 2)))
        u0, u1 = _mix(d0, d1, blk_ptr, j, n_w, hcols, hmask, ACC, True)
        u = tl.reshape(tl.join(u0, u1), (BB, NP))
        q = tl.load(inv_ptr + j * n_w + cols, mask=cmask, other=0)
        d = tl.gather(u, tl.broadcast_to(q[None, :], (BB, NP)), 1)
    if STORE_X:
        tl.store(
            gx_ptr + rows64[:, None] * stride_gx + cols[None, :],
            d.to(gx_ptr.dtype.element_ty),
            mask=rmask[:, None] & (cols[None, :] < K),
        )


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
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    hcols = tl.program_id(1) * BH + tl.arange(0, BH)
    rmask = rows < B
    hmask = hcols < n_w // 2
    rows64 = rows.to(tl.int64)
    p0 = tl.load(perm_ptr + j * n_w + 2 * hcols, mask=hmask, other=0)
    p1 = tl.load(perm_ptr + j * n_w + 2 * hcols + 1, mask=hmask, other=0)
    m2 = rmask[:, None] & hmask[None, :]
    src_rows = src_ptr + rows64[:, None] * stride_src
    g0 = tl.load(src_rows + p0[None, :], mask=m2 & (p0[None, :] < K_src), other=0.0).to(ACC)
    g1 = tl.load(src_rows + p1[None, :], mask=m2 & (p1[None, :] < K_src), other=0.0).to(ACC)
    if SAVE:
        soff = (rows64 + j * B)[:, None] * n_w + 2 * hcols[None, :]
        tl.store(save_ptr + soff, g0.to(save_ptr.dtype.element_ty), mask=m2)
        tl.store(save_ptr + soff + 1, g1.to(save_ptr.dtype.element_ty), mask=m2)
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
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    hcols = tl.program_id(1) * BH + tl.arange(0, BH)
    rmask = rows < B
    hmask = hcols < n_w // 2
    rows64 = rows.to(tl.int64)
    m2 = rmask[:, None] & hmask[None, :]
    src = src_ptr + rows64[:, None] * stride_src + 2 * hcols[None, :]
    d0 = tl.load(src, mask=m2 & (2 * hcols[None, :] < M_src), other=0.0).to(ACC)
    d1 = tl.load(src + 1, mask=m2 & (2 * hcols[None, :] + 1 < M_src), other=0.0).to(ACC)
    if STORE_V:
        voff = (rows64 + j * B)[:, None] * n_w + 2 * hcols[None, :]
        tl.store(v_ptr + voff, d0.to(v_ptr.dtype.element_ty), mask=m2)
        tl.store(v_ptr + voff + 1, d1.to(v_ptr.dtype.element_ty), mask=m2)
    u0, u1 = _mix(d0, d1, blk_ptr, j, n_w, hcols, hmask, ACC, True)
    p0 = tl.load(perm_ptr + j * n_w + 2 * hcols, mask=hmask, other=0)
    p1 = tl.load(perm_ptr + j * n_w + 2 * hcols + 1, mask=hmask, other=0)
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
