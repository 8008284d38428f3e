"""Float32 linear layers whose matrix products run in bfloat16 on the CPU, for training.

:func:`linear_bf16` has the signature of its reference :func:`linear_reference`
(``torch.nn.functional.linear``): inputs, outputs and gradients stay float32, and each of the three
products (the output, the input gradient, the weight gradient) rounds its operands to bfloat16 and
accumulates in float32 — oneDNN's float32 "bf16" math mode, switched on for the duration of each
product only. On a CPU with AMX the products of a transformer's larger linears run 2-3× faster than
in float32 (``benchmarks/bench_distill_step.py``); the relative error of an output is about 2e-3.

Why the rows are padded: oneDNN compiles a kernel for every new product shape (10-30 ms each) and
keeps 1024 of them. Training batches of text come in many padded lengths, so the products of a
transformer take thousands of shapes and the kernels would be compiled again in every step. Here
the rows (all leading dimensions together) are padded with zeros to a multiple of :data:`ROWS`;
the output and input-gradient products run :data:`ROWS` rows at a time (one shape per layer) and
the weight gradient in one product over the padded rows (one shape per layer and multiple of
:data:`ROWS`). Zero rows change no gradient.

:class:`bf16_linears` routes the ``F.linear`` calls of a model's training forward pass (the low-rank
factors of :class:`~sparsefit.SparseLinear` and plain ``nn.Linear`` layers alike) to
:func:`linear_bf16`, for the layers large enough to gain.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Rows per product (see the module's docstring).
ROWS = 128

#: Products whose weight has fewer elements than this stay in float32 (for them the conversions
#: cost more than the bfloat16 arithmetic saves: a 384×80 factor runs at 0.7×, 384×384 at 1.5×).
MIN_WEIGHT_ELEMENTS = 1 << 17


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in the inputs' dtype: the oracle of :func:`linear_bf16`."""
    return torch.nn.functional.linear(x, weight, bias)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's CPU (empty where ``/proc/cpuinfo`` cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def amx_bf16() -> bool:
    """Whether this CPU has AMX tiles for bfloat16, where :func:`linear_bf16` has been measured to gain."""
    return "amx_bf16" in cpu_flags() and torch.backends.mkldnn.is_available()


@contextlib.contextmanager
def _bf16_products() -> Iterator[None]:
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


def _padded(x2: torch.Tensor, rows: int) -> torch.Tensor:
    if x2.shape[0] == rows and x2.is_contiguous():
        return x2
    out = x2.new_empty(rows, x2.shape[1])
    out[: x2.shape[0]] = x2
    out[x2.shape[0] :] = 0
    return out


def _chunked_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = a.new_empty(a.shape[0], b.shape[1])
    for r in range(0, a.shape[0], ROWS):
        torch.mm(a[r : r + ROWS], b, out=out[r : r + ROWS])
    return out


class _LinearBf16(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        xp = _padded(x2, -(-m // ROWS) * ROWS)
        with _bf16_products():
            out = _chunked_mm(xp, weight.t())
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(xp, weight)
        ctx.rows, ctx.lead, ctx.has_bias = m, lead, bias is not None
        return out[:m].view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xp, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.shape[0])
        gp = _padded(g2, xp.shape[0])
        gx = gw = gb = None
        with _bf16_products():
            if ctx.needs_input_grad[0]:
                gx = _chunked_mm(gp, weight)[: ctx.rows].view(*ctx.lead, weight.shape[1])
            if ctx.needs_input_grad[1]:
                gw = torch.mm(gp.t(), xp)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_reference` with bfloat16 products (float32 CPU tensors; see the module's docstring)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"linear_bf16 takes float32 CPU tensors, got {x.dtype} on {x.device} and {weight.dtype}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input width {x.shape[-1]} does not match the weight {tuple(weight.shape)}")
    if x.numel() == 0:
        return linear_reference(x, weight, bias)
    return _LinearBf16.apply(x, weight, bias)


def _route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return linear_bf16(x, weight, bias)  # looked up at call time (tests count the calls)


class bf16_linears(TorchFunctionMode):
    """Within this context, ``F.linear`` calls that build a graph for training run :func:`linear_bf16`.

    Only calls with float32 CPU tensors, gradients enabled, and a weight of at least
    ``min_weight_elements`` elements (default :data:`MIN_WEIGHT_ELEMENTS`) are routed; everything
    else (``torch.no_grad`` evaluation, small layers, other dtypes or devices) runs exactly as
    without the context.
    """

    def __init__(self, min_weight_elements: int | None = None) -> None:
        super().__init__()
        self.min_weight_elements = MIN_WEIGHT_ELEMENTS if min_weight_elements is None else min_weight_elements

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and torch.is_grad_enabled():
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                isinstance(x, torch.Tensor)
                and x.dtype == torch.float32
                and x.device.type == "cpu"
                and weight.dtype == torch.float32
                and weight.numel() >= self.min_weight_elements
                and (x.requires_grad or weight.requires_grad)
            ):
                return _route(x, weight, bias)
        return func(*args, **kwargs)
