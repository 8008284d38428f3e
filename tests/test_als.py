"""Least-squares sweeps (sparsefit/als.py): each layer's solve against a brute-force least squares,
the sweep's bookkeeping against the plain PyTorch reference, and the wiring into fit and the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sparsefit
from sparsefit import FitConfig, GTilde, SparsefitError, fit
from sparsefit.als import _solve_layer, als_sweeps
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


@pytest.mark.parametrize("out_f,in_f,width", [(5, 7, 6), (6, 6, 8), (9, 4, 6), (3, 11, 8), (12, 10, 10)], ids=str)
def test_layer_solve_is_the_least_squares_blocks(out_f, in_f, width):
    """``_solve_layer(Q, ZZᵀ, AZᵀ)`` against ``lstsq`` on the explicit design matrix of
    ``vec(Q B Z)`` in ``B``'s 2n entries (full column rank here, so the damping is negligible)."""
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
    got = _solve_layer(q, z @ z.t(), a @ z.t(), b_old)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "out_f,in_f,depth,width", [(6, 6, 5, 12), (5, 9, 6, 18), (10, 3, 4, 20), (7, 7, 3, 14)], ids=str
)
def test_sweep_losses_match_the_reference_and_never_rise(out_f, in_f, depth, width):
    op = _random_operator(in_f, out_f, depth, width, seed=depth + width)
    a = torch.randn(out_f, in_f, dtype=F64, generator=_gen(7))
    blocks = op.blocks.detach().clone()
    start = float(_exact_loss(blocks, op.perms, a))
    losses = als_sweeps(blocks, op.perms, a, 6)
    assert losses[0] == pytest.approx(start, rel=1e-12)
    assert losses[-1] == pytest.approx(float(_exact_loss(blocks, op.perms, a)), rel=1e-10)
    assert all(b <= a_ * (1 + 1e-12) for a_, b in zip(losses[:-1], losses[1:], strict=True))
    assert losses[-1] < 0.9 * losses[0]
    # the last layer was solved last, with every other layer fixed: the gradient in it vanishes
    # (this checks the bookkeeping of Q, ZZᵀ and AZᵀ through the whole sweep)
    leaf = blocks.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_exact_loss(leaf, op.perms, a), leaf)
    assert grad[-1].abs().max() < 1e-7 * max(1.0, grad.abs().max().item())


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
    cfg = FitConfig(depth=10, steps=300, batch=32, eval_every=50, backend="torch", seed=2)
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
    assert FitConfig(sweeps=3).to_dict()["sweeps"] == 3 and CONFIG_VERSION == 3
    old = FitConfig().to_dict()
    old.pop("sweeps")
    old["version"] = 2
    assert FitConfig.from_dict(old).sweeps == 0
    for bad in (-1, True, 1.5):
        with pytest.raises(SparsefitError, match="sweeps"):
            FitConfig(sweeps=bad)


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
    bad = runner.invoke(app, ["fit", str(src), "--sweeps", "-2", "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "sweeps must be" in bad.output
    assert not (tmp_path / "x.safetensors").exists()
