"""Implementations of ``y = G~ x`` and the one backend vocabulary for apply, fit and bench.

Every implementation has the signature ``f(x, blocks, perms, out_features) -> y`` of the plain
PyTorch reference :func:`sparsefit.kernels.reference.gtilde_reference`; importing this package
never needs numba, a GPU or a compiler (the fused kernels are imported on first use).

Backends (:class:`Backend`):

* ``reference`` — :mod:`sparsefit.kernels.reference` (generic autograd; the oracle);
* ``torch`` — :mod:`sparsefit.kernels.torch_path` (hand-written backward; any device);
* ``cpu`` — the fused numba kernels, CPU tensors only (the fit uses its fused training step,
  :mod:`sparsefit.kernels.cpu`);
* ``cuda`` — the fused Triton kernels (:mod:`sparsefit.kernels.gpu`), CUDA tensors only;
* ``auto`` — ``cuda`` on a CUDA tensor once the Triton kernel has been checked on a GPU (until
  then ``torch``: set ``SPARSEFIT_FUSED=1`` or pass ``backend="cuda"`` to opt in; flip
  :data:`FUSED_VERIFIED_ON_GPU` once ``benchmarks/bench_gpu.py`` has passed on a GPU), ``cpu``
  on a CPU tensor when numba is installed, else ``torch``.

``sparsefit bench`` names the fused backend of its device ``fused`` (see :func:`fused_backend`).
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import os

import torch

from ..errors import SparsefitError
from .reference import gtilde_reference
from .torch_path import gtilde_torch

#: Whether ``auto`` may choose the fused kernel: False until a GPU run of
#: ``benchmarks/bench_gpu.py`` has checked it (environment override: ``SPARSEFIT_FUSED=1``).
FUSED_VERIFIED_ON_GPU = False


class Backend(str, enum.Enum):
    """How to apply G~ (and, for the fit, how to run a training step)."""

    AUTO = "auto"
    REFERENCE = "reference"
    TORCH = "torch"
    CPU = "cpu"
    CUDA = "cuda"


#: The backend names, in the order the CLI lists them.
BACKENDS = tuple(b.value for b in Backend)

#: Older names still accepted (configs stored in files written before the vocabulary was unified).
_ALIASES = {"numba": Backend.CPU, "triton": Backend.CUDA}


def parse_backend(name: str | Backend) -> Backend:
    """``name`` as a :class:`Backend`; :class:`SparsefitError` if it is none."""
    if isinstance(name, Backend):
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    try:
        return Backend(name)
    except ValueError:
        raise SparsefitError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None


def fused_backend(device: torch.device | str) -> Backend:
    """The fused kernel's backend for a device type: ``cuda`` on CUDA, ``cpu`` elsewhere."""
    return Backend.CUDA if torch.device(device).type == "cuda" else Backend.CPU


def _auto_may_use_fused() -> bool:
    return FUSED_VERIFIED_ON_GPU or os.environ.get("SPARSEFIT_FUSED", "") == "1"


def fused_gpu_available(where: torch.Tensor | torch.device | str) -> bool:
    """True when the fused GPU kernel can run on ``where`` (a CUDA tensor or device, and Triton)."""
    dev = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    if dev.type != "cuda":
        return False
    try:
        from . import gpu
    except ImportError:
        return False
    return gpu.is_available()


@functools.cache
def fused_cpu_available() -> bool:
    """True when the fused CPU kernels can run (numba is installed; nothing is imported)."""
    return importlib.util.find_spec("numba") is not None


def resolve_backend(backend: str | Backend, device: torch.device | str) -> Backend:
    """The concrete backend ``backend`` means on ``device`` (``auto`` resolved; checks that a
    fused backend can run there, else :class:`SparsefitError`)."""
    b = parse_backend(backend)
    dev = torch.device(device)
    if b is Backend.AUTO:
        if dev.type == "cuda":
            usable = _auto_may_use_fused() and fused_gpu_available(dev)
            return Backend.CUDA if usable else Backend.TORCH
        return Backend.CPU if dev.type == "cpu" and fused_cpu_available() else Backend.TORCH
    if b is Backend.CPU and dev.type != "cpu":
        raise SparsefitError(f"the cpu backend runs on CPU tensors, got a {dev.type} tensor; use backend 'auto'")
    if b is Backend.CPU and not fused_cpu_available():
        raise SparsefitError("the cpu backend needs numba; pip install numba, or use backend 'torch'")
    if b is Backend.CUDA and not (dev.type == "cuda" and fused_gpu_available(dev)):
        raise SparsefitError("the fused CUDA kernel needs a CUDA tensor and Triton; use backend 'torch' here")
    return b


def dispatch(
    backend: str | Backend,
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: torch.Tensor,
    out_features: int,
    inv_perms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply G~ to ``x: (batch, in_features)`` with the chosen backend."""
    b = resolve_backend(backend, x.device)
    if b is Backend.REFERENCE:
        return gtilde_reference(x, blocks, perms, out_features)
    if b is Backend.TORCH:
        return gtilde_torch(x.to(blocks.dtype), blocks, perms, out_features, inv_perms)
    if b is Backend.CPU:
        from .ops import gtilde_fused_cpu

        return gtilde_fused_cpu(x, blocks, perms, out_features, inv_perms)
    from . import gpu

    return gpu.gtilde_fused(x, blocks, perms, out_features, inv_perms)
