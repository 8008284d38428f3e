"""The fused CPU apply kernels (backend ``cpu``) against the float64 reference.

Outputs are NaN-poisoned (the conftest's autouse fixture fills ``torch.empty`` with NaN), so an
entry a kernel never writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from sparsefit import GTilde, SparseLinear
from sparsefit.kernels import Backend, fused_cpu_available, resolve_backend
from sparsefit.kernels.reference import gtilde_reference
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not fused_cpu_available(), reason="numba is not installed")

# (in_features, out_features, width, depth, batch): batch 1 (row path), 17 and 301 (chunks, with
# a partial last chunk), widths not powers of two, rectangular both ways, depth 1
SHAPES = [
    (1, 1, 2, 1, 1),
    (5, 7, 10, 3, 1),
    (6, 6, 6, 1, 3),
    (30, 17, 34, 5, 17),
    (17, 30, 34, 4, 301),
    (63, 60, 126, 3, 33),
    (100, 90, 202, 7, 5),
]
IDS = [f"in{k}-out{m}-n{n}-D{d}-B{b}" for k, m, n, d, b in SHAPES]


def _case(k, m, n, depth, batch, seed=0):
    g = GTilde(k, m, depth, n, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 100)
    # perturbed (non-orthogonal) blocks, so transposes and inverses differ
    blocks = g.blocks.detach() + 0.3 * torch.randn(g.blocks.shape, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, k, generator=gen, dtype=torch.float64)
    gy = torch.randn(batch, m, generator=gen, dtype=torch.float64)
    return g.perms, blocks, x, gy


def _grads(fn, x, blocks, perms, m, gy):
    x = x.clone().requires_grad_()
    b = blocks.clone().requires_grad_()
    y = fn(x, b, perms, m)
    gx, gb = torch.autograd.grad(y, [x, b], gy)
    return y.detach(), gx, gb


def _fused(x, b, perms, m):
    from sparsefit.kernels.ops import gtilde_fused_cpu

    return gtilde_fused_cpu(x, b, perms, m)


@pytest.mark.parametrize(("k", "m", "n", "depth", "batch"), SHAPES, ids=IDS)
def test_float64_matches_reference(k, m, n, depth, batch):
    perms, blocks, x, gy = _case(k, m, n, depth, batch)
    y, gx, gb = _grads(_fused, x, blocks, perms, m, gy)
    y_ref, gx_ref, gb_ref = _grads(gtilde_reference, x, blocks, perms, m, gy)
    assert rel_err(y, y_ref) < 1e-13
    assert rel_err(gx, gx_ref) < 1e-13
    assert rel_err(gb, gb_ref) < 1e-13


@pytest.mark.parametrize(("k", "m", "n", "depth", "batch"), SHAPES, ids=IDS)
def test_float32_close_to_float64_reference(k, m, n, depth, batch):
    perms, blocks, x, gy = _case(k, m, n, depth, batch, seed=1)
    y, gx, gb = _grads(_fused, x.float(), blocks.float(), perms, m, gy.float())
    assert y.dtype == gx.dtype == gb.dtype == torch.float32
    y_ref, gx_ref, gb_ref = _grads(gtilde_reference, x, blocks, perms, m, gy)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(gx, gx_ref) < 1e-5
    assert rel_err(gb, gb_ref) < 1e-5


@pytest.mark.parametrize(("batch",), [(1,), (9,)])
def test_gradcheck_float64(batch):
    perms, blocks, x, _ = _case(9, 7, 12, 3, batch, seed=2)
    x.requires_grad_()
    blocks.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: _fused(x, b, perms, 7), (x, blocks))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage(dtype):
    perms, blocks, x, gy = _case(63, 60, 126, 6, 40, seed=3)
    y, gx, gb = _grads(_fused, x.to(dtype), blocks.float(), perms, 60, gy.to(dtype))
    assert y.dtype == gx.dtype == dtype and gb.dtype == torch.float32
    y_ref, gx_ref, gb_ref = _grads(gtilde_reference, x.to(dtype).double(), blocks, perms, 60, gy.to(dtype).double())
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(gx, gx_ref) < 1e-2
    assert rel_err(gb, gb_ref) < 1e-2


@pytest.mark.parametrize("batch", [3, 40])  # row path and chunks
def test_only_one_gradient_and_no_grad(batch):
    perms, blocks, x, gy = _case(30, 17, 34, 5, batch, seed=4)
    _, gx_ref, gb_ref = _grads(gtilde_reference, x, blocks, perms, 17, gy)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(_fused(xr, blocks, perms, 17), [xr], gy)
    assert rel_err(gx, gx_ref) < 1e-13
    b = blocks.clone().requires_grad_()
    (gb,) = torch.autograd.grad(_fused(x, b, perms, 17), [b], gy)
    assert rel_err(gb, gb_ref) < 1e-13
    with torch.no_grad():
        y = _fused(x, b, perms, 17)
    assert not y.requires_grad and rel_err(y, gtilde_reference(x, blocks, perms, 17)) < 1e-13


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_checkpoint_segments_give_the_same_bytes(need_x, dtype):
    # the reverse pass keeps every layer (segment length 1) or recomputes segments of 2, 3, 5
    # (uneven last one) or all 7 layers from their checkpoints: the same bits every time
    from sparsefit.kernels.cpu_apply import backward

    perms, blocks, x, gy = _case(30, 17, 34, 7, 37, seed=5)
    x, blocks, gy = x.to(dtype), blocks.to(dtype), gy.to(dtype)
    runs = [backward(gy, x, blocks, perms, need_x, True, seglen=s) for s in (1, 2, 3, 5, 7)]
    for gx, gb in runs[1:]:
        assert torch.equal(gb, runs[0][1])
        assert (gx is None) == (not need_x) and (gx is None or torch.equal(gx, runs[0][0]))
    if dtype == torch.float64:
        _, gx_ref, gb_ref = _grads(gtilde_reference, x, blocks, perms, 17, gy)
        assert rel_err(runs[2][1], gb_ref) < 1e-13
        if need_x:
            assert rel_err(runs[2][0], gx_ref) < 1e-13


def test_empty_batch():
    perms, blocks, x, _ = _case(5, 7, 10, 3, 1)
    x0 = x[:0].clone().requires_grad_()
    b = blocks.clone().requires_grad_()
    y = _fused(x0, b, perms, 7)
    assert y.shape == (0, 7)
    y.sum().backward()
    assert x0.grad.shape == (0, 5) and torch.equal(b.grad, torch.zeros_like(b))


def test_strided_input_and_int32_perms():
    perms, blocks, x, _ = _case(30, 17, 34, 5, 40, seed=5)
    xs = torch.randn(40, 60, dtype=torch.float64)[:, ::2]  # non-contiguous rows
    ref = gtilde_reference(xs, blocks, perms, 17)
    assert rel_err(_fused(xs, blocks, perms.int(), 17), ref) < 1e-13


@pytest.mark.parametrize("batch", [3, 100])
def test_independent_of_thread_count(batch, monkeypatch):
    import numba

    from sparsefit.kernels import cpu_apply

    monkeypatch.setattr(cpu_apply, "PARALLEL_MIN_WORK", 0)  # the parallel kernels even for small calls
    perms, blocks, x, gy = _case(63, 60, 126, 6, batch, seed=6)
    x, blocks, gy = x.float(), blocks.float(), gy.float()
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _grads(_fused, x, blocks, perms, 60, gy)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = _grads(_fused, x, blocks, perms, 60, gy)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


def test_opcheck_custom_op():
    from sparsefit.kernels.ops import cpu_ops

    op = cpu_ops()
    perms, blocks, x, _ = _case(7, 5, 10, 3, 3)
    x = x.float().requires_grad_()
    b = blocks.float().requires_grad_()
    torch.library.opcheck(op, (x, b, perms, 5, False))
    torch.library.opcheck(op, (x.detach(), b.detach(), perms.int(), 5, False))


def test_torch_compile_traces_the_custom_op():
    perms, blocks, x, gy = _case(7, 5, 10, 3, 3)
    _, gx_ref, gb_ref = _grads(gtilde_reference, x, blocks, perms, 5, gy)
    xr, b = x.clone().requires_grad_(), blocks.clone().requires_grad_()
    # aot_eager runs the fake implementations and the registered autograd formula, as inductor
    # would, without compiling C++ (too slow for the suite)
    f = torch.compile(lambda x, b: (_fused(x, b, perms, 5) * gy).sum(), backend="aot_eager", fullgraph=True)
    f(xr, b).backward()
    assert rel_err(xr.grad, gx_ref) < 1e-13 and rel_err(b.grad, gb_ref) < 1e-13


def test_auto_backend_picks_the_cpu_kernel_and_sparse_linear_trains():
    assert resolve_backend("auto", "cpu") is Backend.CPU
    g = GTilde(30, 17, 5, 34, seed=7)
    layer = SparseLinear(g, torch.zeros(17))
    x = torch.randn(20, 30)
    y = layer(x)
    assert rel_err(y, g(x, backend="reference")) < 1e-5
    y.square().sum().backward()
    ref = GTilde(30, 17, 5, 34, seed=7)
    ref(x, backend="reference").square().sum().backward()
    assert rel_err(g.blocks.grad, ref.blocks.grad) < 1e-5


def test_cpu_backend_on_wrong_device_is_a_clear_error():
    from sparsefit.errors import SparsefitError

    with pytest.raises(SparsefitError, match="CPU tensors"):
        resolve_backend("cpu", "meta")


def test_one_backend_vocabulary():
    from sparsefit import FitConfig
    from sparsefit.errors import SparsefitError
    from sparsefit.kernels import BACKENDS, parse_backend

    assert BACKENDS == ("auto", "reference", "torch", "cpu", "cuda")
    assert FitConfig(backend="numba").backend == "cpu"  # the fit's old name, in stored configs
    assert parse_backend("triton") is Backend.CUDA
    with pytest.raises(SparsefitError, match="unknown backend 'magic'"):
        FitConfig(backend="magic")
