"""``sparsefit.bench`` and ``sparsefit bench`` on tiny CPU sizes (timings are not checked, only
the protocol, the row contents and the command line)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import sparsefit
from sparsefit import SparsefitError
from sparsefit.bench import BenchConfig, BenchRow, bench_file, default_depth, rotation_count, run_bench, time_calls
from sparsefit.cli import app

runner = CliRunner()
TINY = BenchConfig(widths=(8, 14), batches=(1, 3), dtypes=("fp32",), repeats=2, warmup=1, device="cpu")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_bench_rows_on_cpu():
    seen = []
    rows = run_bench(TINY, progress=seen.append)
    assert rows == seen and all(isinstance(r, BenchRow) for r in rows)
    # per (width, batch): dense, the torch path and the fused numba kernel
    assert [(r.width, r.batch, r.method) for r in rows] == [
        (w, b, m) for w in (8, 14) for b in (1, 3) for m in ("dense", "torch", "fused")
    ]
    for r in rows:
        assert r.device == "cpu" and r.dtype == "fp32" and r.repeats == 2
        assert r.depth == default_depth(r.width) and r.in_features == r.out_features == r.width
        assert r.fwd_ms > 0 and r.fwd_bwd_ms > 0 and r.gbps > 0 and r.bound_ms > 0
        assert r.fwd_min_ms <= r.fwd_ms <= r.fwd_max_ms and r.fwd_bwd_min_ms <= r.fwd_bwd_ms <= r.fwd_bwd_max_ms
        assert r.hbm_bytes > 0 and r.flops > 0 and r.bytes_per_row == r.hbm_bytes / r.batch
        assert (r.rel_error is None) == (r.method == "dense")
        assert r.rel_error is None or r.rel_error < 1e-5
    for dense, torch_row, fused in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        assert dense.speedup_fwd == 1.0
        assert math.isclose(torch_row.speedup_fwd, dense.fwd_ms / torch_row.fwd_ms)
        assert math.isclose(fused.speedup_fwd_bwd, dense.fwd_bwd_ms / fused.fwd_bwd_ms)
        assert torch_row.flops == 4 * torch_row.batch * torch_row.width * torch_row.depth
    assert json.loads(json.dumps(rows[0].to_dict()))["method"] == "dense"


def test_half_features_forward_only_and_depth():
    cfg = BenchConfig(widths=(12,), batches=(5,), dtypes=("bf16",), depth=3, features="half", repeats=1, warmup=0,
                      backward=False, methods=("torch",), device="cpu")  # fmt: skip
    (row,) = run_bench(cfg)
    assert (row.width, row.depth, row.in_features, row.out_features, row.dtype) == (12, 3, 6, 6, "bf16")
    assert row.fwd_bwd_ms is None and row.speedup_fwd is None  # no dense row to compare with


def test_bench_file(tmp_path):
    g = sparsefit.GTilde(7, 5, 4, 10, seed=0)
    path = tmp_path / "g.safetensors"
    sparsefit.save(path, g)
    rows = bench_file(path, BenchConfig(batches=(3,), dtypes=("fp32",), repeats=1, warmup=0, device="cpu"))
    assert [(r.method, r.width, r.depth, r.in_features, r.out_features) for r in rows] == [
        ("dense", 10, 4, 7, 5),
        ("torch", 10, 4, 7, 5),
        ("fused", 10, 4, 7, 5),
    ]


def test_time_calls_protocol_and_rotation():
    calls = []
    times = time_calls(calls.append, torch.device("cpu"), warmup=2, repeats=3)
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)
    assert rotation_count(1 << 40, torch.device("cpu")) == 2  # huge sets: still two
    assert rotation_count(1, torch.device("cpu")) == 16  # tiny sets: capped


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"widths": (7,)}, "even"),
        ({"widths": ()}, "positive"),
        ({"batches": (0,)}, "positive"),
        ({"dtypes": ("fp8",)}, "unknown dtype"),
        ({"methods": ("magic",)}, "unknown method"),
        ({"features": "third"}, "features"),
        ({"repeats": 0}, "repeats"),
        ({"depth": 0}, "depth"),
        ({"device": "tpu"}, "device"),
    ],
    ids=["odd-width", "no-widths", "zero-batch", "dtype", "method", "features", "repeats", "depth", "device"],
)
def test_bad_config(kwargs, msg):
    with pytest.raises(SparsefitError, match=msg):
        BenchConfig(**kwargs)


def test_cli_json_stdout():
    r = run("bench", "--widths", "8", "--batches", "3", "--repeats", "1", "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["device"] == "cpu" and "GPU" in payload["note"]
    assert [row["method"] for row in payload["rows"]] == ["dense", "torch", "fused"]
    assert payload["rows"][1]["width"] == 8 and payload["rows"][1]["fwd_ms"] > 0
    assert all(k in payload["rows"][2] for k in ("speedup_fwd", "speedup_fwd_bwd", "dtype", "batch"))


def test_cli_table_and_cpu_note(tmp_path):
    out = tmp_path / "b.json"
    r = run("bench", "--widths", "8", "--batches", "2", "--repeats", "1", "--no-backward", "--json", out)
    assert r.exit_code == 0, r.output
    assert "sparsefit bench" in r.stdout and "torch" in r.stdout
    if not torch.cuda.is_available():
        assert "need a CUDA GPU" in r.stderr and "numba" in r.stderr
    assert json.loads(out.read_text())["rows"][0]["fwd_bwd_ms"] is None


def test_cli_file(tmp_path):
    g = sparsefit.GTilde(7, 5, 4, 10, seed=0)
    path = tmp_path / "g.safetensors"
    sparsefit.save(path, g)
    r = run("bench", path, "--batches", "2", "--repeats", "1", "--device", "cpu", "--json", "-")
    assert r.exit_code == 0, r.output
    assert {row["in_features"] for row in json.loads(r.stdout)["rows"]} == {7}


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--widths", "abc"], "comma-separated integers"),
        (["--widths", "9"], "even"),
        (["--batches", ","], "empty"),
        (["--dtypes", "fp64"], "unknown dtype"),
        (["--repeats", "0"], "repeats"),
        (["--features", "third"], "features"),
        (["--device", "tpu"], "device"),
        (["missing.safetensors"], "no such file"),
    ],
    ids=["widths-not-int", "odd-width", "empty-batches", "dtype", "repeats", "features", "device", "missing-file"],
)
def test_cli_bad_options_exit_2(args, msg):
    r = run("bench", *args)
    assert r.exit_code == 2, r.output
    assert msg in r.stderr


def test_cli_cuda_without_gpu_exits_2():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run("bench", "--device", "cuda", "--widths", "8")
    assert r.exit_code == 2 and "no CUDA GPU" in r.stderr


def test_cli_bad_json_target_exits_2(tmp_path):
    r = run("bench", "--widths", "8", "--json", tmp_path / "nope" / "b.json")
    assert r.exit_code == 2 and "does not exist" in r.stderr
