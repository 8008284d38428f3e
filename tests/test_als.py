"""Least-squares sweeps (sparsefit/als.py): each layer's solve against a brute-force least squares,
the sweep's bookkeeping against the plain PyTorch reference, and the wiring into fit and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sparsefit
from sparsefit import FitConfig, GTilde, SparsefitError, fit
from sparsefit.als import (
    AUTO_SWEEPS,
    _layers_above,
    _solve_layer,
    _solve_layer_exact,
    affordable_sweeps,
    als_sweeps,
)
from sparsefit.cli import app
from sparsefit.config import CONFIG_VERSION
from sparsefit.kernels.reference import gtilde_reference

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_operator(in_f: int, out_f: int, depth: int, width: int, seed: int) -> GTilde:
    g = GTilde(in_f, out_f, depth, width, seed=seed, dtype=F64)
    with torch.no_grad():
        g.blocks.add_(0.5 * torch.randn(g.blocks.shape, dtype=F64, generator=_gen(seed + 100)))
    return g


def _exact_loss(blocks: torch.Tensor, perms: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||G~ − A||²_F / out`` by the plain reference (G~ applied to the identity)."""
    out, k = a.shape
    g = gtilde_reference(torch.eye(k, dtype=F64), blocks, perms, out).t()
    return ((g - a) ** 2).sum() / out


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("out_f,in_f,width", [(5, 7, 6), (6, 6, 8), (9, 4, 6), (3, 11, 8), (12, 10, 10)], ids=str)
def test_layer_solve_is_the_least_squares_blocks(out_f, in_f, width, solver):
    """Both layer solvers against ``lstsq`` on the explicit design matrix of ``vec(Q B Z)`` in
    ``B``'s 2n entries (full column rank here, so the damping is negligible); conjugate gradients
    given 2n steps, enough to be exact."""
    g = _gen(out_f * 100 + in_f)
    h = width // 2
    q = torch.randn(out_f, width, dtype=F64, generator=g)
    z = torch.randn(width, in_f, dtype=F64, generator=g)
    a = torch.randn(out_f, in_f, dtype=F64, generator=g)
    cols = []
    for b in range(h):
        for r in range(2):
            for c in range(2):
                cols.append(torch.outer(q[:, 2 * b + r], z[2 * b + c]).reshape(-1))
    design = torch.stack(cols, 1)
    assert torch.linalg.matrix_rank(design) == 2 * width
    want = torch.linalg.lstsq(design, a.reshape(-1, 1)).solution.reshape(h, 2, 2)
    b_old = torch.randn(h, 2, 2, dtype=F64, generator=g)
    solve = _solve_layer_exact if solver == "cholesky" else _solve_layer
    got = solve(q, q.t() @ q, z @ z.t(), a @ z.t(), b_old, 2 * width)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def _layer_loss(q, z, a, b):
    h = b.shape[0]
    bd = torch.block_diag(*b.unbind(0))
    assert bd.shape == (2 * h, 2 * h)
    return float(((q @ bd @ z - a) ** 2).sum())


@pytest.mark.parametrize(
    "out_f,in_f,width", [(17, 17, 34), (1, 9, 18), (23, 7, 46), (40, 30, 60), (12, 50, 100)], ids=str
)
def test_truncated_cg_lowers_the_loss_step_by_step_and_reaches_the_reference(out_f, in_f, width):
    """Rank-deficient systems (``out`` or ``in`` below the width, as for every layer of a padded
    operator): each extra conjugate-gradient step lowers the layer's loss, never above where it
    started, and enough of them give the Cholesky reference's loss."""
    g = _gen(out_f * 1000 + in_f)
    h = width // 2
    q = torch.randn(out_f, width, dtype=F64, generator=g)
    z = torch.randn(width, in_f, dtype=F64, generator=g)
    z[-3:] = 0  # padded rows: the Hessian has all-zero 4 x 4 blocks
    a = torch.randn(out_f, in_f, dtype=F64, generator=g)
    b_old = torch.randn(h, 2, 2, dtype=F64, generator=g)
    m, c, u = q.t() @ q, z @ z.t(), a @ z.t()
    losses = [_layer_loss(q, z, a, _solve_layer(q, m, c, u, b_old, it)) for it in (0, 1, 2, 4, 8, 16)]
    assert losses[0] == pytest.approx(_layer_loss(q, z, a, b_old), rel=1e-12)
    assert all(b <= a_ * (1 + 1e-12) for a_, b in zip(losses[:-1], losses[1:], strict=True))
    assert losses[-1] < 0.5 * losses[0]
    best = _layer_loss(q, z, a, _solve_layer_exact(q, m, c, u, b_old))
    full = _layer_loss(q, z, a, _solve_layer(q, m, c, u, b_old, 4 * width))
    assert full == pytest.approx(best, rel=1e-8, abs=1e-10 * losses[0])
    assert best <= losses[-1] * (1 + 1e-12)


@pytest.mark.parametrize("segment", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("out_f,depth,width", [(5, 1, 6), (6, 2, 8), (9, 7, 10), (3, 10, 14)], ids=str)
def test_layers_above_are_the_products_of_the_layers_above(out_f, depth, width, segment):
    """The checkpointed carry against dense products: ``Q_j = S·L_{N−1}···L_{j+1}`` with
    ``L_i = blockdiag(B_i)·P_i`` and ``M_j = Q_jᵀQ_j``, for every layer and segment length."""
    op = _random_operator(width - 1, out_f, depth, width, seed=depth * 10 + width)
    blocks, perms = op.blocks.detach(), op.perms
    eye = torch.eye(width, dtype=F64)
    q = eye[:out_f]
    want = [None] * depth
    for j in range(depth - 1, -1, -1):
        want[j] = q
        q = q @ torch.block_diag(*blocks[j].unbind(0)) @ eye[perms[j]]
    got = list(_layers_above(blocks, perms, out_f, segment))
    assert len(got) == depth
    for (q, m), w in zip(got, want, strict=True):
        assert torch.allclose(q, w, rtol=1e-12, atol=1e-12)
        assert torch.allclose(m, w.t() @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("exact", [True, False], ids=["cholesky", "cg"])
@pytest.mark.parametrize(
    "out_f,in_f,depth,width", [(6, 6, 5, 12), (5, 9, 6, 18), (10, 3, 4, 20), (7, 7, 3, 14)], ids=str
)
def test_sweep_losses_match_the_reference_and_never_rise(out_f, in_f, depth, width, exact):
    op = _random_operator(in_f, out_f, depth, width, seed=depth + width)
    a = torch.randn(out_f, in_f, dtype=F64, generator=_gen(7))
    blocks = op.blocks.detach().clone()
    start = float(_exact_loss(blocks, op.perms, a))
    losses = als_sweeps(blocks, op.perms, a, 6, exact=exact)
    assert losses[0] == pytest.approx(start, rel=1e-12)
    assert losses[-1] == pytest.approx(float(_exact_loss(blocks, op.perms, a)), rel=1e-10)
    assert all(b <= a_ * (1 + 1e-12) for a_, b in zip(losses[:-1], losses[1:], strict=True))
    assert losses[-1] < 0.9 * losses[0]
    if exact:
        # the last layer was solved last, exactly, with every other layer fixed: the gradient in
        # it vanishes (this checks the bookkeeping of Q, ZZᵀ and AZᵀ through the whole sweep)
        leaf = blocks.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_exact_loss(leaf, op.perms, a), leaf)
        assert grad[-1].abs().max() < 1e-7 * max(1.0, grad.abs().max().item())
    else:
        # ten CG steps are not exact at these widths: the sweeps end within 2 % of exact ones
        exact_blocks = op.blocks.detach().clone()
        assert losses[-1] <= 1.02 * als_sweeps(exact_blocks, op.perms, a, 6, exact=True)[-1]


def test_sweeps_stop_when_asked_and_report_each_sweep():
    op = _random_operator(8, 8, 4, 16, seed=3)
    a = torch.randn(8, 8, dtype=F64, generator=_gen(1))
    seen = []

    class Log:
        def on_sweep(self, info):
            seen.append((info.sweep, info.total, info.mse))

    losses = als_sweeps(op.blocks.detach().clone(), op.perms, a, 5, on_sweep=Log().on_sweep, should_stop=lambda: True)
    assert len(losses) == 2 and [s[:2] for s in seen] == [(0, 5), (1, 5)]
    assert [s[2] for s in seen] == losses
    with pytest.raises(TypeError):
        als_sweeps(op.blocks.detach().float(), op.perms, a, 1)


def test_fit_with_sweeps_starts_from_the_adam_result_and_lowers_the_error():
    a = sparsefit.synth("sparse", size=24, k=3, seed=1)[:, :17]  # rectangular, width 48
    cfg = FitConfig(depth=10, steps=300, batch=32, eval_every=50, backend="torch", seed=2, sweeps=0)
    plain = fit(a, cfg)
    seen = []

    class Log:
        def on_sweep(self, info):
            seen.append(info)

    swept = fit(a, cfg.replace(sweeps=4), [Log()])
    before = (seen[0].mse * a.shape[0] / float(np.sum(a.astype(np.float64) ** 2))) ** 0.5
    assert before == pytest.approx(plain.metrics.relative_error, rel=1e-4)
    assert swept.metrics.relative_error < 0.95 * plain.metrics.relative_error
    assert swept.operator.blocks.dtype == torch.float32
    # same command, same bytes
    again = fit(a, cfg.replace(sweeps=4))
    assert torch.equal(again.operator.blocks, swept.operator.blocks)


def test_sweeps_config_validation_and_version():
    assert FitConfig(sweeps=3).to_dict()["sweeps"] == 3 and CONFIG_VERSION == 5
    assert FitConfig().sweeps is None and FitConfig.from_dict(FitConfig().to_dict()).sweeps is None
    old = FitConfig().to_dict()
    old.pop("sweeps")
    old["version"] = 2  # written before sweeps existed: none ran, none run again
    assert FitConfig.from_dict(old).sweeps == 0
    for bad in (-1, True, 1.5, "auto"):
        with pytest.raises(SparsefitError, match="sweeps"):
            FitConfig(sweeps=bad)


def test_default_sweeps_cost_no_more_than_the_steps():
    assert affordable_sweeps(2048, 12000, 1024) == AUTO_SWEEPS == 15  # the note's protocol, 1024 x 1024
    assert affordable_sweeps(2048, 3000, 256) == 3  # the README's first command
    assert affordable_sweeps(2048, 1000, 256) == 1
    assert affordable_sweeps(2048, 500, 256) == 0
    assert affordable_sweeps(4096, 12000, 1024) == AUTO_SWEEPS
    assert affordable_sweeps(4096, 3000, 256) == 1
    assert affordable_sweeps(4098, 10**9, 1024) == 0  # above the solvable width
    assert affordable_sweeps(64, 12000, 1024) == AUTO_SWEEPS
    assert affordable_sweeps(64, 0, 1024) == 0
    cfg = FitConfig(steps=400, batch=32)
    assert cfg.resolved_sweeps(64) == affordable_sweeps(64, 400, 32) == 2
    assert cfg.resolved_sweeps(64, custom_probes=True) == 0
    assert cfg.replace(sweeps=0).resolved_sweeps(64) == 0 and cfg.replace(sweeps=7).resolved_sweeps(10**6) == 7


def test_default_fit_sweeps_and_records_how_many():
    a = sparsefit.synth("band", size=20, k=3, seed=3)[:, :13]  # width 40
    cfg = FitConfig(depth=8, steps=200, batch=40, eval_every=50, seed=1)
    seen = []

    class Log:
        def on_sweep(self, info):
            seen.append(info)

    r = fit(a, cfg, [Log()])
    n = affordable_sweeps(40, 200, 40)
    assert n == 2 and r.config.sweeps == n and seen and seen[-1].total == n
    assert r.metrics.sweeps_run == seen[-1].sweep >= 1
    plain = fit(a, cfg.replace(sweeps=0))
    assert r.metrics.relative_error < plain.metrics.relative_error
    # a target too wide to sweep, and custom probes, fit without sweeps by default (no error)
    wide = fit(np.ones((2049, 1), dtype=np.float32), FitConfig(depth=2, steps=2, batch=2))
    assert wide.config.sweeps == 0
    probed = fit(
        np.eye(6, dtype=np.float32), FitConfig(steps=5, batch=4), probes=lambda b, g: torch.randn(b, 6, generator=g)
    )
    assert probed.config.sweeps == 0


def test_compress_sweeps_only_when_asked():
    from sparsefit.compress import CompressConfig
    from sparsefit.compress.layer import compress_matrix

    seen = []

    class Log:
        def on_sweep(self, info):
            seen.append(info)

    cfg = CompressConfig(depth=4, max_params_ratio=1.0, fit=FitConfig(steps=50, batch=16))
    compress_matrix(torch.randn(12, 12), cfg, name="w", callbacks=[Log()])
    assert not seen
    compress_matrix(
        torch.randn(12, 12),
        CompressConfig(depth=4, max_params_ratio=1.0, fit=FitConfig(steps=50, batch=16, sweeps=2)),
        name="w",
        callbacks=[Log()],
    )
    assert seen


def test_sweeps_refuse_wide_targets_and_custom_probes_before_the_steps():
    wide = np.ones((2049, 1), dtype=np.float32)  # width 4098 > 4096
    with pytest.raises(SparsefitError, match="--sweeps 0"):
        fit(wide, FitConfig(steps=10**9, batch=1, sweeps=1))  # would run for days if it got past the check
    a = np.eye(6, dtype=np.float32)
    with pytest.raises(SparsefitError, match="custom probes"):
        fit(a, FitConfig(steps=10, batch=4, sweeps=1), probes=lambda b, g: torch.randn(b, 6, generator=g))


def test_cli_fit_with_sweeps(tmp_path):
    src = tmp_path / "p.npy"
    np.save(src, sparsefit.synth("perm", size=16, seed=0))
    runner = CliRunner()
    out = tmp_path / "p.safetensors"
    r = runner.invoke(
        app,
        [
            "fit",
            str(src),
            "--depth",
            "8",
            "--steps",
            "100",
            "--batch",
            "16",
            "--sweeps",
            "2",
            "-o",
            str(out),
            "--json",
            "-",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["config"]["sweeps"] == 2 and out.exists()
    assert 1 <= report["sweeps_run"] <= 2, report
    table = runner.invoke(app, ["fit", str(src), "--depth", "8", "--steps", "100", "--batch", "96", "-o", str(out)])
    assert table.exit_code == 0 and "least-squares sweeps" in table.output and " of 3" in table.output, table.output
    bad = runner.invoke(app, ["fit", str(src), "--sweeps", "-2", "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "sweeps must be" in bad.output
    assert not (tmp_path / "x.safetensors").exists()
    rounds = ["fit", str(src), "--depth", "8", "--steps", "100", "--batch", "16", "--sweeps", "4", "--rounds", "2"]
    two = runner.invoke(app, [*rounds, "--round-steps", "20", "-o", str(out)])
    assert two.exit_code == 0 and "in 2 rounds" in two.output, two.output
    bad = runner.invoke(app, [*rounds, "--round-steps", "0", "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "round-steps must be" in bad.output
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("n", [2, 6, 34, 202, 1030])
def test_hessian_kernel_matches_the_reference(n):
    """The fused numba Hessian product against the plain PyTorch one (float64, widths not powers
    of two), and both against the explicit Hessian ``H[(p,q),(p',q')] = M[p,p']·C[q,q']``."""
    from sparsefit.kernels.sweep import hessian_product, hessian_product_reference

    g = _gen(n)
    h = n // 2
    qm = torch.randn(n + 3, n, dtype=F64, generator=g)
    zc = torch.randn(n, max(1, n // 3), dtype=F64, generator=g)
    m, c = qm.t() @ qm, zc @ zc.t()
    x = torch.randn(h, 2, 2, dtype=F64, generator=g)
    want = hessian_product_reference(m, c, x)
    assert torch.allclose(hessian_product(m, c, x), want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    if n <= 34:
        idx = [(2 * b + r, 2 * b + col) for b in range(h) for r in range(2) for col in range(2)]
        dense = torch.tensor([[m[p, pp] * c[q, qq] for pp, qq in idx] for p, q in idx], dtype=F64)
        assert torch.allclose(want.reshape(-1), dense @ x.reshape(-1), rtol=1e-12, atol=1e-10)
    # float32 and non-contiguous inputs take the reference
    mt = m.t().contiguous().t()
    assert not mt.is_contiguous() or n == 2
    assert torch.allclose(hessian_product(mt, c, x), want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    got32 = hessian_product(m.float(), c.float(), x.float())
    assert got32.dtype == torch.float32
    assert torch.allclose(got32.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("n,rows", [(2, 1), (6, 17), (34, 5), (202, 301), (1030, 17)], ids=str)
def test_mix_and_congruence_kernels_match_the_reference(n, rows):
    """The fused one-sided (``(U·blockdiag(b)ᵀ)[:, perm]``) and two-sided
    (``(blockdiag(b)·C·blockdiag(b)ᵀ)[perm][:, perm]``) kernels against their PyTorch references
    in float64, and the references against dense products; non-symmetric ``C`` on purpose."""
    from sparsefit.kernels import fused_cpu_available
    from sparsefit.kernels.sweep import congruence, congruence_reference, mix_gather, mix_gather_reference

    g = _gen(n + rows)
    b = torch.randn(n // 2, 2, 2, dtype=F64, generator=g)
    perm = torch.randperm(n, generator=g)
    u = torch.randn(rows, n, dtype=F64, generator=g)
    c = torch.randn(n, n, dtype=F64, generator=g)
    want_u, want_c = mix_gather_reference(u, b, perm), congruence_reference(c, b, perm)
    assert torch.allclose(mix_gather(u, b, perm), want_u, rtol=1e-13, atol=1e-13)
    assert torch.allclose(congruence(c, b, perm), want_c, rtol=1e-12, atol=1e-12)
    if n <= 202:
        bd = torch.block_diag(*b.unbind(0))
        assert torch.allclose(want_u, (u @ bd.t())[:, perm], rtol=1e-13, atol=1e-13)
        assert torch.allclose(want_c, (bd @ c @ bd.t())[perm][:, perm], rtol=1e-12, atol=1e-12)
    # float32 takes the reference; the fused path gives the same bytes at any thread count
    assert torch.allclose(mix_gather(u.float(), b.float(), perm).double(), want_u, rtol=1e-4, atol=1e-4)
    if fused_cpu_available():
        import numba

        threads = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            one = congruence(c, b, perm)
        finally:
            numba.set_num_threads(threads)
        assert torch.equal(one, congruence(c, b, perm))


def test_sweeps_whose_result_is_dropped_count_as_none(monkeypatch):
    """When the sweeps' blocks do not lower the loss at the fit's precision the fit keeps the
    blocks it had, and reports no sweeps run (the CLI says why)."""
    import sparsefit.fitting as fitting
    from sparsefit.als import SweepInfo

    def worse(blocks, perms, a, sweeps, *, on_sweep=None, should_stop=None, x=None):
        for i in range(sweeps + 1):
            on_sweep(SweepInfo(i, sweeps, 1.0, 0.0))
        blocks.mul_(2.0)  # any loss this makes is higher than the Adam result's

    a = sparsefit.synth("sparse", size=12, k=2, seed=0)
    cfg = FitConfig(depth=6, steps=60, batch=16, eval_every=20, backend="torch", seed=0)
    plain = fit(a, cfg.replace(sweeps=0))
    monkeypatch.setattr(fitting, "als_sweeps", worse)
    r = fit(a, cfg.replace(sweeps=3))
    assert r.metrics.sweeps_run == 0
    assert torch.equal(r.operator.blocks, plain.operator.blocks)
    from sparsefit.cli.cmd_fit import _sweeps

    assert _sweeps(r) == "0 of 3 (none kept: no gain at the fit's precision), in 2 rounds"


def _data_loss(blocks, perms, a, x):
    out, k = a.shape
    got = gtilde_reference(x, blocks, perms, out)  # (rows, out) = (G~ xᵀ)ᵀ
    return ((got - x @ a.t()) ** 2).sum() / out


@pytest.mark.parametrize("exact", [True, False], ids=["cholesky", "cg"])
@pytest.mark.parametrize(
    "out_f,in_f,rows,depth,width", [(6, 6, 17, 5, 12), (5, 9, 4, 6, 18), (10, 3, 1, 4, 20)], ids=str
)
def test_data_loss_sweeps_lower_the_data_loss(out_f, in_f, rows, depth, width, exact):
    """With input rows ``x`` the sweeps minimise ``||(G~ − A)xᵀ||²_F``: reported losses are that
    loss, never rise, and (exact solves) leave the last layer at a stationary point of it; with
    ``x = √k·I`` they are ``k`` times the plain sweeps' losses."""
    op = _random_operator(in_f, out_f, depth, width, seed=depth + width + rows)
    a = torch.randn(out_f, in_f, dtype=F64, generator=_gen(3))
    mix = torch.randn(in_f, in_f, dtype=F64, generator=_gen(4))
    x = torch.randn(rows, in_f, dtype=F64, generator=_gen(5)) @ mix  # correlated inputs
    blocks = op.blocks.detach().clone()
    losses = als_sweeps(blocks, op.perms, a, 4, exact=exact, x=x)
    assert losses[0] == pytest.approx(float(_data_loss(op.blocks.detach(), op.perms, a, x)), rel=1e-12)
    floor = 1e-20 * losses[0]  # one input row can be fitted exactly: then rounding is all that moves
    assert losses[-1] == pytest.approx(float(_data_loss(blocks, op.perms, a, x)), rel=1e-10, abs=floor)
    assert all(b <= a_ * (1 + 1e-12) + floor for a_, b in zip(losses[:-1], losses[1:], strict=True))
    assert losses[-1] < 0.9 * losses[0]
    if exact:
        leaf = blocks.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_data_loss(leaf, op.perms, a, x), leaf)
        assert grad[-1].abs().max() < 1e-7 * max(1.0, grad.abs().max().item())
    plain = als_sweeps(op.blocks.detach().clone(), op.perms, a, 2, exact=exact)
    scaled = als_sweeps(
        op.blocks.detach().clone(), op.perms, a, 2, exact=exact, x=math.sqrt(in_f) * torch.eye(in_f, dtype=F64)
    )
    assert scaled == pytest.approx([in_f * v for v in plain], rel=1e-8)
    with pytest.raises(ValueError, match="rows"):
        als_sweeps(blocks, op.perms, a, 1, x=x[:, :-1] if in_f > 1 else x.t())


def test_fit_sweeps_on_the_probes_data_loss():
    """Probes with ``sweep_rows`` (calibration inputs) make the sweeps lower the data loss over
    those rows; the plain sweeps, blind to the inputs, do worse on it."""
    from sparsefit.calibration import ActivationProbes, data_relative_error

    g = _gen(11)
    a = torch.randn(20, 24, generator=g)
    basis = torch.randn(24, 6, generator=g)
    rows = torch.randn(400, 6, generator=g) @ basis.t() + 0.05 * torch.randn(400, 24, generator=g)  # low-dim inputs
    probes = ActivationProbes(rows, seed=0)
    cfg = FitConfig(depth=6, steps=150, batch=32, eval_every=50, backend="torch", seed=0)
    none = fit(a, cfg.replace(sweeps=0), probes=probes)
    data = fit(a, cfg.replace(sweeps=4), probes=probes)
    assert data.metrics.sweeps_run >= 1
    err = {name: data_relative_error(r.operator, a, probes.train) for name, r in (("none", none), ("data", data))}
    assert err["data"] < 0.9 * err["none"], err
    # the same number of plain sweeps from the same start, blind to the inputs, do worse on them
    blind = none.operator.blocks.detach().double().clone()
    als_sweeps(blind, none.operator.perms, a.double(), data.metrics.sweeps_run)
    plain = none.operator
    with torch.no_grad():
        plain.blocks.copy_(blind)
    assert data_relative_error(plain, a, probes.train) > err["data"]


def test_sweep_rounds_split_the_sweeps_evenly():
    assert FitConfig(rounds=1).sweep_rounds(15) == [15]
    assert FitConfig(rounds=4).sweep_rounds(15) == [4, 4, 4, 3]
    assert FitConfig(rounds=4).sweep_rounds(3) == [1, 1, 1]  # at most one round per sweep
    assert FitConfig().sweep_rounds(15) == [2] * 7 + [1]  # the default: a round per two sweeps
    assert FitConfig().sweep_rounds(3) == [2, 1] and FitConfig().sweep_rounds(1) == [1]


def test_rounds_config_validation_and_version():
    assert FitConfig().rounds is None and FitConfig().round_steps == 200
    cfg = FitConfig(sweeps=6, rounds=3, round_steps=20)
    back = FitConfig.from_dict(cfg.to_dict())
    assert (back.sweeps, back.rounds, back.round_steps) == (6, 3, 20)
    old = FitConfig(sweeps=6).to_dict()
    del old["rounds"], old["round_steps"]
    old["version"] = 4  # written before rounds existed: the sweeps ran in one round
    assert FitConfig.from_dict(old).rounds == 1
    for name in ("rounds", "round_steps"):
        for bad in (0, -2, True, 1.5):
            with pytest.raises(SparsefitError, match=name.replace("_", "-")):
                FitConfig(**{name: bad})


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fit_in_rounds_reports_each_sweep_once_keeps_the_best_and_repeats_bytes(backend):
    a = sparsefit.synth("sparse", size=24, k=3, seed=1)[:, :17]  # rectangular, width 48
    cfg = FitConfig(depth=10, steps=300, batch=32, eval_every=50, backend=backend, seed=2, sweeps=6, rounds=3)
    cfg = cfg.replace(round_steps=40)
    seen = []

    class Log:
        def on_sweep(self, info):
            seen.append(info)

    r = fit(a, cfg, [Log()])
    assert [s.sweep for s in seen] == list(range(len(seen)))  # counted across rounds, no repeats
    assert all(s.total == 6 and s.rounds == 3 for s in seen)
    assert [s.round for s in seen] == sorted(s.round for s in seen) and seen[-1].round == 3
    norm2 = float(np.sum(a.astype(np.float64) ** 2))
    start = (seen[0].mse * a.shape[0] / norm2) ** 0.5
    assert r.metrics.relative_error < start
    assert 1 <= r.metrics.sweeps_run <= 6
    one_round = fit(a, cfg.replace(rounds=1))
    assert not torch.equal(one_round.operator.blocks, r.operator.blocks)  # the Adam steps ran
    again = fit(a, cfg)
    assert torch.equal(again.operator.blocks, r.operator.blocks)


def test_steps_between_rounds_that_raise_the_loss_are_undone(monkeypatch):
    """Adam steps between rounds that make things worse are dropped: the next round starts from
    the best blocks so far, and what is kept is never worse than the best round's end."""
    import sparsefit.fitting as fitting

    calls = []

    def scramble(op, config, x, t, phase, should_stop):
        calls.append(phase)
        with torch.no_grad():
            op.blocks.mul_(3.0)

    a = sparsefit.synth("sparse", size=12, k=2, seed=0)
    cfg = FitConfig(depth=6, steps=80, batch=16, eval_every=20, backend="torch", seed=0, sweeps=4, rounds=2)
    ends = []

    class Log:
        def on_sweep(self, info):
            ends.append(info)

    monkeypatch.setattr(fitting, "_steps_between", scramble)
    r = fit(a, cfg, [Log()])
    assert len(calls) == 1 and calls[0].reg == 0.0 and calls[0].lr == cfg.resolved_phases()[-1].lr
    first_round_end = [s.mse for s in ends if s.round == 1][-1]
    assert ends[-1].round == 2 and ends[-1].mse <= first_round_end  # round 2 started from round 1's end
    kept = float(((r.operator.to_dense().double() - torch.as_tensor(a).double()) ** 2).sum()) / a.shape[0]
    assert kept == pytest.approx(min(s.mse for s in ends), rel=1e-4)


def test_steps_between_rounds_lower_the_data_loss():
    """The Adam steps between rounds minimise the sweeps' loss: with data rows, the data loss."""
    from sparsefit.config import Phase
    from sparsefit.fitting import _probe_loss, _steps_between

    op = GTilde(9, 7, 6, 18, seed=5)
    a = torch.randn(7, 9, generator=_gen(3))
    rows = torch.randn(23, 9, generator=_gen(4)) @ torch.diag(torch.linspace(0.1, 2.0, 9))
    x, t = rows, rows @ a.t()
    before = _probe_loss(op, x, t)
    _steps_between(op, FitConfig(round_steps=60, backend="torch"), x, t, Phase(1.0, 1e-2, 0.0), None)
    assert _probe_loss(op, x, t) < 0.8 * before
