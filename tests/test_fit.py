import math

import numpy as np
import pytest
import torch

import sparsefit
from sparsefit import FitConfig, Phase, SparsefitError, fit
from sparsefit.metrics import relative_error, svd_baseline
from sparsefit.targets import as_target

SMALL = FitConfig(depth=8, steps=300, batch=64, eval_every=50)


def test_fit_permutation_reaches_small_error():
    a = sparsefit.synth("perm", size=16, seed=0)
    r = fit(a, FitConfig(depth=16, steps=1500, batch=128, eval_every=100))
    assert r.metrics.relative_error < 0.05
    assert r.metrics.relative_error_method == "exact"
    assert r.metrics.params == 2 * 32 * 16 and r.metrics.dense_params == 256
    assert r.metrics.steps_run == 1500 and not r.interrupted
    assert r.history[-1][0] == 1500


def test_error_is_measured_not_assumed():
    a = sparsefit.synth("gaussian", size=24, seed=1)
    r = fit(a, SMALL)
    dense = r.operator.to_dense(torch.float64)
    expect = float(torch.linalg.norm(dense - torch.from_numpy(a)) / np.linalg.norm(a))
    assert r.metrics.relative_error == pytest.approx(expect, rel=1e-9)


def test_rectangular_and_matrix_free():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 30))
    at = torch.from_numpy(a)
    r1 = fit(a, SMALL)
    r2 = fit(lambda X: at.to(X.dtype) @ X, SMALL, shape=(10, 30))
    assert r1.operator.width == 60 and r2.operator.width == 60
    # same probes and seeds: the matrix-free fit follows the dense one (up to float32 rounding)
    assert torch.allclose(r1.operator.blocks, r2.operator.blocks, atol=1e-3)
    # without the dense matrix the error is estimated, with an interval that holds the exact value
    assert r1.metrics.relative_error_method == "exact" and r2.metrics.relative_error_method == "estimated"
    assert r2.metrics.relative_error_low <= r1.metrics.relative_error <= r2.metrics.relative_error_high


def test_estimated_error_brackets_exact():
    a = sparsefit.synth("lowrank", size=40, k=2, seed=0)
    r = fit(a, SMALL)
    exact = relative_error(r.operator, as_target(a))
    est = relative_error(r.operator, as_target(a), max_dense=10, probes=2048)
    assert exact.method == "exact" and est.method == "estimated"
    assert est.low <= exact.value <= est.high
    assert est.high - est.low < 0.5 * exact.value


def test_svd_baseline_matches_numpy():
    a = np.random.default_rng(3).standard_normal((20, 30))
    b = svd_baseline(as_target(a), params=5 * 50)
    s = np.linalg.svd(a, compute_uv=False)
    assert b.rank == 5
    assert b.relative_error == pytest.approx(np.sqrt((s[5:] ** 2).sum() / (s**2).sum()))
    assert svd_baseline(as_target(a), params=10).relative_error == 1.0
    assert svd_baseline(as_target(a), params=10_000).relative_error == 0.0


def test_svd_baseline_sparse_partial():
    import scipy.sparse as sp

    s = sp.random(300, 300, density=0.01, random_state=0, format="csr")
    t = as_target(s)
    b = svd_baseline(t, params=3 * 600, max_dense=100)
    sv = np.linalg.svd(s.toarray(), compute_uv=False)
    assert b.method == "partial"
    assert b.relative_error == pytest.approx(np.sqrt((sv[3:] ** 2).sum() / (sv**2).sum()), rel=1e-6)


def test_same_seed_same_result_and_seed_matters():
    a = sparsefit.synth("band", size=20, seed=0)
    r1, r2 = fit(a, SMALL), fit(a, SMALL)
    assert torch.equal(r1.operator.blocks, r2.operator.blocks)
    r3 = fit(a, SMALL.replace(seed=1))
    assert not torch.equal(r1.operator.blocks, r3.operator.blocks)


def test_callbacks_receive_progress():
    seen = []

    class CB:
        def on_start(self, info):
            seen.append(("start", info["steps"]))

        def on_step(self, s):
            seen.append(("step", s.step))

        def on_end(self, r):
            seen.append(("end", r.metrics.steps_run))

    fit(sparsefit.synth("perm", size=8), SMALL.replace(steps=60), [CB()])
    assert seen[0] == ("start", 60) and seen[-1] == ("end", 60)
    assert ("step", 25) in seen and ("step", 60) in seen


def test_keyboard_interrupt_keeps_best_result():
    class Interrupt:
        def on_step(self, s):
            if s.step == 200:
                raise KeyboardInterrupt

    a = sparsefit.synth("perm", size=12, seed=0)
    r = fit(a, SMALL.replace(steps=1000), [Interrupt()])
    assert r.interrupted and r.metrics.interrupted
    assert r.metrics.steps_run < 1000
    best = min(v for _, v in r.history)
    assert r.metrics.mse_last == best
    assert math.isfinite(r.metrics.relative_error)


def test_should_stop():
    r = fit(sparsefit.synth("perm", size=8), SMALL.replace(steps=500), should_stop=lambda: True)
    assert r.interrupted and r.metrics.steps_run == 25


def test_phases_and_schedule():
    c = FitConfig(steps=1200)
    starts = [s for s, _ in c.phase_steps()]
    assert starts == [0, 700, 1000]
    assert [p.reg for _, p in c.phase_steps()] == [3.0, 0.3, 0.3]
    assert [p.lr for _, p in c.phase_steps()] == [1e-2, 1e-2, 1e-3]
    held = FitConfig(steps=1200, schedule="hold-anneal")
    assert [s for s, _ in held.phase_steps()] == [0, 700, 750, 800, 850, 900, 950, 1000]
    regs = [p.reg for _, p in held.phase_steps()]
    assert regs[0] == 3.0 and regs[-2:] == [pytest.approx(0.03), 0.03] and regs == sorted(regs, reverse=True)
    assert [p.lr for _, p in held.phase_steps()] == [1e-2] * 7 + [1e-3]
    custom = FitConfig(phases=(Phase(0.5, 1e-2, 0.0), Phase(0.5, 1e-3, 0.0)))
    assert FitConfig.from_dict(custom.to_dict()) == custom


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"depth": 0}, "depth"),
        ({"width": 7}, "even"),
        ({"steps": 0}, "steps"),
        ({"batch": 0}, "batch"),
        ({"lr": -1.0}, "learning rate"),
        ({"schedule": "nope"}, "schedule"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"sampler": "nope"}, "sampler"),
        ({"phases": (Phase(0.5, 1e-2, 1.0),)}, "sum to 1"),
    ],
    ids=lambda v: str(v),
)
def test_config_validation(kw, msg):
    with pytest.raises(SparsefitError, match=msg):
        FitConfig(**kw)


def test_width_too_small_for_target():
    with pytest.raises(SparsefitError, match="smaller than the matrix"):
        fit(np.eye(10), SMALL.replace(width=8))


def test_divergence_is_reported():
    with pytest.raises(SparsefitError, match="diverged"):
        fit(np.full((8, 8), 1e30), SMALL.replace(steps=50, lr=10.0))


def test_float64_fit():
    r = fit(sparsefit.synth("perm", size=8), SMALL.replace(dtype="float64", steps=100))
    assert r.operator.blocks.dtype == torch.float64


def test_torch_backend_used_when_asked():
    a = sparsefit.synth("perm", size=8)
    infos = []

    class CB:
        def on_start(self, info):
            infos.append(info)

    fit(a, SMALL.replace(steps=30, backend="torch"), [CB()])
    assert infos[0]["backend"] == "torch"


# -- pieces of fit(): shape resolution, loss choice, step functions, polish ------------------------
def test_width_and_depth_resolved_in_one_place():
    assert FitConfig().resolve_shape(10, 30) == (60, 2 * math.ceil(math.log2(60)))
    assert FitConfig(width=64, depth=5).resolve_shape(10, 30) == (64, 5)
    r = fit(np.eye(6)[:, :5], FitConfig(steps=5, batch=4))
    assert (r.metrics.width, r.metrics.depth) == FitConfig().resolve_shape(6, 5)


def test_loss_auto_is_exact_when_no_more_columns_than_batch():
    cfg = FitConfig(loss="auto", batch=64)
    assert cfg.resolved_loss(64) == "exact" and cfg.resolved_loss(65) == "probes"
    assert cfg.resolved_loss(8, custom_probes=True) == "probes"
    seen = []
    fit(
        np.eye(8),
        FitConfig(loss="auto", steps=3, batch=8),
        [type("CB", (), {"on_start": lambda s, i: seen.append(i)})()],
    )
    assert seen[0]["loss"] == "exact"
    # custom probes with loss auto: probes, no error
    r = fit(np.eye(8), FitConfig(loss="auto", steps=3, batch=8), probes=lambda b, g: torch.randn(b, 8, generator=g))
    assert r.metrics.steps_run == 3


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_step_loss_and_grad_match_reference(backend):
    from sparsefit.fitting import ExactProbes, make_step
    from sparsefit.kernels.cpu import fit_step_reference
    from sparsefit.operator import GTilde, orthogonality_penalty

    a = sparsefit.synth("band", size=9, k=2, seed=0)
    op = GTilde(9, 9, 5, 22, seed=3, dtype=torch.float64)
    with torch.no_grad():
        op.blocks.add_(
            0.1 * torch.randn(op.blocks.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        )
    x, t = ExactProbes(as_target(a), torch.device("cpu"), torch.float64).next()
    step = make_step(op, FitConfig(backend=backend, dtype="float64"), 9)
    loss, grad = step.loss_and_grad(x, t, 0.7)
    mse_ref, grad_ref = fit_step_reference(x, t, op.blocks.detach(), op.perms, 9)
    b = op.blocks.detach().clone().requires_grad_(True)
    pen = orthogonality_penalty(b)
    (pgrad,) = torch.autograd.grad(pen, b)
    assert float(loss) == pytest.approx(float(mse_ref + 0.7 * pen.detach()), rel=1e-12)
    assert float(torch.linalg.norm(grad - grad_ref - 0.7 * pgrad) / torch.linalg.norm(grad_ref)) < 1e-12


def test_polish_lowers_the_exact_loss_and_same_seed_same_bytes():
    a = sparsefit.synth("sparse", size=12, k=2, seed=2)
    cfg = FitConfig(depth=8, steps=150, loss="exact", phases=(Phase(1.0, 1e-2, 0.0),), seed=4, sweeps=0)
    plain = fit(a, cfg)
    pol = fit(a, cfg.replace(polish=30))
    assert pol.metrics.relative_error < plain.metrics.relative_error
    again = fit(a, cfg.replace(polish=30))
    assert torch.equal(pol.operator.blocks, again.operator.blocks)
    with pytest.raises(SparsefitError, match="polish"):
        FitConfig(polish=-1)


# ----------------------------------------------------------------------------------------------
# Depth doublings (FitConfig.grow)
# ----------------------------------------------------------------------------------------------
def test_grow_stages_and_phases():
    assert FitConfig(steps=12).stage_steps(40) == [(0, 40)]
    assert FitConfig(steps=12, grow=1).stage_steps(40) == [(0, 20), (6, 40)]
    assert FitConfig(steps=10, grow=2).stage_steps(10) == [(0, 3), (3, 5), (7, 10)]
    c = FitConfig(steps=1200, grow=1)
    # the schedule squeezed into the first 600 steps, then 3/4 at lr and 1/4 at lr/10, reg 0.03
    assert [s for s, _ in c.phase_steps()] == [0, 350, 500, 600, 1050]
    assert [p.reg for _, p in c.phase_steps()] == [3.0, 0.3, 0.3, 0.03, 0.03]
    assert [p.lr for _, p in c.phase_steps()] == [1e-2, 1e-2, 1e-3, 1e-2, 1e-3]
    back = FitConfig.from_dict(c.to_dict())  # the file writes the schedule out as phases
    assert back.grow == 1 and back.phase_steps() == c.phase_steps()
    # a file written before grow existed (version 1) reads as grow 0
    old = {k: v for k, v in FitConfig(steps=7).to_dict().items() if k != "grow"} | {"version": 1}
    assert FitConfig.from_dict(old).grow == 0


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"grow": -1}, "doublings"),
        ({"grow": 7}, "doublings"),
        ({"grow": True}, "doublings"),
        ({"grow": 1.5}, "doublings"),
        ({"grow": 2, "steps": 2}, "at least 3 steps"),
        ({"grow": 1, "init": "butterfly", "sampler": "butterfly"}, "butterfly"),
    ],
    ids=lambda v: str(v),
)
def test_grow_validation(kw, msg):
    with pytest.raises(SparsefitError, match=msg):
        FitConfig(**kw)


def test_grow_fit_ends_at_the_asked_depth_same_bytes_and_no_init():
    from sparsefit.operator import GTilde

    a = sparsefit.synth("band", size=16, k=2, seed=1)
    cfg = FitConfig(depth=9, steps=200, batch=32, loss="exact", grow=2, eval_every=20)
    starts = []

    class CB:
        def on_start(self, info):
            starts.append(info)

    r = fit(a, cfg, [CB()])
    assert r.operator.depth == 9 and r.metrics.depth == 9 and r.metrics.steps_run == 200
    assert starts[0]["stages"] == [
        {"first_step": 0, "depth": 3},
        {"first_step": 67, "depth": 5},
        {"first_step": 133, "depth": 9},
    ]
    assert [s for s, _ in r.history] == sorted(s for s, _ in r.history) and r.history[-1][0] == 200
    assert torch.equal(r.operator.blocks, fit(a, cfg).operator.blocks)
    assert not torch.equal(r.operator.blocks, fit(a, cfg.replace(grow=1)).operator.blocks)
    with pytest.raises(SparsefitError, match="give no init"):
        fit(a, cfg, init=GTilde(16, 16, 9, 32))


def test_grow_stopped_in_the_first_stage_keeps_the_best_at_the_asked_depth():
    a = sparsefit.synth("perm", size=12, seed=0)
    cfg = FitConfig(depth=8, steps=400, batch=24, loss="exact", grow=1, eval_every=25)
    r = fit(a, cfg, should_stop=lambda: True)
    assert r.interrupted and r.metrics.steps_run == 25 and r.operator.depth == 8
    # the deeper copy is the shallow best's matrix: its error is the measured one, and finite
    assert math.isfinite(r.metrics.relative_error)
    assert r.metrics.relative_error == pytest.approx(float(relative_error(r.operator, as_target(a)).value), rel=1e-6)


def test_grow_torch_and_fused_steps_agree_in_float64():
    a = sparsefit.synth("sparse", size=10, k=2, seed=3)
    cfg = FitConfig(depth=6, steps=60, batch=20, loss="exact", grow=1, dtype="float64", seed=2, sweeps=0)
    fused = fit(a, cfg.replace(backend="cpu"))
    ref = fit(a, cfg.replace(backend="torch"))
    assert torch.equal(fused.operator.perms, ref.operator.perms)
    assert float((fused.operator.blocks - ref.operator.blocks).detach().abs().max()) < 1e-9


def test_grow_helps_a_deep_fit():
    """The reason grow exists (docs/quality.md §7): at a depth past the "goldilocks" one, a fit
    grown from half the depth ends well below the one-stage fit with the same steps. About the
    Adam steps alone: the default sweeps in rounds after them can rescue the one-stage fit too."""
    a = sparsefit.synth("band", size=32, k=3, seed=0)
    cfg = FitConfig(depth=24, steps=1500, batch=32, loss="exact", schedule="anneal", seed=0, sweeps=0)
    plain, grown = fit(a, cfg), fit(a, cfg.replace(grow=1))
    assert grown.metrics.relative_error < 0.8 * plain.metrics.relative_error


@pytest.mark.parametrize("rows,batch,dtype", [(1, 1, torch.float32), (17, 3, torch.float64), (301, 17, torch.float32)])
def test_probes_are_the_counter_based_draws_of_the_step(rows, batch, dtype):
    from sparsefit.fitting import RandomProbes
    from sparsefit.kernels.gaussian import gaussian_reference

    tgt = as_target(np.arange(5 * rows, dtype=np.float64).reshape(5, rows))
    tgt.prepare(torch.device("cpu"), dtype)
    src = RandomProbes(tgt, batch, 7, torch.device("cpu"), dtype)
    for draw in range(2):  # fresh probes each step: draw k is the step's
        x, t = src.next()
        want = gaussian_reference(rows * batch, 7, draw).view(rows, batch).t().to(dtype)
        assert x.dtype == dtype and x.shape == (batch, rows) and torch.equal(x, want)
        # the target's product, against float64 within the worst-case rounding bound of a
        # length-``rows`` dot product (the summation order is the BLAS's and differs by CPU)
        a = tgt.dense(10**6).to(torch.float64)
        exact, scale = x.double() @ a.t(), x.double().abs() @ a.abs().t()
        assert t.dtype == dtype and bool(((t.double() - exact).abs() <= rows * torch.finfo(dtype).eps * scale).all())
