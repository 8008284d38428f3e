import math

import pytest
import torch

from sparsefit import GTilde, SparsefitError
from sparsefit.operator import (
    default_width,
    gtilde_num_parameters,
    gtilde_reference,
    gtilde_torch,
    gtilde_transpose_reference,
    gtilde_transpose_torch,
    orthogonality_penalty,
    random_orthogonal_blocks,
)
from tests.conftest import rel_err

# (in_features, out_features, width, depth, batch): odd batches, widths that are not powers of two
SHAPES = [
    (1, 1, 2, 1, 1),
    (7, 5, 10, 3, 3),
    (5, 7, 14, 2, 1),
    (30, 17, 66, 5, 37),
    (100, 100, 202, 7, 4),
    (63, 60, 126, 4, 129),
]
IDS = [f"in{k}-out{m}-n{n}-D{d}-B{b}" for k, m, n, d, b in SHAPES]


@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES, ids=IDS)
def test_torch_path_matches_reference_float64(k, m, n, depth, batch):
    g = GTilde(k, m, depth, n, seed=3, dtype=torch.float64)
    blocks = (g.blocks.detach() + 0.3 * torch.randn_like(g.blocks)).requires_grad_()
    x = torch.randn(batch, k, dtype=torch.float64, requires_grad=True)
    y_ref = gtilde_reference(x, blocks, g.perms, m)
    y = gtilde_torch(x, blocks, g.perms, m)
    assert y.shape == (batch, m)
    assert rel_err(y, y_ref) < 1e-13
    gy = torch.randn_like(y_ref)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, [x, blocks], gy)
    gx, gb = torch.autograd.grad(y, [x, blocks], gy)
    assert rel_err(gx, gx_ref) < 1e-13
    assert rel_err(gb, gb_ref) < 1e-13


@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES[1:4], ids=IDS[1:4])
def test_torch_path_float32_close_to_float64(k, m, n, depth, batch):
    g = GTilde(k, m, depth, n, seed=1, dtype=torch.float64)
    x = torch.randn(batch, k, dtype=torch.float64)
    y64 = gtilde_reference(x, g.blocks.detach(), g.perms, m)
    y32 = gtilde_torch(x.float(), g.blocks.detach().float(), g.perms, m)
    assert y32.dtype == torch.float32
    assert rel_err(y32, y64) < 1e-5


def test_gradcheck_small():
    g = GTilde(6, 4, 3, 8, seed=0, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = g.blocks.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: gtilde_torch(x, b, g.perms, 4), (x, b))


def test_only_block_gradient_needed():
    g = GTilde(9, 9, 4, 18, seed=0, dtype=torch.float64)
    x = torch.randn(5, 9, dtype=torch.float64)
    y = g(x, backend="torch")
    (gb,) = torch.autograd.grad(y.sum(), [g.blocks])
    (gb_ref,) = torch.autograd.grad(g(x, backend="reference").sum(), [g.blocks])
    assert rel_err(gb, gb_ref) < 1e-13


@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES, ids=IDS)
def test_to_dense_and_transpose(k, m, n, depth, batch):
    g = GTilde(k, m, depth, n, seed=2, dtype=torch.float64)
    dense = g.to_dense()
    assert dense.shape == (m, k)
    x = torch.randn(batch, k, dtype=torch.float64)
    assert rel_err(g(x).detach(), x @ dense.t()) < 1e-13
    y = torch.randn(batch, m, dtype=torch.float64)
    xt_ref = gtilde_transpose_reference(y, g.blocks.detach(), g.perms, k)
    assert rel_err(xt_ref, y @ dense) < 1e-13
    assert rel_err(gtilde_transpose_torch(y, g.blocks.detach(), g.perms, k), xt_ref) < 1e-13
    assert rel_err(g.transpose_apply(y), xt_ref) < 1e-13


def test_to_dense_in_chunks_matches_single_chunk():
    g = GTilde(37, 20, 3, seed=0, dtype=torch.float64)
    assert torch.equal(g.to_dense(chunk=5), g.to_dense())


def test_leading_dimensions_are_kept():
    g = GTilde(12, 8, 3)
    assert g(torch.randn(2, 3, 12)).shape == (2, 3, 8)


def test_initial_blocks_are_orthogonal_and_penalty_vanishes():
    gen = torch.Generator().manual_seed(0)
    b = random_orthogonal_blocks(4, 50, gen, torch.float64)
    btb = b.transpose(-1, -2) @ b
    assert torch.allclose(btb, torch.eye(2, dtype=torch.float64).expand_as(btb), atol=1e-12)
    dets = torch.linalg.det(b)
    assert (dets > 0).any() and (dets < 0).any()  # rotations and reflections both occur
    assert orthogonality_penalty(b).item() < 1e-24
    # square operator from orthogonal blocks is orthogonal
    g = GTilde(16, 16, 5, 16, dtype=torch.float64)
    d = g.to_dense()
    assert torch.allclose(d.t() @ d, torch.eye(16, dtype=torch.float64), atol=1e-12)


def test_penalty_value():
    b = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # BᵀB = diag(4, 1)
    assert orthogonality_penalty(b).item() == pytest.approx(2 * 9)


def test_same_seed_same_operator_different_seed_different():
    a, b, c = GTilde(10, 10, 4, seed=5), GTilde(10, 10, 4, seed=5), GTilde(10, 10, 4, seed=6)
    assert torch.equal(a.perms, b.perms) and torch.equal(a.blocks, b.blocks)
    assert not torch.equal(a.perms, c.perms)


def test_counts_and_default_width():
    assert default_width(3, 5) == 10
    g = GTilde(1024, 1024, 24)
    assert g.width == 2048
    assert g.num_parameters == gtilde_num_parameters(24, 2048) == 24 * 1024 * 4
    assert g.flops_per_matvec == 4 * 2048 * 24


@pytest.mark.parametrize(
    "k,m,depth,width,msg",
    [(4, 4, 0, 8, "depth"), (4, 4, 2, 7, "even"), (10, 4, 2, 8, "smaller"), (0, 4, 2, 8, "empty")],
    ids=["depth0", "odd-width", "width-too-small", "empty"],
)
def test_bad_shapes(k, m, depth, width, msg):
    with pytest.raises(SparsefitError, match=msg):
        GTilde(k, m, depth, width)


def test_wrong_input_width():
    with pytest.raises(SparsefitError, match="expects 6"):
        GTilde(6, 3, 2)(torch.randn(2, 5))


def test_unknown_backend():
    with pytest.raises(SparsefitError, match="unknown backend"):
        GTilde(6, 3, 2)(torch.randn(2, 6), backend="nope")


def test_cuda_backend_refused_on_cpu_tensor():
    with pytest.raises(SparsefitError, match="CUDA"):
        GTilde(6, 3, 2)(torch.randn(2, 6), backend="cuda")


def test_float64_precision_of_deep_operator():
    g = GTilde(64, 64, 40, seed=0, dtype=torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64)
    # orthogonal blocks: norms preserved on the padded space
    y_full = gtilde_reference(x, g.blocks.detach(), g.perms, 128)
    assert math.isclose(float(y_full.norm()), float(x.norm()), rel_tol=1e-12)


def test_orthogonality_penalty_grad_matches_autograd():
    from sparsefit.operator import orthogonality_penalty_grad

    b = torch.randn(3, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(orthogonality_penalty(b), b)
    assert rel_err(orthogonality_penalty_grad(b.detach()), g) < 1e-13


def test_auto_backend_keeps_unverified_fused_kernel_opt_in(monkeypatch):
    import sparsefit.kernels as kernels

    x = torch.randn(3, 4)
    monkeypatch.delenv("SPARSEFIT_FUSED", raising=False)
    assert kernels._auto_may_use_fused() is kernels.FUSED_VERIFIED_ON_GPU
    monkeypatch.setenv("SPARSEFIT_FUSED", "1")
    assert kernels._auto_may_use_fused()
    # on a CPU tensor auto is the fused CPU kernel (or the torch path without numba) either way
    g = GTilde(4, 4, 2, 8, seed=0)
    assert rel_err(g(x), g(x, backend="reference")) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
def test_autocast_runs_in_the_blocks_dtype(backend):
    """Under bfloat16 autocast (a bfloat16-products distillation) G~ has no low-precision kernel: it
    takes a bfloat16 or float32 input and computes in float32, as outside autocast."""
    torch.manual_seed(0)
    op = GTilde(48, 40, depth=4, seed=1)
    x = torch.randn(17, 48, requires_grad=True)
    exact = op(x, backend=backend)
    exact.sum().backward()
    gx, gb = x.grad.clone(), op.blocks.grad.clone()
    x.grad = op.blocks.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, backend=backend)
        yb = op(x.detach().bfloat16(), backend=backend)
    assert y.dtype == torch.float32 and yb.dtype == torch.float32
    torch.testing.assert_close(y, exact, rtol=0, atol=0)
    torch.testing.assert_close(yb, op(x.detach().bfloat16().float(), backend=backend), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=0)
    torch.testing.assert_close(op.blocks.grad, gb, rtol=0, atol=0)
