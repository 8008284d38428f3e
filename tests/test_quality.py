import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sparsefit
from sparsefit import FitConfig, GTilde, SparsefitError, fit
from sparsefit.autosize import AutoFitResult, depth_ladder, extend_operator, fit_auto, max_depth_for
from sparsefit.cli import app
from sparsefit.config import SCHEDULES, Phase

ROOT = Path(__file__).resolve().parents[1]
FAST = FitConfig(steps=150, batch=32, eval_every=50, backend="torch", sweeps=0)  # the Adam steps alone


def load_script(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- warm starts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("old,new", [(5, 5), (5, 6), (5, 9), (5, 10), (3, 17), (1, 4)], ids=str)
def test_extend_operator_keeps_the_matrix(old, new):
    g = GTilde(20, 30, old, 40, seed=1, dtype=torch.float64)
    with torch.no_grad():
        g.blocks.add_(
            0.3 * torch.randn(g.blocks.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        )
    h = extend_operator(g, new, seed=3)
    assert h.depth == new and h.width == 40 and h.sampler == g.sampler
    assert torch.allclose(h.to_dense(), g.to_dense(), atol=1e-12)
    # the trained layers are all still there, in order
    kept = [j for j in range(new) if not torch.equal(h.blocks[j], torch.eye(2, dtype=torch.float64).expand(20, 2, 2))]
    assert len(kept) == old
    assert torch.equal(h.blocks[kept[-1]], g.blocks[-1].detach()) and kept[-1] == new - 1


def test_extend_operator_rejects_shrinking():
    with pytest.raises(SparsefitError, match="cannot extend"):
        extend_operator(GTilde(4, 4, 3, 8), 2)


def test_depth_ladder():
    assert depth_ladder(9, 64) == [9, 18, 36, 64]
    assert depth_ladder(5, 5) == [5]
    assert depth_ladder(1, 3) == [1, 2, 3]
    assert max_depth_for(20480, 1024) == 10


# -- the search ----------------------------------------------------------------------------------
def test_fit_auto_reaches_target_and_records_search():
    a = sparsefit.synth("perm", size=8, seed=0)
    seen = []

    class CB:
        def on_trial(self, t):
            seen.append(t.depth)

    auto = fit_auto(a, FAST.replace(steps=300), target_error=0.3, max_params=16 * 40, callbacks=[CB()])
    assert isinstance(auto, AutoFitResult)
    assert seen == [t.depth for t in auto.search]
    assert auto.target_met is True
    assert auto.result.metrics.relative_error <= 0.3
    assert auto.depth == auto.result.metrics.depth
    # the chosen depth is the smallest one tried that reached the target
    reached = [t.depth for t in auto.search if t.reached_target]
    assert auto.depth == min(reached)
    assert all(not t.reached_target for t in auto.search if t.depth < auto.depth)
    for t in auto.search:
        assert t.params == 2 * 16 * t.depth and t.seconds > 0 and t.params <= 16 * 40
    assert auto.search[0].warm_start is False
    assert any(t.warm_start for t in auto.search[1:]) or len(auto.search) == 1


def test_fit_auto_budget_only_picks_most_accurate():
    a = sparsefit.synth("lowrank", size=12, k=1, seed=0)
    auto = fit_auto(a, FAST, max_params=2 * 24 * 12)
    depths = [t.depth for t in auto.search]
    assert depths == depth_ladder(5, 12) and auto.target_met is None
    best = min(auto.search, key=lambda t: (t.relative_error, t.depth))
    assert auto.depth == best.depth
    assert all(t.reached_target is None for t in auto.search)


def test_fit_auto_target_not_reached_returns_best():
    a = sparsefit.synth("gaussian", size=8, seed=0)
    auto = fit_auto(a, FAST.replace(steps=60), target_error=1e-4, max_params=2 * 16 * 6)
    assert auto.target_met is False
    assert auto.result.metrics.relative_error == min(t.relative_error for t in auto.search)


def test_warm_start_never_worse_than_its_start():
    a = sparsefit.synth("band", size=16, k=2, seed=0)
    auto = fit_auto(a, FAST.replace(steps=200), max_params=2 * 32 * 10, min_depth=5)
    errs = [t.relative_error for t in auto.search]
    assert auto.search[1].warm_start and errs[1] <= errs[0] + 1e-9


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({}, "target error, a parameter budget"),
        ({"target_error": 0.0}, r"\(0, 1\)"),
        ({"target_error": 1.5}, r"\(0, 1\)"),
        ({"max_params": 10}, "less than one layer"),
        ({"target_error": 0.1, "refine": -1}, "refine"),
    ],
    ids=str,
)
def test_fit_auto_validation(kw, msg):
    with pytest.raises(SparsefitError, match=msg):
        fit_auto(np.eye(8), FAST, **kw)


def test_fit_auto_rejects_fixed_depth():
    with pytest.raises(SparsefitError, match="leave --depth unset"):
        fit_auto(np.eye(8), FAST.replace(depth=4), target_error=0.1)


# -- CLI -----------------------------------------------------------------------------------------
@pytest.fixture
def perm_file(tmp_path):
    p = tmp_path / "P.npy"
    np.save(p, sparsefit.synth("perm", size=8, seed=0))
    return p


def test_cli_target_error_search(tmp_path, perm_file):
    out = tmp_path / "P.safetensors"
    args = ["fit", str(perm_file), "--target-error", "0.3", "--max-params", "640", "--steps", "300"]
    r = CliRunner().invoke(app, [*args, "--batch", "32", "--backend", "torch", "-o", str(out), "--json", "-", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["target_met"] is True and report["relative_error"] <= 0.3
    assert [set(t) >= {"depth", "params", "relative_error", "seconds"} for t in report["search"]]
    assert report["depth"] in [t["depth"] for t in report["search"]]
    header = sparsefit.read_header(out)
    assert header["depth"] == report["depth"] and header["config"]["depth"] == report["depth"]


def test_cli_search_table(tmp_path, perm_file):
    args = ["fit", str(perm_file), "--max-params", "400", "--steps", "40", "--batch", "16", "--backend", "torch"]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    assert "depth search" in r.output and "chose depth" in r.output


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--target-error", "0.1", "--depth", "4"], "--depth fixes the depth"),
        (["--max-params", "5"], "less than one layer"),
        (["--target-error", "2"], "(0, 1)"),
        (["--schedule", "nope"], "unknown schedule"),
        (["--loss", "l1"], "unknown loss"),
        (["--init", "butterfly"], "butterfly permutations"),
    ],
    ids=str,
)
def test_cli_rejects(tmp_path, perm_file, extra, msg):
    out = tmp_path / "o.safetensors"
    r = CliRunner().invoke(app, ["fit", str(perm_file), *extra, "--steps", "10", "-o", str(out), "-q"])
    assert r.exit_code == 2, r.output
    assert msg in r.output and len(r.output.strip().splitlines()) <= 2
    assert not out.exists()


# -- schedules and the exact loss ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_are_valid(name):
    c = FitConfig(schedule=name, steps=1200)
    phases = c.resolved_phases()
    assert abs(sum(p.fraction for p in phases) - 1) < 1e-9
    starts = [s for s, _ in c.phase_steps()]
    assert starts == sorted(starts) and starts[0] == 0
    assert FitConfig.from_dict(c.to_dict()).resolved_phases() == phases
    r = fit(sparsefit.synth("perm", size=8), FAST.replace(schedule=name, steps=60))
    assert math.isfinite(r.metrics.relative_error)


def test_paper_schedule_is_still_the_default():
    assert FitConfig().schedule == "paper" and FitConfig().loss == "probes" and FitConfig().init == "random"


def test_exact_loss_matches_frobenius():
    a = sparsefit.synth("band", size=12, k=2, seed=0)
    r = fit(a, FAST.replace(loss="exact", steps=25, eval_every=25, dtype="float64", lr=1e-12))
    # with a negligible learning rate, the reported loss is the start's ||G~ − A||²_F / out
    g0 = GTilde(12, 12, r.metrics.depth, 24, seed=0, dtype=torch.float64).to_dense()
    expect = float(((g0 - torch.from_numpy(a)) ** 2).sum()) / 12
    assert r.history[-1][1] == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("loss", ["exact", "late-exact"])
def test_identity_losses_reject_custom_probes_and_wide_targets(loss):
    with pytest.raises(SparsefitError, match="custom probes"):
        fit(np.eye(4), FAST.replace(loss=loss), probes=lambda b, g: torch.randn(b, 4, generator=g))
    wide = sparsefit.as_target(lambda x: x[:2], shape=(2, 20000))
    with pytest.raises(SparsefitError, match="use --loss probes"):
        fit(wide, FAST.replace(loss=loss))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_late_exact_is_probes_until_the_last_phase_then_the_exact_loss(backend):
    a = sparsefit.synth("band", size=12, k=2, seed=0)
    cfg = FAST.replace(steps=60, batch=12, eval_every=5, dtype="float64", seed=3, backend=backend)
    switch = cfg.phase_steps()[-1][0]  # the paper schedule's last phase: step 50 of 60
    assert switch == 50
    seen = []
    cb = type("CB", (), {"on_start": lambda s, i: seen.append(i)})()
    probes = fit(a, cfg)
    late = fit(a, cfg.replace(loss="late-exact"), [cb])
    assert seen[0]["loss"] == "late-exact"
    # the same bytes as the probe fit up to the switch ...
    before = [h for h in late.history if h[0] <= switch]
    assert before == [h for h in probes.history if h[0] <= switch]
    # ... then the exact loss: with the learning rate made negligible after the switch, every
    # window's loss is the same number, ||G~ − A||²_F / out of the operator at the switch
    frozen = cfg.replace(loss="late-exact", phases=(Phase(50 / 60, 1e-2, 3.0), Phase(10 / 60, 1e-12, 0.3)))
    r = fit(a, frozen)
    after = [mse for step, mse in r.history if step > switch]
    assert len(after) == 2 and after[0] == pytest.approx(after[1], rel=1e-9)
    assert after[0] == pytest.approx(float(((r.operator.to_dense() - torch.from_numpy(a)) ** 2).sum()) / 12, rel=1e-6)
    # a polish after the steps reuses the exact source built at the switch, and runs
    polished = fit(a, cfg.replace(loss="late-exact", polish=20))
    assert polished.metrics.relative_error <= late.metrics.relative_error


def test_exact_loss_fits_better_than_probes_on_small_target():
    a = sparsefit.synth("sparse", size=16, k=2, seed=1)
    cfg = FAST.replace(depth=10, steps=600, batch=16)
    probes = fit(a, cfg).metrics.relative_error
    exact = fit(a, cfg.replace(loss="exact")).metrics.relative_error
    assert exact < probes


# -- scripts -------------------------------------------------------------------------------------
def test_reproduce_paper_tiny(tmp_path):
    mod = load_script("examples/reproduce_paper.py")
    t0 = time.perf_counter()
    args = ["--size", "8", "--steps", "40", "--batch", "16", "--depths", "2,4", "--ks", "1"]
    mod.main([*args, "--experiments", "lowrank,perm", "--backend", "torch", "--out", str(tmp_path)])
    assert time.perf_counter() - t0 < 60
    lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert lines[0].startswith("experiment,k,size,width,depth,params")
    assert len(lines) == 1 + 3 * 2  # lowrank k=1, perm, gaussian reference × 2 depths
    md = (tmp_path / "results.md").read_text()
    assert "### lowrank" in md and "### perm" in md and "### gaussian" in md


def test_bench_quality_tiny(tmp_path, capsys):
    mod = load_script("benchmarks/bench_quality.py")
    out = tmp_path / "q.json"
    args = ["--size", "8", "--depths", "3", "--steps", "30", "--batch", "8", "--targets", "perm,lowrank3"]
    mod.main([*args, "--backend", "torch", "--json", str(out), "--csv", str(tmp_path / "q.csv")])
    rows = json.loads(out.read_text())
    assert [r["target"] for r in rows] == ["perm", "lowrank3"]
    assert "| perm | paper | probes |" in capsys.readouterr().out


def test_bench_quality_lr_sweep(tmp_path, capsys):
    mod = load_script("benchmarks/bench_quality.py")
    out = tmp_path / "q.json"
    args = ["--size", "8", "--depths", "3", "--steps", "30", "--batch", "8", "--targets", "band3"]
    mod.main([*args, "--backend", "torch", "--lrs", "0.01,0.05", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["lr"] for r in rows] == [0.01, 0.05]
    assert rows[0]["relative_error"] != rows[1]["relative_error"]  # the lr reaches the fit
    table = capsys.readouterr().out
    assert "| band3 | paper | probes | 0.01 |" in table and "| band3 | paper | probes | 0.05 |" in table


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--lrs", "abc"], "comma-separated numbers"),
        (["--lrs", "0.01,-1"], "positive"),
        (["--targets", "nope"], "nope"),
    ],
)
def test_bench_quality_bad_arguments_one_line_exit_2(tmp_path, capsys, bad, says):
    mod = load_script("benchmarks/bench_quality.py")
    out = tmp_path / "q.json"
    with pytest.raises(SystemExit) as e:
        mod.main([*bad, "--json", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
