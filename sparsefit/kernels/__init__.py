"""Backend selection for applying G~.

Every fast path here has a plain PyTorch reference with the same signature in
:mod:`sparsefit.operator`; importing this package never needs a GPU or a compiler.

Backends:

* ``reference`` — :func:`sparsefit.operator.gtilde_reference` (generic autograd; the oracle);
* ``torch`` — :func:`sparsefit.operator.gtilde_torch` (hand-written backward; CPU and CUDA);
* ``cuda`` — the fused GPU kernel (:mod:`sparsefit.kernels.gpu`), CUDA tensors only;
* ``auto`` — ``torch`` for now. The fused kernel has only been checked in Triton's CPU
  interpreter, never on a GPU, so ``auto`` does not hand it to users until it has been: set
  ``SPARSEFIT_FUSED=1`` (or pass ``backend="cuda"``) to opt in; flip
  :data:`FUSED_VERIFIED_ON_GPU` once ``benchmarks/bench_gpu.py`` has passed on a GPU.
"""

from __future__ import annotations

import enum
import os

import torch

from ..errors import SparsefitError

#: Whether ``auto`` may choose the fused kernel: False until a GPU run of
#: ``benchmarks/bench_gpu.py`` has checked it (environment override: ``SPARSEFIT_FUSED=1``).
FUSED_VERIFIED_ON_GPU = False


def _auto_may_use_fused() -> bool:
    return FUSED_VERIFIED_ON_GPU or os.environ.get("SPARSEFIT_FUSED", "") == "1"


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    REFERENCE = "reference"
    CUDA = "cuda"


def fused_gpu_available(x: torch.Tensor) -> bool:
    """True when the fused GPU kernel can run on ``x`` (a CUDA tensor and a working Triton)."""
    if not x.is_cuda:
        return False
    try:
        from . import gpu
    except ImportError:
        return False
    return gpu.is_available()


def dispatch(
    backend: str | Backend,
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    out_features: int,
    inv_perms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply G~ to ``x: (batch, in_features)`` with the chosen backend."""
    from ..operator import gtilde_reference, gtilde_torch

    try:
        b = Backend(backend)
    except ValueError:
        raise SparsefitError(
            f"unknown backend {backend!r}; choose one of: {', '.join(m.value for m in Backend)}"
        ) from None
    if b is Backend.AUTO:
        b = Backend.CUDA if _auto_may_use_fused() and fused_gpu_available(x) else Backend.TORCH
    if b is Backend.REFERENCE:
        return gtilde_reference(x, blocks, perms, out_features)
    if b is Backend.TORCH:
        return gtilde_torch(x.to(blocks.dtype), blocks, perms, out_features, inv_perms)
    if not fused_gpu_available(x):
        raise SparsefitError("the fused CUDA kernel needs a CUDA tensor and Triton; use backend 'torch' here")
    from . import gpu

    return gpu.gtilde_fused(x, blocks, perms, out_features, inv_perms)
