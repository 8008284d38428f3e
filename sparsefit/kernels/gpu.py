"""The fused GPU kernel for G~: launchers, the ``sparsefit::gtilde_fwd`` custom op, autograd.

The naming ladder: Triton kernels in :mod:`sparsefit.kernels.gpu_triton` (private) → the
launchers :func:`forward` / :func:`backward` here → the custom ops ``sparsefit::gtilde_fwd`` and
``sparsefit::gtilde_bwd`` (with fake implementations, so ``torch.compile`` traces through them)
and a registered autograd formula, made by :func:`sparsefit.kernels.ops.define_gtilde_ops` (the
recipe the CPU kernels share) → :func:`gtilde_fused` (the functional, what
:func:`sparsefit.kernels.dispatch` calls) → :class:`sparsefit.GTilde` / :class:`sparsefit.SparseLinear`.

Nothing here imports Triton at module import time: the kernels module is imported (and each
kernel compiled and cached by Triton) at first use. :func:`is_available` is cheap.

Dtypes: ``x`` may be float32, bfloat16, float16 or float64; arithmetic is float32 (float64 for
float64 inputs); ``y`` and ``∂x`` have ``x``'s dtype, ``∂blocks`` the blocks' dtype (so float32
master blocks with bfloat16 activations work). Activations saved for the block gradient are
kept in ``x``'s dtype.

Design, performance model and what is untested: ``docs/gpu.md``.

Example
-------
>>> g = sparsefit.GTilde(1024, 1024, depth=22).cuda()            # doctest: +SKIP
>>> y = gtilde_fused(x.cuda(), g.blocks, g.perms, 1024)           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import torch

from .ops import define_gtilde_ops

__all__ = [
    "KernelConfig",
    "backward",
    "config",
    "forward",
    "gtilde_fused",
    "is_available",
    "plan",
]


@dataclasses.dataclass
class KernelConfig:
    """Tunables of the launchers (module-level :data:`config`; the benchmark script varies them).

    ``max_tile``: state elements one fused program keeps on chip (``rows × padded width``);
    ``max_fused_width``: widest padded width run fused (wider ones run layer by layer);
    ``pair_gather``: fused forward gathers each pair member separately (two half-width gathers)
    instead of one full-width gather plus a split; ``force``: ``"fused"``, ``"layered"`` or
    ``None`` (choose by width); ``num_warps``: override the fused kernels' warps (``None``: by tile).
    """

    max_tile: int = 16384
    max_fused_width: int = 32768
    pair_gather: bool = False
    force: str | None = None
    num_warps: int | None = None
    layer_rows: int = 16
    layer_pairs: int = 128
    grad_rows: int = 32
    grad_pairs: int = 64


config = KernelConfig()

#: padded widths for which a fused launch ran out of on-chip resources, mapped to the largest
#: row count that still compiled (0: none did; those widths run layer by layer)
_fused_rows_limit: dict[tuple[int, torch.dtype, bool], int] = {}


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_available() -> bool:
    """True when Triton can be imported and a CUDA GPU is present (does not initialise CUDA
    beyond :func:`torch.cuda.is_available`)."""
    return _triton_importable() and torch.cuda.is_available()


def _kernels() -> Any:
    from . import gpu_triton

    return gpu_triton


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _acc_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def plan(width: int, batch: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """How a call of this shape runs: ``{"mode": "fused"|"layered", "NP", "BB", "num_warps"}``.

    ``NP`` is the width padded to a power of two (Triton block shapes are powers of two),
    ``BB`` the batch rows per program."""
    np_ = max(16, _next_pow2(width))
    force = config.force or os.environ.get("SPARSEFIT_GPU_MODE") or None
    if force not in (None, "fused", "layered"):
        raise ValueError(f"SPARSEFIT_GPU_MODE / config.force must be 'fused' or 'layered', got {force!r}")
    fused = force == "fused" or (force is None and np_ <= config.max_fused_width)
    if not fused:
        return {"mode": "layered", "NP": np_, "BB": 0, "num_warps": 4}
    bb = max(1, min(config.max_tile // np_, _next_pow2(batch), 64))
    limit = _fused_rows_limit.get((np_, dtype, config.pair_gather))
    if limit is not None:
        if limit == 0 and force != "fused":
            return {"mode": "layered", "NP": np_, "BB": 0, "num_warps": 4}
        bb = min(bb, max(1, limit))
    warps = config.num_warps or min(16, max(4, (bb * np_) // 512))
    return {"mode": "fused", "NP": np_, "BB": bb, "num_warps": warps}


def _is_resource_error(e: BaseException) -> bool:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - layout differs across Triton versions
        return False
    return isinstance(e, OutOfResources)


def _run_fused(launch: Any, width: int, batch: int, dtype: torch.dtype) -> bool:
    """Launch a fused kernel with ``launch(p)``, halving the rows per program while Triton
    reports too few registers or too little shared memory. Returns False when even one row per
    program does not fit (the caller then runs layer by layer)."""
    p = plan(width, batch, dtype)
    while p["mode"] == "fused":
        try:
            launch(p)
            return True
        except Exception as e:  # noqa: BLE001 - only resource errors are handled
            if not _is_resource_error(e):
                raise
            key = (p["NP"], dtype, config.pair_gather)
            _fused_rows_limit[key] = p["BB"] // 2
            p = plan(width, batch, dtype)
    return False


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def forward(
    x: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, out_features: int, save: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = G~ x`` with the Triton kernels; returns ``(y, saved)``.

    x: ``(batch, in_features)``, any stride along the batch, unit stride along features;
    blocks: ``(depth, n/2, 2, 2)`` contiguous; perms: ``(depth, n)`` int32 contiguous.
    ``saved`` is ``(depth, batch, n)`` in ``x``'s dtype (each layer's gathered input) when
    ``save``, else an empty tensor."""
    k = _kernels()
    batch, kin = x.shape
    depth, h = blocks.shape[0], blocks.shape[1]
    n = 2 * h
    y = torch.empty(batch, out_features, dtype=x.dtype, device=x.device)
    saved = torch.empty(depth if save else 0, batch if save else 0, n if save else 0, dtype=x.dtype, device=x.device)
    if batch == 0:
        return y, saved
    acc = _acc_dtype(x.dtype)

    def launch(p: dict[str, Any]) -> None:
        grid = (triton_cdiv(batch, p["BB"]),)
        k.fwd_fused[grid](
            x, blocks, perms, y, saved,
            batch, kin, out_features, n, depth, x.stride(0), y.stride(0),
            NP=p["NP"], BB=p["BB"], SAVE=save, PAIR_GATHER=config.pair_gather, ACC=acc,
            num_warps=p["num_warps"],
        )  # fmt: skip

    if _run_fused(launch, n, batch, x.dtype):
        return y, saved
    # layer by layer: fp32 (or fp64) state in global memory, ping-pong buffers
    br, bh, grid, bufs = _layer_plan(batch, h, x, min(2, depth - 1))
    src, k_src = x, kin
    for j in range(depth):
        last = j == depth - 1
        dst = y if last else bufs[j % 2]
        m_dst = out_features if last else n
        k.fwd_layer[grid](
            src, blocks, perms, dst, saved, j,
            batch, k_src, m_dst, n, src.stride(0), dst.stride(0),
            BR=br, BH=bh, SAVE=save, ACC=acc,
        )  # fmt: skip
        src, k_src = dst, n
    return y, saved


def _layer_plan(batch: int, h: int, like: torch.Tensor, count: int) -> tuple[int, int, tuple[int, int], list]:
    """Tiles, grid and ``count`` ping-pong state buffers ``(batch, 2h)`` for the layer-by-layer
    path (fp32 state, fp64 for fp64 inputs)."""
    br, bh = config.layer_rows, config.layer_pairs
    grid = (triton_cdiv(batch, br), triton_cdiv(h, bh))
    state_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    bufs = [torch.empty(batch, 2 * h, dtype=state_dtype, device=like.device) for _ in range(count)]
    return br, bh, grid, bufs


def backward(
    gy: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    inv_perms: torch.Tensor,
    saved: torch.Tensor,
    in_features: int,
    need_x: bool,
    need_blocks: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``y = G~ x``: returns ``(∂x, ∂blocks)`` (``None`` where not needed).

    gy: ``(batch, out_features)`` in the forward's I/O dtype; ``saved`` from :func:`forward`
    (needed only for ``∂blocks``); perms and inv_perms int32 contiguous."""
    k = _kernels()
    gy = gy.contiguous()
    batch, m = gy.shape
    depth, h = blocks.shape[0], blocks.shape[1]
    n = 2 * h
    acc = _acc_dtype(gy.dtype)
    gx = torch.empty(batch, in_features, dtype=gy.dtype, device=gy.device) if need_x else None
    v = torch.empty(depth, batch, n, dtype=gy.dtype, device=gy.device) if need_blocks else None
    gx_arg = gx if gx is not None else gy  # a placeholder pointer; never written
    v_arg = v if v is not None else gy
    if batch > 0 and (need_x or need_blocks):

        def launch(p: dict[str, Any]) -> None:
            grid = (triton_cdiv(batch, p["BB"]),)
            k.bwd_fused[grid](
                gy, blocks, inv_perms, gx_arg, v_arg,
                batch, in_features, m, n, depth, gy.stride(0), gx_arg.stride(0),
                NP=p["NP"], BB=p["BB"], STORE_V=need_blocks, STORE_X=need_x, ACC=acc,
                num_warps=p["num_warps"],
            )  # fmt: skip

        if not _run_fused(launch, n, batch, gy.dtype):
            br, bh, grid, bufs = _layer_plan(batch, h, gy, min(2, depth))
            src, m_src = gy, m
            for step, j in enumerate(reversed(range(depth))):
                first_layer = j == 0
                if first_layer and not need_x:
                    dst, k_dst = bufs[step % 2], n  # only v[0] is wanted; discard the result
                else:
                    dst = gx if first_layer else bufs[step % 2]
                    k_dst = in_features if first_layer else n
                k.bwd_layer[grid](
                    src, blocks, perms, dst, v_arg, j,
                    batch, m_src, k_dst, n, src.stride(0), dst.stride(0),
                    BR=br, BH=bh, STORE_V=need_blocks, ACC=acc,
                )  # fmt: skip
                src, m_src = dst, n
    gb = None
    if need_blocks:
        gb = _block_grad(v, saved, blocks, batch, acc) if batch > 0 else torch.zeros_like(blocks)
    return gx, gb


def _block_grad(v: torch.Tensor, saved: torch.Tensor, blocks: torch.Tensor, batch: int, acc: Any) -> torch.Tensor:
    """Two-stage deterministic reduction of ``v ⊗ saved`` over the batch."""
    k = _kernels()
    depth, h = blocks.shape[0], blocks.shape[1]
    n = 2 * h
    br, bh = config.grad_rows, config.grad_pairs
    tiles = depth * triton_cdiv(h, bh)
    # enough programs to fill a large GPU (~4 per SM on 132 SMs), but at least BR rows each
    splits = max(1, min(triton_cdiv(batch, br), triton_cdiv(528, tiles)))
    rows_per_split = triton_cdiv(triton_cdiv(batch, splits), br) * br
    splits = triton_cdiv(batch, rows_per_split)
    part_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    part = torch.empty(splits, depth, h, 2, 2, dtype=part_dtype, device=v.device)
    grid = (depth, triton_cdiv(h, bh), splits)
    k.block_grad[grid](v, saved, part, batch, n, depth, rows_per_split, BR=br, BH=bh, ACC=acc)
    gb = part[0] if splits == 1 else part.sum(0)
    return gb.to(blocks.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile-friendly) and autograd
# ----------------------------------------------------------------------------------------------
def _backward_impl(gy, x, blocks, perms, saved, in_features, need_x, need_blocks):  # noqa: ANN001
    del x  # the activations were saved by the forward
    return backward(gy, blocks, perms, _inverse_int32(perms), saved, in_features, need_x, need_blocks)


def _inverse_int32(perms: torch.Tensor) -> torch.Tensor:
    # the argsort of a permutation is its inverse (deterministic, unlike a CUDA scatter)
    return torch.argsort(perms, dim=1, stable=True).to(torch.int32)


_gtilde_fwd_op = define_gtilde_ops("gtilde", forward, _backward_impl, keeps_activations=True)


# ----------------------------------------------------------------------------------------------
# The functional
# ----------------------------------------------------------------------------------------------
def gtilde_fused(
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    out_features: int,
    inv_perms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = G~ x`` with the fused Triton kernel; same contract as
    :func:`sparsefit.operator.gtilde_reference` (differentiable in ``x`` and ``blocks``).

    x: ``(batch, in_features)`` float32/bfloat16/float16/float64 → ``(batch, out_features)`` in
    ``x``'s dtype; blocks ``(depth, n/2, 2, 2)``; perms ``(depth, n)`` integer. ``inv_perms`` is
    accepted for signature compatibility (the backward derives int32 inverses itself)."""
    del inv_perms  # the int32 inverse is recomputed in backward (one small scatter)
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, in_features), got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    # the saved activations serve only the block gradient
    save = torch.is_grad_enabled() and blocks.requires_grad
    y, _ = _gtilde_fwd_op(x, blocks.contiguous(), perms.to(torch.int32).contiguous(), int(out_features), save)
    return y
