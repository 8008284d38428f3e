"""The fused Triton kernels (:mod:`sparsefit.kernels.gpu`) against the float64 reference.

Two kinds of test:

* ``test_interp_*`` run the real Triton kernels on CPU tensors in Triton's interpreter
  (``TRITON_INTERPRET=1``, which must be set before Triton is imported). They run in a child
  pytest started by :func:`test_interpreter_suite`, so the variable never leaks into this
  process; run here directly they skip.
* ``@pytest.mark.gpu`` tests compile the kernels for a real GPU (skipped without CUDA).

The conftest's autouse fixture fills ``torch.empty`` with NaN in both, so an output element a
kernel never writes fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsefit import GTilde
from sparsefit.operator import gtilde_reference
from tests.conftest import rel_err

IN_INTERP = os.environ.get("SPARSEFIT_INTERP_CHILD") == "1"
interp_only = pytest.mark.skipif(not IN_INTERP, reason="runs in the Triton-interpreter child of test_interpreter_suite")
HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None

# (in_features, out_features, width, depth, batch): odd batches, widths not powers of two,
# rectangular both ways
SHAPES = [
    (1, 1, 2, 1, 1),
    (5, 7, 10, 3, 3),
    (6, 6, 6, 2, 1),
    (30, 17, 34, 5, 37),
    (17, 30, 34, 4, 5),
    (63, 60, 126, 3, 9),
]
IDS = [f"in{k}-out{m}-n{n}-D{d}-B{b}" for k, m, n, d, b in SHAPES]
MODES = ["fused", "layered", "fused-pairgather"]


def _case(k, m, n, depth, batch, dtype, seed=0, device="cpu"):
    g = GTilde(k, m, depth, n, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 100)
    # perturbed (non-orthogonal) blocks, so transposes and inverses differ
    blocks64 = g.blocks.detach() + 0.3 * torch.randn(g.blocks.shape, generator=gen, dtype=torch.float64)
    x64 = torch.randn(batch, k, generator=gen, dtype=torch.float64)
    gy64 = torch.randn(batch, m, generator=gen, dtype=torch.float64)
    return g.perms.to(device), blocks64.to(device), x64.to(device), gy64.to(device)


def _reference(x64, blocks64, perms, m, gy64):
    x = x64.clone().requires_grad_()
    b = blocks64.clone().requires_grad_()
    y = gtilde_reference(x, b, perms, m)
    gx, gb = torch.autograd.grad(y, [x, b], gy64)
    return y.detach(), gx, gb


def _fused(x, blocks, perms, m, gy):
    from sparsefit.kernels import gpu

    x = x.clone().requires_grad_()
    b = blocks.clone().requires_grad_()
    y = gpu.gtilde_fused(x, b, perms, m)
    gx, gb = torch.autograd.grad(y, [x, b], gy)
    return y.detach(), gx, gb


@pytest.fixture
def mode(request):
    from sparsefit.kernels import gpu

    saved = (gpu.config.force, gpu.config.pair_gather)
    name = request.param
    gpu.config.force = "layered" if name == "layered" else "fused"
    gpu.config.pair_gather = name == "fused-pairgather"
    yield name
    gpu.config.force, gpu.config.pair_gather = saved


# ----------------------------------------------------------------------------------------------
# The interpreter suite (parent side)
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(IN_INTERP, reason="this is the parent")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'sparsefit[gpu]')")
def test_interpreter_suite():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", SPARSEFIT_INTERP_CHILD="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "interp_"]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]


# ----------------------------------------------------------------------------------------------
# Interpreter cases (child side): the real kernels on CPU tensors
# ----------------------------------------------------------------------------------------------
@interp_only
@pytest.mark.parametrize("mode", MODES, indirect=True)
@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES, ids=IDS)
def test_interp_float64_forward_and_gradients(mode, k, m, n, depth, batch):
    perms, blocks, x, gy = _case(k, m, n, depth, batch, torch.float64)
    y_ref, gx_ref, gb_ref = _reference(x, blocks, perms, m, gy)
    y, gx, gb = _fused(x, blocks, perms, m, gy)
    assert y.shape == (batch, m) and y.dtype == torch.float64
    assert gx.shape == (batch, k) and gb.shape == blocks.shape
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(gx, gx_ref) < 1e-12
    assert rel_err(gb, gb_ref) < 1e-12


@interp_only
@pytest.mark.parametrize("mode", ["fused", "layered"], indirect=True)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)])
def test_interp_low_precision_io(mode, dtype, tol):
    k, m, n, depth, batch = 30, 17, 34, 5, 37
    perms, blocks, x, gy = _case(k, m, n, depth, batch, dtype, seed=4)
    y_ref, gx_ref, gb_ref = _reference(x.to(dtype).double(), blocks.float().double(), perms, m, gy.to(dtype).double())
    y, gx, gb = _fused(x.to(dtype), blocks.float(), perms, m, gy.to(dtype))
    assert y.dtype == dtype and gx.dtype == dtype and gb.dtype == torch.float32
    assert rel_err(y, y_ref) < tol
    assert rel_err(gx, gx_ref) < tol
    assert rel_err(gb, gb_ref) < 2 * tol


@interp_only
@pytest.mark.parametrize("mode", ["fused", "layered"], indirect=True)
def test_interp_only_one_gradient_and_no_grad(mode):
    from sparsefit.kernels import gpu

    perms, blocks, x, gy = _case(9, 9, 18, 4, 5, torch.float64, seed=2)
    _, gx_ref, gb_ref = _reference(x, blocks, perms, 9, gy)
    b = blocks.clone().requires_grad_()
    (gb,) = torch.autograd.grad(gpu.gtilde_fused(x, b, perms, 9), [b], gy)
    assert rel_err(gb, gb_ref) < 1e-12
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(gpu.gtilde_fused(xr, blocks, perms, 9), [xr], gy)
    assert rel_err(gx, gx_ref) < 1e-12
    with torch.no_grad():
        y = gpu.gtilde_fused(x, b, perms, 9)
    assert not y.requires_grad and rel_err(y, gtilde_reference(x, blocks, perms, 9)) < 1e-12


@interp_only
@pytest.mark.parametrize("mode", ["fused", "layered"], indirect=True)
def test_interp_strided_input_and_int32_perms(mode):
    from sparsefit.kernels import gpu

    perms, blocks, x, _ = _case(7, 5, 10, 3, 11, torch.float64, seed=5)
    xs = x.repeat(1, 2)[:, ::2]  # unit stride lost along features
    xb = torch.cat([x, x], 0)[::2]  # batch stride 2·k
    for xi in (xs, xb):
        y = gpu.gtilde_fused(xi, blocks, perms.int(), 5)
        assert rel_err(y, gtilde_reference(xi, blocks, perms, 5)) < 1e-12


@interp_only
@pytest.mark.parametrize("mode", ["fused", "layered"], indirect=True)
def test_interp_empty_batch(mode):
    from sparsefit.kernels import gpu

    perms, blocks, _, _ = _case(7, 5, 10, 3, 1, torch.float64)
    x = torch.zeros(0, 7, dtype=torch.float64, requires_grad=True)
    b = blocks.clone().requires_grad_()
    y = gpu.gtilde_fused(x, b, perms, 5)
    assert y.shape == (0, 5)
    gx, gb = torch.autograd.grad(y.sum(), [x, b])
    assert gx.shape == (0, 7) and torch.equal(gb, torch.zeros_like(gb))


@interp_only
def test_interp_block_gradient_is_deterministic_across_splits():
    from sparsefit.kernels import gpu

    perms, blocks, x, gy = _case(30, 17, 34, 3, 37, torch.float32, seed=6)
    x, blocks, gy = x.float(), blocks.float(), gy.float()
    saved = gpu.config.grad_rows
    try:
        gpu.config.grad_rows = 4  # ten batch slices, summed in the second stage
        runs = [_fused(x, blocks, perms, 17, gy)[2] for _ in range(2)]
    finally:
        gpu.config.grad_rows = saved
    assert torch.equal(runs[0], runs[1])
    _, _, gb_ref = _reference(x.double(), blocks.double(), perms, 17, gy.double())
    assert rel_err(runs[0], gb_ref) < 1e-5


@interp_only
def test_interp_opcheck_custom_op():
    from sparsefit.kernels import gpu  # noqa: F401  registers the ops

    perms, blocks, x, _ = _case(7, 5, 10, 3, 3, torch.float32)
    x = x.float().requires_grad_()
    b = blocks.float().requires_grad_()
    torch.library.opcheck(torch.ops.sparsefit.gtilde_fwd.default, (x, b, perms.int(), 5, True))
    torch.library.opcheck(torch.ops.sparsefit.gtilde_fwd.default, (x.detach(), b.detach(), perms.int(), 5, False))


@interp_only
def test_interp_torch_compile_traces_the_custom_op():
    from sparsefit.kernels import gpu

    perms, blocks, x, gy = _case(7, 5, 10, 3, 3, torch.float64)
    _, gx_ref, gb_ref = _reference(x, blocks, perms, 5, gy)
    xr, b = x.clone().requires_grad_(), blocks.clone().requires_grad_()
    # aot_eager runs the fake implementations and the registered autograd formula, as inductor
    # would, without compiling C++ (too slow for the CPU suite; the GPU tests use inductor)
    f = torch.compile(lambda x, b: (gpu.gtilde_fused(x, b, perms, 5) * gy).sum(), backend="aot_eager", fullgraph=True)
    f(xr, b).backward()
    assert rel_err(xr.grad, gx_ref) < 1e-12 and rel_err(b.grad, gb_ref) < 1e-12


@interp_only
def test_interp_gtilde_module_cuda_backend_path():
    """``GTilde`` / ``SparseLinear`` reach the kernel through ``dispatch`` (forced: no CUDA here)."""
    from sparsefit.kernels import gpu

    g = GTilde(12, 8, 3, 14, seed=1, dtype=torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64)
    y = gpu.gtilde_fused(x, g.blocks, g.perms, 8, g.inv_perms)
    assert rel_err(y, g(x, backend="reference")) < 1e-12


# ----------------------------------------------------------------------------------------------
# Launcher logic that needs no kernel run
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_resource_errors_shrink_the_tile_then_fall_back(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from sparsefit.kernels import gpu

    monkeypatch.setattr(gpu, "_fused_rows_limit", {})
    monkeypatch.setattr(gpu.config, "force", None)
    tried = []

    def launch_fits_two_rows(p):
        tried.append(p["BB"])
        if p["BB"] > 2:
            raise OutOfResources(p["BB"] * 1000, 1000, "shared memory")

    assert gpu._run_fused(launch_fits_two_rows, 1000, 4096, torch.float32)
    assert tried == [16, 8, 4, 2]
    assert gpu.plan(1000, 4096)["BB"] == 2  # remembered

    def launch_never_fits(p):
        raise OutOfResources(1, 0, "registers")

    assert not gpu._run_fused(launch_never_fits, 30000, 4, torch.float32)
    assert gpu.plan(30000, 4)["mode"] == "layered"

    def launch_bug(p):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="real bug"):
        gpu._run_fused(launch_bug, 64, 4, torch.float32)


def test_plan_and_availability_without_gpu():
    from sparsefit.kernels import gpu

    assert gpu.plan(4096, 4096) == {"mode": "fused", "NP": 4096, "BB": 4, "num_warps": 16}
    assert gpu.plan(34, 37)["NP"] == 64 and gpu.plan(34, 37)["BB"] == 64
    assert gpu.plan(6, 1)["BB"] == 1
    assert gpu.plan(65536, 8)["mode"] == "layered"
    if not torch.cuda.is_available():
        assert not gpu.is_available()


def test_importing_the_launcher_does_not_import_triton():
    code = "import sys, sparsefit.kernels.gpu; assert 'triton' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------------------------
# Real GPU (skipped without CUDA)
# ----------------------------------------------------------------------------------------------
GPU_SHAPES = [(30, 17, 34, 5, 37), (63, 60, 126, 3, 9), (1000, 700, 2048, 22, 257), (4096, 4096, 4096, 24, 3)]
GPU_IDS = [f"in{k}-out{m}-n{n}-D{d}-B{b}" for k, m, n, d, b in GPU_SHAPES]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fused", "layered"], indirect=True)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("k,m,n,depth,batch", GPU_SHAPES, ids=GPU_IDS)
def test_gpu_matches_float64_reference(mode, dtype, tol, k, m, n, depth, batch):
    perms, blocks, x, gy = _case(k, m, n, depth, batch, dtype, seed=7, device="cuda")
    xq, gyq = x.to(dtype), gy.to(dtype)
    y_ref, gx_ref, gb_ref = _reference(xq.double(), blocks.float().double(), perms, m, gyq.double())
    y, gx, gb = _fused(xq, blocks.float(), perms, m, gyq)
    assert y.dtype == dtype and torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert rel_err(y, y_ref) < tol
    assert rel_err(gx, gx_ref) < tol
    assert rel_err(gb, gb_ref) < 2 * tol


@pytest.mark.gpu
def test_gpu_every_output_written_under_nan_poison():
    from sparsefit.kernels import gpu

    perms, blocks, x, _ = _case(100, 77, 202, 6, 129, torch.float32, device="cuda")
    for force in ("fused", "layered"):
        gpu.config.force = force
        try:
            y, saved = gpu.forward(x.float(), blocks.float(), perms.int(), 77, True)
        finally:
            gpu.config.force = None
        assert torch.isfinite(y).all() and torch.isfinite(saved).all()


@pytest.mark.gpu
@pytest.mark.parametrize("n", [16384, 32768, 65536])
def test_gpu_wide_operators(n):
    perms, blocks, x, gy = _case(n // 2, n // 2, n, 4, 3, torch.float32, device="cuda")
    y_ref, gx_ref, gb_ref = _reference(x, blocks, perms, n // 2, gy)
    y, gx, gb = _fused(x.float(), blocks.float(), perms, n // 2, gy.float())
    assert rel_err(y, y_ref) < 1e-5 and rel_err(gx, gx_ref) < 1e-5 and rel_err(gb, gb_ref) < 1e-5


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    from sparsefit.kernels import gpu

    perms, blocks, x, gy = _case(100, 60, 200, 8, 33, torch.float32, device="cuda")
    _, gx_ref, gb_ref = _reference(x, blocks, perms, 60, gy)
    xr, b = x.float().requires_grad_(), blocks.float().requires_grad_()
    f = torch.compile(lambda x, b: (gpu.gtilde_fused(x, b, perms, 60) * gy.float()).sum(), fullgraph=True)
    f(xr, b).backward()
    assert rel_err(xr.grad, gx_ref) < 1e-5 and rel_err(b.grad, gb_ref) < 1e-5


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    from sparsefit.kernels import gpu

    perms, blocks, x, _ = _case(100, 60, 200, 8, 33, torch.float32, device="cuda")
    x, blocks, p32 = x.float(), blocks.float(), perms.int()
    static_x = x.clone()
    with torch.no_grad():
        gpu.gtilde_fused(static_x, blocks, p32, 60)  # compile before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = gpu.gtilde_fused(static_x, blocks, p32, 60)
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
    assert rel_err(static_y, gtilde_reference(x2.double(), blocks.double(), perms, 60)) < 1e-5


@pytest.mark.gpu
def test_gpu_module_auto_backend_uses_the_kernel(monkeypatch):
    monkeypatch.setenv("SPARSEFIT_FUSED", "1")  # auto picks the fused kernel only once opted in
    g = GTilde(300, 200, 10, seed=0).cuda()
    x = torch.randn(17, 300, device="cuda")
    y = g(x)  # auto → fused kernel
    assert rel_err(y, g(x, backend="reference")) < 1e-5
    y.sum().backward()
    assert g.blocks.grad is not None and torch.isfinite(g.blocks.grad).all()
