"""The CPU kernels of the least-squares sweeps (:mod:`sparsefit.als`), each fused with numba
beside its plain PyTorch reference of the same signature:

* ``hessian_product(m, c, x) -> y``: ``m = QᵀQ`` and ``c = ZZᵀ`` symmetric ``(n, n)`` (the
  layer's neighbours above and below), ``x`` a layer's blocks ``(n/2, 2, 2)``; ``y`` the 2 × 2
  diagonal blocks of ``M · blockdiag(x) · C``, the Hessian of ``||Q·blockdiag(x)·Z − A||²_F / 2``
  applied to ``x``. The reference forms ``M · blockdiag(x)`` (an ``n × n`` temporary) and reduces
  it against ``C``'s rows; the kernel reads the two rows of ``M`` and of ``C`` belonging to each
  block once and keeps the product in registers, writing nothing but ``y``.
* ``mix_gather(u, b, perm) -> v``: ``(U · blockdiag(b)ᵀ)[:, perm]`` for ``u: (rows, n)``, one
  layer applied to the columns of ``U`` and the columns permuted, in one pass.
* ``congruence(c, b, perm) -> d``: ``(blockdiag(b) · C · blockdiag(b)ᵀ)[perm][:, perm]`` for
  ``c: (n, n)``, one layer applied to both sides of a Gram matrix and both sides permuted, in one
  pass (the reference makes four ``n × n`` temporaries).

Every output element is summed by one thread in a fixed order, so the results do not depend on
the thread count. Importing this module never imports numba (it is imported and the kernels
compiled, or loaded from the disk cache, on first use); without numba, on other devices or
dtypes, each function is its reference.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch


def _mix_cols_t(u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``u @ blockdiag(b)ᵀ`` for ``u: (rows, n)``."""
    h = b.shape[0]
    return torch.einsum("xhc,hrc->xhr", u.reshape(u.shape[0], h, 2), b).reshape(u.shape[0], 2 * h)


def hessian_product_reference(m: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch Hessian product (any device and dtype)."""
    h = x.shape[0]
    n = 2 * h
    mv = m.reshape(n, h, 2)
    mx = torch.mul(mv[:, :, 0:1], x[None, :, 0, :])
    mx.addcmul_(mv[:, :, 1:2], x[None, :, 1, :])
    return torch.bmm(mx.view(h, 2, n), c.reshape(h, 2, n).transpose(1, 2))


def mix_gather_reference(u: torch.Tensor, b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``(u · blockdiag(b)ᵀ)[:, perm]`` in plain PyTorch (any device and dtype)."""
    return _mix_cols_t(u, b)[:, perm]


def congruence_reference(c: torch.Tensor, b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``(blockdiag(b) · c · blockdiag(b)ᵀ)[perm][:, perm]`` in plain PyTorch (any device and dtype)."""
    return _mix_cols_t(_mix_cols_t(c.t(), b).t(), b)[perm][:, perm]


@functools.cache
def _kernels() -> SimpleNamespace:  # numba is imported on first use, not with the package
    import numba
    import numpy as np

    jit = numba.njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)

    @jit
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

    @numba.njit(cache=True, nogil=True)
    def gather_weights(b, perm, col, w0, w1):  # pragma: no cover - compiled
        # entry i of a mixed-and-gathered row is w0[i]·t[col[i]] + w1[i]·t[col[i] + 1]
        for i in range(perm.shape[0]):
            h = perm[i] >> 1
            r = perm[i] & 1
            col[i] = 2 * h
            w0[i] = b[h, r, 0]
            w1[i] = b[h, r, 1]

    @jit
    def mix_gather(u, b, perm, v):  # pragma: no cover - compiled; checked against the reference
        rows, n = u.shape
        col = np.empty(n, np.int64)
        w0 = np.empty(n)
        w1 = np.empty(n)
        gather_weights(b, perm, col, w0, w1)
        for o in numba.prange(rows):
            for i in range(n):
                v[o, i] = w0[i] * u[o, col[i]] + w1[i] * u[o, col[i] + 1]

    @jit
    def congruence(c, b, perm, d):  # pragma: no cover - compiled; checked against the reference
        n = c.shape[0]
        col = np.empty(n, np.int64)
        w0 = np.empty(n)
        w1 = np.empty(n)
        gather_weights(b, perm, col, w0, w1)
        for i in numba.prange(n):
            # row perm[i] of blockdiag(b)·C, then its columns mixed and gathered
            t = np.empty(n)
            for s in range(n):
                t[s] = w0[i] * c[col[i], s] + w1[i] * c[col[i] + 1, s]
            for j in range(n):
                d[i, j] = w0[j] * t[col[j]] + w1[j] * t[col[j] + 1]

    return SimpleNamespace(product=product, mix_gather=mix_gather, congruence=congruence)


def _fused(*tensors: torch.Tensor) -> bool:
    from . import fused_cpu_available

    return fused_cpu_available() and all(t.device.type == "cpu" and t.dtype == torch.float64 for t in tensors)


def hessian_product(m: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fused kernel on float64 CPU tensors when numba is installed, else the reference."""
    if not _fused(m, c, x):
        return hessian_product_reference(m, c, x)
    m, c, x = m.contiguous(), c.contiguous(), x.contiguous()
    y = torch.empty_like(x)
    _kernels().product(m.numpy(), c.numpy(), x.numpy(), y.numpy())
    return y


def _mix_fused(name: str, reference, a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Kernel ``name`` of :func:`_kernels` on float64 CPU tensors when numba is installed, else ``reference``."""
    if not _fused(a, b) or perm.device.type != "cpu":
        return reference(a, b, perm)
    a, b, perm = a.contiguous(), b.contiguous(), perm.to(torch.int64).contiguous()
    out = torch.empty_like(a)
    getattr(_kernels(), name)(a.numpy(), b.numpy(), perm.numpy(), out.numpy())
    return out


def mix_gather(u: torch.Tensor, b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The fused kernel on float64 CPU tensors when numba is installed, else the reference."""
    return _mix_fused("mix_gather", mix_gather_reference, u, b, perm)


def congruence(c: torch.Tensor, b: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The fused kernel on float64 CPU tensors when numba is installed, else the reference."""
    return _mix_fused("congruence", congruence_reference, c, b, perm)
