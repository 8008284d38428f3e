"""The Hessian product of one layer's least-squares solve (:mod:`sparsefit.als`), fused for the
CPU (numba), beside its plain PyTorch reference. Both share one signature::

    hessian_product(m, c, x) -> y

* ``m = QᵀQ`` and ``c = ZZᵀ``: symmetric ``(n, n)`` (the layer's neighbours above and below);
* ``x``: a layer's blocks ``(n/2, 2, 2)``;
* ``y``: the 2 × 2 diagonal blocks of ``M · blockdiag(x) · C``, the Hessian of
  ``||Q·blockdiag(x)·Z − A||²_F / 2`` applied to ``x`` (``(n/2, 2, 2)``).

The reference forms ``M · blockdiag(x)`` (an ``n × n`` temporary) and reduces it against ``C``'s
rows; the kernel reads the two rows of ``M`` and of ``C`` belonging to each block once and keeps
the product in registers, so one call streams ``M`` and ``C`` through memory once and writes
nothing but ``y``. Each block of ``y`` is summed by one thread in a fixed order, so the result
does not depend on the thread count.

Importing this module never imports numba (it is imported and the kernel compiled, or loaded
from the disk cache, on first use); without numba, on other devices or dtypes,
:func:`hessian_product` is the reference.
"""

from __future__ import annotations

import functools

import torch


def hessian_product_reference(m: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch product (any device and dtype)."""
    h = x.shape[0]
    n = 2 * h
    mv = m.reshape(n, h, 2)
    mx = torch.mul(mv[:, :, 0:1], x[None, :, 0, :])
    mx.addcmul_(mv[:, :, 1:2], x[None, :, 1, :])
    return torch.bmm(mx.view(h, 2, n), c.reshape(h, 2, n).transpose(1, 2))


@functools.cache
def _kernel():  # numba is imported on first use, not with the package
    import numba

    @numba.njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)
    def product(m, c, x, y):  # pragma: no cover - compiled; checked against the reference
        h = x.shape[0]
        for b in numba.prange(h):
            i = 2 * b
            y00 = 0.0
            y01 = 0.0
            y10 = 0.0
            y11 = 0.0
            for bb in range(h):
                j = 2 * bb
                x00 = x[bb, 0, 0]
                x01 = x[bb, 0, 1]
                x10 = x[bb, 1, 0]
                x11 = x[bb, 1, 1]
                # t = M[i:i+2, j:j+2] · x[bb]; y[b] += t · C[i:i+2, j:j+2]ᵀ
                t00 = m[i, j] * x00 + m[i, j + 1] * x10
                t01 = m[i, j] * x01 + m[i, j + 1] * x11
                t10 = m[i + 1, j] * x00 + m[i + 1, j + 1] * x10
                t11 = m[i + 1, j] * x01 + m[i + 1, j + 1] * x11
                y00 += t00 * c[i, j] + t01 * c[i, j + 1]
                y01 += t00 * c[i + 1, j] + t01 * c[i + 1, j + 1]
                y10 += t10 * c[i, j] + t11 * c[i, j + 1]
                y11 += t10 * c[i + 1, j] + t11 * c[i + 1, j + 1]
            y[b, 0, 0] = y00
            y[b, 0, 1] = y01
            y[b, 1, 0] = y10
            y[b, 1, 1] = y11

    return product


def hessian_product(m: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fused kernel on float64 CPU tensors when numba is installed, else the reference."""
    from . import fused_cpu_available

    if not fused_cpu_available() or m.device.type != "cpu" or not (m.dtype == c.dtype == x.dtype == torch.float64):
        return hessian_product_reference(m, c, x)
    m, c, x = m.contiguous(), c.contiguous(), x.contiguous()
    y = torch.empty_like(x)
    _kernel()(m.numpy(), c.numpy(), x.numpy(), y.numpy())
    return y
