import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sparsefit
from sparsefit.cli import app
from sparsefit.cli import report as cli_report

runner = CliRunner()
FAST = ["--steps", "120", "--batch", "32", "--depth", "6", "--quiet"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def perm(tmp_path):
    p = tmp_path / "P.npy"
    r = run("synth", "perm", "--size", 16, "-o", p)
    assert r.exit_code == 0, r.output
    return p


@pytest.mark.parametrize("kind", ["lowrank", "band", "sparse", "perm", "dct", "hadamard", "gaussian"])
def test_synth_kinds(tmp_path, kind):
    out = tmp_path / f"{kind}.npy"
    r = run("synth", kind, "--size", 16, "--k", 2, "--seed", 3, "-o", out)
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(out), sparsefit.synth(kind, 16, 2, 3))


def test_fit_writes_file_and_json(tmp_path, perm):
    out = tmp_path / "P.safetensors"
    r = run("fit", perm, *FAST, "-o", out, "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    for key in ("relative_error", "params", "dense_params", "svd_relative_error", "depth", "width", "seconds"):
        assert key in report
    assert report["depth"] == 6 and report["width"] == 32 and report["params"] == 2 * 32 * 6
    op, _, header = sparsefit.load(out)
    assert header["metrics"]["relative_error"] == report["relative_error"]
    assert header["config"]["steps"] == 120 and header["interrupted"] is False


def test_fit_grow_writes_the_asked_depth_and_says_how_it_grew(tmp_path, perm):
    out = tmp_path / "G.safetensors"
    r = run("fit", perm, *FAST[:-1], "--grow", 1, "-o", out)  # not quiet: the table
    assert r.exit_code == 0, r.output
    assert "grown 3 → 6" in r.output
    op, _, header = sparsefit.load(out)
    assert op.depth == 6 and header["config"]["grow"] == 1
    for bad, msg in (("7", "doublings from 0 to 6"), ("-1", "doublings from 0 to 6")):
        r = run("fit", perm, *FAST, "--grow", bad, "-o", tmp_path / "bad.safetensors")
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output
        assert not (tmp_path / "bad.safetensors").exists()


def test_fit_default_output_and_table(tmp_path, perm):
    r = run("fit", perm, "--steps", 60, "--batch", 16, "--depth", 4)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "P.gtilde.safetensors").exists()
    assert "relative error" in r.output and "truncated SVD" in r.output


def test_json_to_file(tmp_path, perm):
    r = run("fit", perm, *FAST, "-o", tmp_path / "o.safetensors", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["dense_params"] == 256


def test_same_command_same_bytes(tmp_path, perm):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("fit", perm, *FAST, "-o", a).exit_code == 0
    assert run("fit", perm, *FAST, "-o", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.safetensors"
    assert run("fit", perm, *FAST, "--seed", 1, "-o", c).exit_code == 0
    assert a.read_bytes() != c.read_bytes()


def test_same_bytes_in_fresh_processes_on_any_thread_count(tmp_path):
    # The README's promise end to end: a new process (numba's cache, a fresh segment tuner) on one
    # thread or all of them writes the same file; Gaussian probes, the fused float32 step, the
    # sweeps in rounds and the steps between them all run (width 512, batch 96: several chunk groups).
    from sparsefit.kernels import fused_cpu_available

    assert fused_cpu_available()  # numba is a dependency: auto on the CPU is the fused step
    target = tmp_path / "P.npy"
    assert run("synth", "perm", "--size", 256, "-o", target).exit_code == 0
    args = ["--depth", "8", "--steps", "150", "--batch", "96", "--sweeps", "2", "--rounds", "2", "--round-steps", "20"]
    outs = []
    for name, threads in (("a", None), ("b", "1"), ("c", None)):
        env = dict(os.environ)
        if threads:
            env.update(NUMBA_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        out = tmp_path / f"{name}.safetensors"
        cmd = [sys.executable, "-m", "sparsefit", "fit", str(target), *args, "-o", str(out), "--json", "-", "--quiet"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["sweeps_run"] == 2
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_info(tmp_path, perm):
    out = tmp_path / "P.safetensors"
    assert run("fit", perm, *FAST, "-o", out).exit_code == 0
    r = run("info", out, "--json", "-")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["depth"] == 6 and info["out_features"] == 16 and info["permutation_sampler"] == "uniform"
    r = run("info", out)
    assert r.exit_code == 0 and "width 32, depth 6" in r.output


def test_apply_matches_dense(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "A.npy", rng.standard_normal((12, 20)))
    out = tmp_path / "A.safetensors"
    assert run("fit", tmp_path / "A.npy", *FAST, "-o", out).exit_code == 0
    x = rng.standard_normal((7, 20)).astype(np.float32)
    np.save(tmp_path / "X.npy", x)
    r = run("apply", out, tmp_path / "X.npy", "-o", tmp_path / "Y.npy")
    assert r.exit_code == 0, r.output
    y = np.load(tmp_path / "Y.npy")
    op, _, _ = sparsefit.load(out)
    dense = op.to_dense(torch.float64).numpy()
    expect = x.astype(np.float64) @ dense.T
    assert y.shape == (7, 12) and y.dtype == np.float32
    assert np.linalg.norm(y - expect) / np.linalg.norm(expect) < 1e-6
    # one vector
    np.save(tmp_path / "x1.npy", x[0])
    assert run("apply", out, tmp_path / "x1.npy", "-o", tmp_path / "y1.npy").exit_code == 0
    assert np.allclose(np.load(tmp_path / "y1.npy")[0], y[0], rtol=1e-6, atol=1e-6)


def test_ctrl_c_writes_best_result_marked_interrupted(tmp_path, perm, monkeypatch):
    original = cli_report.FitProgress.on_step

    def interrupt(self, s):
        original(self, s)
        if s.step >= 100:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_report.FitProgress, "on_step", interrupt)
    out = tmp_path / "P.safetensors"
    r = run("fit", perm, "--steps", 1000, "--batch", 16, "--depth", 4, "-o", out, "--json", tmp_path / "r.json")
    assert r.exit_code == 130
    assert "interrupted" in r.output
    _, _, header = sparsefit.load(out)
    assert header["interrupted"] is True and header["metrics"]["steps_run"] == 100
    assert json.loads((tmp_path / "r.json").read_text())["interrupted"] is True


# ---- bad input: one line, exit code 2, no traceback, no output file ---------------------------
def _bad_arrays(tmp_path):
    cases = {
        "1d": np.zeros(5),
        "3d": np.zeros((2, 3, 4)),
        "empty": np.zeros((0, 3)),
        "complex": np.ones((3, 3), dtype=complex),
        "nan": np.array([[1.0, np.nan], [0.0, 1.0]]),
        "inf": np.array([[1.0, np.inf], [0.0, 1.0]]),
    }
    for name, arr in cases.items():
        np.save(tmp_path / f"{name}.npy", arr)
    np.save(tmp_path / "object.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "good.npy", np.eye(6))
    full = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(full[: len(full) // 2])
    (tmp_path / "garbage.npy").write_bytes(b"this is not an array file")
    np.savez(tmp_path / "multi.npz", a=np.eye(3), b=np.eye(3))
    (tmp_path / "readonly").mkdir()


BAD = [
    (["fit", "missing.npy"], "no such file"),
    (["fit", "truncated.npy"], "truncated"),
    (["fit", "garbage.npy"], "not a readable .npy"),
    (["fit", "1d.npy"], "2-D"),
    (["fit", "3d.npy"], "3-D"),
    (["fit", "empty.npy"], "empty"),
    (["fit", "object.npy"], "Python objects"),
    (["fit", "complex.npy"], "complex"),
    (["fit", "nan.npy"], "NaN"),
    (["fit", "inf.npy"], "NaN or Inf"),
    (["fit", "multi.npz", "--key", "zzz"], "no tensor named 'zzz'"),
    (["fit", "good.npy", "--depth", "0"], "depth must be at least 1"),
    (["fit", "good.npy", "--width", "13"], "even"),
    (["fit", "good.npy", "--width", "4"], "smaller than the matrix"),
    (["fit", "good.npy", "-o", "readonly"], "is a directory"),
    (["fit", "good.npy", "-o", "nodir/x.safetensors"], "does not exist"),
    (["fit", "good.npy", "--json", "nodir/r.json"], "does not exist"),
    (["fit", "good.npy", "--device", "tpu"], "device"),
    (["fit", "good.npy", "--schedule", "fast"], "unknown schedule"),
    (["synth", "nope", "--size", "4", "-o", "x.npy"], "unknown kind"),
    (["synth", "hadamard", "--size", "6", "-o", "x.npy"], "power-of-two"),
    (["info", "good.npy"], "not a readable safetensors"),
    (["apply", "missing.safetensors", "good.npy", "-o", "y.npy"], "no such file"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=["-".join(a[:1] + a[1:2] + a[2:3]) for a, _ in BAD])
def test_bad_input(tmp_path, monkeypatch, args, msg):
    _bad_arrays(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = {p.name for p in tmp_path.rglob("*")}
    r = runner.invoke(app, [*args, *(["--steps", "10", "--quiet"] if args[0] == "fit" else [])])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert {p.name for p in tmp_path.rglob("*")} == before  # nothing written, not even a temp file


def test_non_writable_output(tmp_path, monkeypatch):
    from sparsefit import fileformat

    np.save(tmp_path / "good.npy", np.eye(4))
    real_access = fileformat.os.access
    monkeypatch.setattr(fileformat.os, "access", lambda p, mode, **k: False if mode & 2 else real_access(p, mode))
    r = run("fit", tmp_path / "good.npy", "--steps", 10, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "permission denied" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_apply_wrong_width(tmp_path):
    np.save(tmp_path / "A.npy", np.eye(6))
    out = tmp_path / "A.safetensors"
    assert run("fit", tmp_path / "A.npy", *FAST, "-o", out).exit_code == 0
    np.save(tmp_path / "X.npy", np.ones((2, 5)))
    r = run("apply", out, tmp_path / "X.npy", "-o", tmp_path / "Y.npy")
    assert r.exit_code == 2 and "expects 6" in r.stderr
    assert not (tmp_path / "Y.npy").exists()


def test_help_texts():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("fit", "info", "apply", "synth"):
        assert cmd in r.output
    r = run("fit", "--help")
    assert "--depth" in r.output and "--json" in r.output
