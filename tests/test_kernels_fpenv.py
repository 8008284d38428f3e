"""The numba kernels compute subnormal numbers as zero, and leave every thread's mode as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsefit.kernels import cpu
from sparsefit.kernels.reference import gtilde_reference
from sparsefit.operator import random_orthogonal_blocks
from sparsefit.permutations import sample_permutations

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason="numba is not installed")
fpenv = pytest.importorskip("sparsefit.kernels.fpenv")  # needs numba
x86_only = pytest.mark.skipif(not fpenv.X86_64, reason="the kernels set flush-to-zero on x86-64 only")

TINY = np.finfo(np.float32).tiny  # smallest normal float32, 1.18e-38


def _tiny_problem(batch: int, seed: int = 0):
    """Two layers whose blocks are 1e-20 times orthogonal ones: the output is about 1e-40,
    subnormal in float32, and the reference computes it as such."""
    g = torch.Generator().manual_seed(seed)
    n, depth = 10, 2
    blocks = 1e-20 * random_orthogonal_blocks(depth, n, g, torch.float32)
    perms = sample_permutations(depth, n, g)
    x = 1.0 + torch.rand(batch, 9, generator=g)
    return x, blocks, perms


def _subnormal_survives() -> bool:
    a = np.array([1e-39], dtype=np.float32)
    return bool((a * np.float32(3.0))[0] != 0)


@x86_only
@pytest.mark.parametrize("batch", [1, 17, 301], ids=lambda b: f"B{b}")  # row kernel, chunked serial/parallel
def test_forward_flushes_subnormal_results_to_zero(batch):
    from sparsefit.kernels.cpu_apply import forward

    x, blocks, perms = _tiny_problem(batch)
    ref = gtilde_reference(x, blocks, perms, 8)
    assert ((ref != 0) & (ref.abs() < TINY)).any()  # the reference does produce subnormals
    y = forward(x, blocks, perms, 8)
    assert torch.all(y == 0)


@x86_only
def test_fit_step_flushes_subnormal_activations():
    # layers scaled 1e-20, 1e-20, 1e30: the activations after layer 2 are about 1e-40 (subnormal)
    # and the output about 1e-10. The kernel flushes the subnormal state, so its output is 0.
    g = torch.Generator().manual_seed(1)
    n, batch = 12, 37
    blocks = random_orthogonal_blocks(3, n, g, torch.float32)
    blocks[:2] *= 1e-20
    blocks[2] *= 1e30
    perms = sample_permutations(3, n, g)
    x = 1.0 + torch.rand(batch, n, generator=g)
    t = torch.zeros(batch, n)
    mse_ref, _ = cpu.fit_step_reference(x, t, blocks, perms, n)
    assert float(mse_ref) > 0
    mse, grad = cpu.fit_step_numba(x, t, blocks, perms, n)
    assert float(mse) == 0.0
    assert torch.all(grad == 0)


def test_kernels_restore_the_floating_point_mode():
    from sparsefit.kernels.cpu_apply import backward, forward

    g = torch.Generator().manual_seed(2)
    n, depth = 66, 4
    blocks = random_orthogonal_blocks(depth, n, g, torch.float32)
    perms = sample_permutations(depth, n, g)
    for batch in (1, 17, 301, 4096):  # serial and parallel variants
        x = torch.randn(batch, 60, generator=g)
        y = forward(x, blocks, perms, 50)
        backward(torch.ones_like(y), x, blocks, perms, True, True)
        cpu.fit_step_numba(x, torch.zeros(batch, 50), blocks, perms, 50)
        assert _subnormal_survives()  # this thread
    assert not _worker_modes_have_ftz()  # numba's worker threads


def _worker_modes_have_ftz() -> bool:
    import numba

    if not fpenv.X86_64:
        return False

    @numba.njit(parallel=True)
    def modes(out):
        for i in numba.prange(out.shape[0]):
            out[i] = fpenv._read_mxcsr()

    out = np.zeros(64, dtype=np.uint32)
    modes(out)
    return bool(np.any(out & fpenv.FTZ_DAZ))
