"""The explicit-vector layer kernels (sparsefit/kernels/simd.py) against numpy, one layer at a time.

Widths cover every tail of the four-block reduction (n/2 % 4 = 0, 1, 2, 3) and a single block;
the whole-stack kernels built on them are compared with PyTorch autograd in test_kernels_cpu*.py.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba.core.errors import TypingError

from sparsefit.kernels import cpu_apply, simd

WIDTHS = (2, 6, 10, 12, 34, 64)


def _case(n, dtype, seed):
    rng = np.random.default_rng(seed)
    src = simd.aligned_empty((n, simd.LANES), dtype)
    gout = simd.aligned_empty((n, simd.LANES), dtype)
    src[:] = rng.standard_normal(src.shape)
    gout[:] = rng.standard_normal(gout.shape)
    perm = rng.permutation(n).astype(np.int64)
    w = rng.standard_normal((n // 2, 2, 2)).astype(dtype)
    acc = rng.standard_normal((n // 2, 2, 2))
    return src, gout, perm, w, acc


def _reference(src, gout, perm, w):
    """Forward, input gradient and per-block lane sums, in float64 numpy."""
    s = src.astype(np.float64)[perm].reshape(-1, 2, simd.LANES)  # (h, 2, lanes): the block's inputs
    e = gout.astype(np.float64).reshape(-1, 2, simd.LANES)
    w64 = w.astype(np.float64)
    fwd = np.einsum("brc,bcl->brl", w64, s).reshape(src.shape)
    gin = np.empty_like(fwd)
    gin[perm] = np.einsum("brc,brl->bcl", w64, e).reshape(src.shape)
    sums = np.einsum("brl,bcl->brc", e, s)
    return fwd, gin, sums


@numba.njit
def _forward(src, dst, perm, w):
    for b in range(perm.shape[0] // 2):
        simd.layer_block(src, dst, perm, w, b)


@numba.njit
def _both(src, gout, gin, perm, w, acc):
    cpu_apply._grad_layer_both(src, gout, gin, perm, w, acc)


@numba.njit
def _blocks(src, gout, perm, acc):
    cpu_apply._grad_layer_blocks(src, gout, perm, acc)


@numba.njit
def _input(gout, gin, perm, w):
    cpu_apply._grad_layer_input(gout, gin, perm, w)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_kernels_match_numpy(n, dtype):
    src, gout, perm, w, acc = _case(n, dtype, seed=n)
    fwd_ref, gin_ref, sums = _reference(src, gout, perm, w)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    scale = np.abs(sums).max()

    dst = simd.aligned_empty(src.shape, dtype)
    _forward(src, dst, perm, w)
    np.testing.assert_allclose(dst, fwd_ref, rtol=tol, atol=tol * np.abs(fwd_ref).max())

    gin = simd.aligned_empty(src.shape, dtype)
    acc_both = acc.copy()
    _both(src, gout, gin, perm, w, acc_both)
    np.testing.assert_allclose(gin, gin_ref, rtol=tol, atol=tol * np.abs(gin_ref).max())
    np.testing.assert_allclose(acc_both - acc, sums, rtol=tol, atol=tol * scale)

    acc_blocks = acc.copy()
    _blocks(src, gout, perm, acc_blocks)
    np.testing.assert_array_equal(acc_blocks, acc_both)  # the same sums, the same order

    gin_only = simd.aligned_empty(src.shape, dtype)
    _input(gout, gin_only, perm, w)
    np.testing.assert_array_equal(gin_only, gin)


def test_each_sum_lands_on_its_block_entry():
    # one nonzero lane product at a time: a misplaced sum in the shuffle tree cannot hide
    n = 8
    for blk in range(n // 2):
        for r in range(2):
            for c in range(2):
                src = simd.aligned_empty((n, simd.LANES), np.float32)
                gout = simd.aligned_empty((n, simd.LANES), np.float32)
                src[:] = 0
                gout[:] = 0
                perm = np.arange(n)
                lane = (3 * blk + 2 * r + c) % simd.LANES
                gout[2 * blk + r, lane] = 2.0
                src[2 * blk + c, lane] = 3.0
                acc = np.zeros((n // 2, 2, 2))
                _blocks(src, gout, perm, acc)
                expected = np.zeros_like(acc)
                expected[blk, r, c] = 6.0
                np.testing.assert_array_equal(acc, expected)


def test_aligned_empty():
    for shape, dtype in [((3, 5, simd.LANES), np.float32), ((7,), np.float64), ((0, 4), np.float32)]:
        a = simd.aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.size == 0 or a.ctypes.data % simd.ALIGN == 0  # an empty array has no data to align


def test_wrong_types_fail_at_compile_time():
    src, gout, perm, w, acc = _case(6, np.float32, seed=0)
    with pytest.raises(TypingError, match="share one float dtype"):
        _both(src, gout.astype(np.float64), src.copy(), perm, w, acc)
    with pytest.raises(TypingError, match="float64"):
        _blocks(src, gout, perm, acc.astype(np.float32))
    with pytest.raises(TypingError, match="C-contiguous"):
        _input(np.asfortranarray(gout), src.copy(), perm, w)
    with pytest.raises(TypingError, match="integer"):
        _forward(src, src.copy(), perm.astype(np.float64), w)
