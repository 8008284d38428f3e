"""The PyTorch path for G~: feature-major activations and a hand-written backward.

Runs on any device PyTorch runs on; same contract as :func:`sparsefit.kernels.reference.gtilde_reference`.
Each layer is one ``index_select`` (the permutation) and one batched 2×2 ``bmm``; the backward
walks the layers in reverse with the inverse permutations and reduces the block gradients with
``bmm`` (deterministic).
"""

from __future__ import annotations

import torch

from ..permutations import inverse_permutations


def _forward_fm(xt: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, save: torch.Tensor | None) -> torch.Tensor:
    """Apply all layers to feature-major ``xt: (n, batch)``; optionally keep each layer's gathered input."""
    depth, h = blocks.shape[0], blocks.shape[1]
    n, batch = xt.shape
    cur = xt
    for j in range(depth):
        z = save[j] if save is not None else torch.empty_like(cur)
        torch.index_select(cur, 0, perms[j], out=z)
        cur = torch.bmm(blocks[j], z.view(h, 2, batch)).view(n, batch)
    return cur


def _transpose_fm(
    dt: torch.Tensor,
    blocks: torch.Tensor,
    inv_perms: torch.Tensor,
    saved: torch.Tensor | None = None,
    grad_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``G~ᵀ`` to feature-major ``dt: (n, batch)``; with ``saved`` also accumulate block gradients."""
    depth, h = blocks.shape[0], blocks.shape[1]
    n, batch = dt.shape
    cur = dt
    bt = blocks.transpose(-1, -2)
    for j in reversed(range(depth)):
        v = cur.view(h, 2, batch)
        if grad_blocks is not None and saved is not None:
            torch.bmm(v, saved[j].view(h, 2, batch).transpose(1, 2), out=grad_blocks[j])
        dz = torch.bmm(bt[j], v).view(n, batch)
        cur = dz.index_select(0, inv_perms[j])
    return cur


def _pad_fm(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(batch, k)`` → zero-padded feature-major ``(n, batch)``."""
    batch, k = x.shape
    xt = x.new_zeros(n, batch)
    xt[:k] = x.t()
    return xt


class _GTildeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, perms, inv_perms, out_features):  # type: ignore[override]
        depth, h = blocks.shape[0], blocks.shape[1]
        n = 2 * h
        xt = _pad_fm(x, n)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        saved = xt.new_empty(depth, n, x.shape[0]) if need_grad else None
        y = _forward_fm(xt, blocks, perms, saved)
        if need_grad:
            ctx.save_for_backward(saved, blocks, inv_perms)
        ctx.in_features = x.shape[1]
        return y[:out_features].t().contiguous()

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        saved, blocks, inv_perms = ctx.saved_tensors
        h = blocks.shape[1]
        gt = _pad_fm(gy.to(blocks.dtype), 2 * h)
        gblocks = torch.empty_like(blocks) if ctx.needs_input_grad[1] else None
        gx = _transpose_fm(gt, blocks, inv_perms, saved, gblocks)
        gx = gx[: ctx.in_features].t().contiguous() if ctx.needs_input_grad[0] else None
        return gx, gblocks, None, None, None


def gtilde_torch(
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    out_features: int,
    inv_perms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = G~ x``; same contract as :func:`gtilde_reference`, faster (hand-written backward).

    ``inv_perms`` (the inverse permutations) may be passed to save recomputing them.
    """
    perms = perms.long()
    if inv_perms is None:
        inv_perms = inverse_permutations(perms)
    return _GTildeFunction.apply(x, blocks, perms, inv_perms.long(), out_features)


def gtilde_transpose_torch(
    y: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    in_features: int,
    inv_perms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x = G~ᵀ y`` (no autograd); same contract as :func:`gtilde_transpose_reference`."""
    if inv_perms is None:
        inv_perms = inverse_permutations(perms.long())
    n = 2 * blocks.shape[1]
    with torch.no_grad():
        xt = _transpose_fm(_pad_fm(y, n), blocks, inv_perms.long())
    return xt[:in_features].t().contiguous()
