"""One recipe for G~'s ``torch.library`` custom ops, shared by the fused CPU and GPU kernels.

:func:`define_gtilde_ops` registers, for a pair of launchers, two custom ops with fake
implementations (so ``torch.compile`` traces through them) and the autograd formula that joins
them::

    <name>_fwd(x, blocks, perms, out_features, save) -> (y, saved)
    <name>_bwd(gy, x, blocks, perms, saved, in_features, need_x, need_blocks) -> (∂x, ∂blocks)

``saved`` holds each layer's activations for kernels that keep them (the GPU kernel: shape
``(depth, batch, n)`` when ``save``); kernels that recompute them in the backward (the CPU
kernel) return an empty ``(0, 0, 0)`` tensor and the op keeps ``x`` instead. Custom ops return
tensors, never ``None``: an empty tensor stands for a gradient that was not asked for.

The ops registered here: ``sparsefit::gtilde_fwd/bwd`` (Triton, :mod:`sparsefit.kernels.gpu`)
and ``sparsefit::gtilde_cpu_fwd/bwd`` (numba, :mod:`sparsefit.kernels.cpu_apply`; defined on
first use by :func:`gtilde_fused_cpu`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

ForwardImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]
BackwardImpl = Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]


def define_gtilde_ops(name: str, forward: ForwardImpl, backward: BackwardImpl, *, keeps_activations: bool) -> Any:
    """Register ``sparsefit::<name>_fwd`` / ``_bwd`` and their autograd formula; returns the
    forward op (call it as ``op(x, blocks, perms_int32, out_features, save)``).

    ``forward(x, blocks, perms, out_features, save) -> (y, saved)``;
    ``backward(gy, x, blocks, perms, saved, in_features, need_x, need_blocks) -> (∂x | None, ∂blocks | None)``.
    """

    @torch.library.custom_op(f"sparsefit::{name}_fwd", mutates_args=())
    def fwd_op(
        x: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, out_features: int, save: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(x, blocks, perms, out_features, save)

    @fwd_op.register_fake
    def _(x, blocks, perms, out_features, save):
        depth, n = perms.shape
        batch = x.shape[0]
        y = x.new_empty(batch, out_features)
        if keeps_activations and save:
            return y, x.new_empty(depth, batch, n)
        return y, x.new_empty(0, 0, 0)

    @torch.library.custom_op(f"sparsefit::{name}_bwd", mutates_args=())
    def bwd_op(
        gy: torch.Tensor,
        x: torch.Tensor,
        blocks: torch.Tensor,
        perms: torch.Tensor,
        saved: torch.Tensor,
        in_features: int,
        need_x: bool,
        need_blocks: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gx, gb = backward(gy, x, blocks, perms, saved, in_features, need_x, need_blocks)
        if gx is None:
            gx = gy.new_empty(0, 0)
        if gb is None:
            gb = blocks.new_empty(0, 0, 2, 2)
        return gx, gb

    @bwd_op.register_fake
    def _(gy, x, blocks, perms, saved, in_features, need_x, need_blocks):
        gx = gy.new_empty(gy.shape[0], in_features) if need_x else gy.new_empty(0, 0)
        gb = blocks.new_empty(blocks.shape) if need_blocks else blocks.new_empty(0, 0, 2, 2)
        return gx, gb

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, blocks, perms, out_features, save = inputs
        ctx.in_features = x.shape[1]
        ctx.x_dtype = x.dtype
        kept_x = x.new_empty(0, 0) if keeps_activations else x  # the backward recomputes from x
        ctx.save_for_backward(kept_x, blocks, perms, output[1])
        ctx.mark_non_differentiable(output[1])

    def backward_formula(ctx: Any, gy: torch.Tensor | None, _gsaved: torch.Tensor | None) -> tuple[Any, ...]:
        if gy is None:
            return None, None, None, None, None
        x, blocks, perms, saved = ctx.saved_tensors
        need_x, need_blocks = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if need_blocks and keeps_activations and saved.shape[0] != blocks.shape[0]:
            raise RuntimeError("sparsefit: block gradient requested but the forward saved no activations")
        gx, gb = bwd_op(gy.to(ctx.x_dtype), x, blocks, perms, saved, ctx.in_features, need_x, need_blocks)
        return (gx if need_x else None), (gb if need_blocks else None), None, None, None

    torch.library.register_autograd(f"sparsefit::{name}_fwd", backward_formula, setup_context=setup_context)
    return fwd_op


# ----------------------------------------------------------------------------------------------
# The CPU ops (numba), defined on first use so that nothing imports numba before it is needed
# ----------------------------------------------------------------------------------------------
_cpu_fwd_op: Any = None


def _cpu_forward(x, blocks, perms, out_features, save):  # noqa: ANN001 - see define_gtilde_ops
    from . import cpu_apply

    return cpu_apply.forward(x, blocks, perms, out_features), x.new_empty(0, 0, 0)


def _cpu_backward(gy, x, blocks, perms, saved, in_features, need_x, need_blocks):  # noqa: ANN001
    from . import cpu_apply

    return cpu_apply.backward(gy, x, blocks, perms, need_x, need_blocks)


def cpu_ops() -> Any:
    """The forward op ``sparsefit::gtilde_cpu_fwd`` (registering both CPU ops on first call)."""
    global _cpu_fwd_op
    if _cpu_fwd_op is None:
        _cpu_fwd_op = define_gtilde_ops("gtilde_cpu", _cpu_forward, _cpu_backward, keeps_activations=False)
    return _cpu_fwd_op


def gtilde_fused_cpu(
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    out_features: int,
    inv_perms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = G~ x`` with the fused numba kernels (the ``cpu`` backend); same contract as
    :func:`sparsefit.kernels.reference.gtilde_reference`, differentiable in ``x`` and ``blocks``.

    x: ``(batch, in_features)`` float32/float64/bfloat16/float16 CPU tensor → ``(batch,
    out_features)`` in ``x``'s dtype (arithmetic in float32, float64 for float64);
    ``inv_perms`` is accepted for signature compatibility (the backward scatters instead)."""
    del inv_perms
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, in_features), got shape {tuple(x.shape)}")
    grad = torch.is_grad_enabled() and (x.requires_grad or blocks.requires_grad)
    if not grad and not torch.compiler.is_compiling():  # inference: skip the op's dispatch (~20 µs)
        from . import cpu_apply

        return cpu_apply.forward(x, blocks, perms, int(out_features))
    y, _ = cpu_ops()(x, blocks, perms, int(out_features), False)
    return y
