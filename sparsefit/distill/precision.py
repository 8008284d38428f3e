"""Where and how passes run in bfloat16: whether the hardware multiplies it natively
(:func:`runs_in_bfloat16`), the region of a student's bfloat16 training pass (autocast, with
attention kept in float32 on CPUs), the teacher's linear weights cast once
(:func:`bfloat16_linear_weights`) and the width batches are padded to."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

#: Where a pass runs in bfloat16, batch widths are rounded up to a multiple of this many tokens:
#: oneDNN compiles a kernel per new matrix shape, and a width per batch made every step pay for it.
BF16_WIDTH_MULTIPLE = 8


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runs_in_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether a pass with this precision (:data:`PRECISIONS`: ``DistillConfig.teacher_dtype`` or
    ``student_dtype``) runs in bfloat16 on ``device``; ``"auto"``: where bfloat16 is multiplied
    natively (a CUDA device that supports it, a CPU with AVX512-BF16 or AMX)."""
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


class _Float32Attention(torch.overrides.TorchFunctionMode):
    """Runs ``scaled_dot_product_attention`` in float32 inside a bfloat16 autocast region (CPU): its
    bfloat16 backward pass took 19.4 ms a call against 1.3 ms in float32 (all-MiniLM-L6-v2, batch
    32, torch 2.13, 2-core AMX Xeon; ``benchmarks/NOTES.md``, 2026-12-03)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is not nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)

        def up(x: Any) -> Any:
            return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

        with torch.autocast("cpu", enabled=False):
            return func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def _student_precision(bfloat16: bool, device: torch.device):
    """The region of a student's training forward pass: bfloat16 autocast (attention in float32 on
    CPUs, :class:`_Float32Attention`) when ``bfloat16``, else nothing."""
    if not bfloat16:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if device.type == "cpu":
            stack.enter_context(_Float32Attention())
        yield


@torch.no_grad()
def bfloat16_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """bfloat16 copies of the weights and biases of ``model``'s ``nn.Linear`` modules, by name.

    For a frozen model run under bfloat16 autocast: autocast casts every such weight on every call
    (it caches casts only of tensors that require gradients); with these copies swapped in
    (:func:`_run_teacher`'s ``weights``) it finds them cast already. The rounding is the same, so
    the outputs are the same bytes."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = p.detach().to(torch.bfloat16)
    return out
