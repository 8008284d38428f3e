"""Everything the GPU issue needs from one device run (~10 minutes on an H100).

    python benchmarks/bench_gpu.py [--out DIR] [--quick] [--skip-tests] [--skip-full]

Sections, each guarded so that one failure does not lose the rest (errors are printed and kept
in the JSON):

1. environment: GPU, versions, measured copy bandwidth (the HBM ceiling), the shared-memory model;
2. correctness: the ``@pytest.mark.gpu`` tests (fp32/bf16/fp16 vs float64, gradients, NaN
   poison, wide operators, torch.compile, CUDA graphs) plus a float64-reference check of every
   configuration timed below;
3. variants of the fused kernel at n = 4096, bf16, batch 4096 (default full-width gather, two
   half-width gathers, fewer/more rows per program, layer by layer) so the default can be chosen;
4. the issue's bars: bf16, depth 2·log2 n, batch 4096 and 1, n = 4096 and 16384, fused vs dense
   (dense n×n and, for the fit's default width 2·d, dense (n/2)×(n/2)), forward and fwd+bwd;
5. a fit training step at width 2048, depth 24, batch 1024 (1024×1024 target): torch path vs
   fused kernel, per-step time from CUDA events, plus a 3000-step ``sparsefit.fit`` wall time;
6. the full ``sparsefit.bench`` table (widths 1024…16384, batches 1…4096, three dtypes).

The last thing printed is the summary table (what the device reply keeps). Full rows go to
``--out`` (default ``$OUT`` or ``bench_gpu_out``) as JSON and CSV.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# this script is what verifies the fused kernel: let backend "auto" (and so sparsefit.fit) use it
os.environ.setdefault("SPARSEFIT_FUSED", "1")

import sparsefit  # noqa: E402
from sparsefit import bench  # noqa: E402
from sparsefit.kernels import gpu  # noqa: E402
from sparsefit.operator import gtilde_reference  # noqa: E402

RESULTS: dict = {"errors": {}}
SUMMARY: list[str] = []


def section(name):
    def wrap(fn):
        def run(*a, **k):
            print(f"\n=== {name} ===", flush=True)
            t0 = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception as e:  # keep going: one broken section must not lose the others
                traceback.print_exc()
                RESULTS["errors"][name] = f"{type(e).__name__}: {e}"
                SUMMARY.append(f"{name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)

        return run

    return wrap


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@section("environment")
def environment():
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    import triton

    copy = bench.copy_bandwidth(dev)
    env = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": bench.cache_bytes(dev),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_GBps": copy / 1e9,
        "smem_model_TBps": bench.smem_bandwidth(dev) / 1e12,
    }
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = statistics.median(bench.time_calls(lambda i: a @ a, dev, warmup=3, repeats=10))
    env["bf16_matmul_TFLOPs"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    RESULTS["environment"] = env
    print(json.dumps(env, indent=1))
    SUMMARY.append(
        f"{env['gpu']}: copy {env['copy_GBps']:.0f} GB/s, bf16 matmul {env['bf16_matmul_TFLOPs']:.0f} TFLOP/s, "
        f"smem model {env['smem_model_TBps']:.1f} TB/s, torch {env['torch']}, triton {env['triton']}"
    )


@section("gpu tests")
def gpu_tests():
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu_kernels.py", "-p", "no:cacheprovider"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    print(out.stdout[-4000:], out.stderr[-2000:])
    RESULTS["gpu_tests"] = {"returncode": out.returncode, "tail": out.stdout[-3000:]}
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "no output"
    SUMMARY.append(f"gpu tests: rc {out.returncode}: {last}")


def check_config(n, batch, dtype, depth, force=None, pair=None, feats=None):
    """Fused output vs float64 reference on the first 64 rows of a random batch."""
    old = (gpu.config.force, gpu.config.pair_gather)
    if force is not None:
        gpu.config.force = force
    if pair is not None:
        gpu.config.pair_gather = pair
    try:
        f = feats or n
        g = sparsefit.GTilde(f, f, depth, n, seed=1).cuda()
        x = torch.randn(min(batch, 64), f, device="cuda").to(dtype)
        with torch.no_grad():
            y = gpu.gtilde_fused(x, g.blocks.detach(), g.perms, f)
        ref = gtilde_reference(x.double(), g.blocks.detach().double(), g.perms, f)
        return rel(y, ref)
    finally:
        gpu.config.force, gpu.config.pair_gather = old


@section("fused variants (n 4096, bf16, batch 4096)")
def variants(quick):
    n, batch, depth = 4096, 4096 if not quick else 1024, bench.default_depth(4096)
    rows = []
    base = dataclasses.asdict(gpu.config)
    cases = [
        ("default (full gather + split)", {}),
        ("two half-width gathers", {"pair_gather": True}),
        ("tile 8192", {"max_tile": 8192}),
        ("tile 32768", {"max_tile": 32768}),
        ("8 warps", {"num_warps": 8}),
        ("layer by layer", {"force": "layered"}),
    ]
    for name, change in cases:
        for k, v in base.items():
            setattr(gpu.config, k, v)
        for k, v in change.items():
            setattr(gpu.config, k, v)
        gpu._fused_rows_limit.clear()
        try:
            err = check_config(n, batch, torch.bfloat16, depth)
            cfg = bench.BenchConfig(widths=(n,), batches=(batch,), dtypes=("bf16",), methods=("fused",), repeats=10)
            (r,) = bench.run_bench(cfg)
            plan = gpu.plan(n, batch, torch.bfloat16)
            rows.append({"variant": name, "rel_err": err, "fwd_ms": r.fwd_ms, "fwd_bwd_ms": r.fwd_bwd_ms,
                         "bound_ms": r.bound_ms, "plan": plan})  # fmt: skip
            print(rows[-1], flush=True)
        except Exception as e:
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(rows[-1], flush=True)
    for k, v in base.items():
        setattr(gpu.config, k, v)
    gpu._fused_rows_limit.clear()
    RESULTS["variants"] = rows
    for r in rows:
        if "error" in r:
            SUMMARY.append(f"variant {r['variant']}: ERROR {r['error'][:100]}")
        else:
            SUMMARY.append(
                f"variant {r['variant']:<30} fwd {r['fwd_ms']:.3f} ms  f+b {r['fwd_bwd_ms']:.3f} ms  "
                f"(smem bound {r['bound_ms']:.3f} ms)  err {r['rel_err']:.1e}  {r['plan']}"
            )


@section("issue bars (bf16, depth 2 log2 n)")
def bars():
    out = []
    for features in ("width", "half"):
        cfg = bench.BenchConfig(widths=(4096, 16384), batches=(4096, 1), dtypes=("bf16",), features=features)
        rows = bench.run_bench(cfg)
        out += [r.to_dict() for r in rows]
        for n in (4096, 16384):
            f = n if features == "width" else n // 2
            err = check_config(n, 64, torch.bfloat16, bench.default_depth(n), feats=f)
            for b in (4096, 1):
                sel = {r.method: r for r in rows if r.width == n and r.batch == b}
                d, fu, to = sel.get("dense"), sel.get("fused"), sel.get("torch")
                if not (d and fu):
                    continue
                SUMMARY.append(
                    f"BAR n {n:>5} dense {f}x{f:<5} batch {b:>4}: dense {d.fwd_ms:.3f}/{d.fwd_bwd_ms:.3f} ms, "
                    f"fused {fu.fwd_ms:.3f}/{fu.fwd_bwd_ms:.3f} ms -> x{fu.speedup_fwd:.2f} fwd, x{fu.speedup_fwd_bwd:.2f} f+b; "
                    f"torch x{to.speedup_fwd:.2f}; fused {fu.gbps:.0f} GB/s, smem bound {fu.bound_ms:.3f} ms; err {err:.1e}"
                )
    RESULTS["bars"] = out


@section("fit training step (width 2048, depth 24, batch 1024)")
def fit_step(quick):
    dev = torch.device("cuda")
    a = torch.tensor(sparsefit.synth("perm", size=1024, seed=0), dtype=torch.float32, device=dev)
    res = {}
    for backend in ("torch", "cuda"):
        op = sparsefit.GTilde(1024, 1024, 24, 2048, seed=0, device=dev)
        opt = torch.optim.Adam([op.blocks], lr=1e-2)
        gen = torch.Generator(device=dev).manual_seed(1)

        def step(i, op=op, opt=opt, gen=gen, backend=backend):
            x = torch.randn(1024, 1024, generator=gen, device=dev)
            t = x @ a.t()
            y = op(x, backend=backend)
            loss = ((y - t) ** 2).sum(1).mean() / 1024 + 3.0 * op.orthogonality_penalty()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = statistics.median(bench.time_calls(step, dev, warmup=5, repeats=50))
        res[backend] = ms
        print(f"{backend}: {ms:.3f} ms/step", flush=True)
    steps = 600 if quick else 3000
    t0 = time.perf_counter()
    r = sparsefit.fit(a.cpu().numpy(), sparsefit.FitConfig(depth=24, steps=steps, batch=1024, device="cuda", sweeps=0))
    wall = time.perf_counter() - t0
    res.update({"fit_steps": steps, "fit_wall_s": wall, "fit_relative_error": r.metrics.relative_error})
    RESULTS["fit_step"] = res
    SUMMARY.append(
        f"FIT step n 2048 D 24 B 1024: torch {res['torch']:.3f} ms, fused {res['cuda']:.3f} ms "
        f"(x{res['torch'] / res['cuda']:.2f}); sparsefit.fit {steps} steps {wall:.1f} s, rel err {r.metrics.relative_error:.3g}"
    )


@section("full table")
def full_table(quick):
    cfg = bench.BenchConfig(repeats=10 if quick else 20)
    if quick:
        cfg = dataclasses.replace(cfg, widths=(1024, 4096), batches=(1, 4096), dtypes=("bf16",))
    rows = bench.run_bench(
        cfg,
        progress=lambda r: print(
            f"{r.method:>6} n {r.width:>5} B {r.batch:>4} {r.dtype}: fwd {r.fwd_ms} f+b {r.fwd_bwd_ms} {r.note}",
            flush=True,
        ),
    )
    RESULTS["full"] = [r.to_dict() for r in rows]
    # correctness of every fused configuration that was timed
    errs = []
    for n in sorted({r.width for r in rows}):
        for dt in sorted({r.dtype for r in rows}):
            e = check_config(n, 64, bench.DTYPES[dt], bench.default_depth(n))
            errs.append((n, dt, e))
    RESULTS["full_errors"] = errs
    worst = max(e for _, _, e in errs) if errs else float("nan")
    fused = [r for r in rows if r.method == "fused" and r.speedup_fwd]
    best = max(fused, key=lambda r: r.speedup_fwd) if fused else None
    SUMMARY.append(f"full table: {len(rows)} rows; worst fused rel err vs float64 {worst:.1e} ({errs})")
    if best:
        SUMMARY.append(
            f"  best fused fwd speedup x{best.speedup_fwd:.2f} at n {best.width} B {best.batch} {best.dtype}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_gpu_out"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a first smoke run)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    if not gpu.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU and Triton (pip install 'sparsefit[gpu]')")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    environment()
    if not args.skip_tests:
        gpu_tests()
    variants(args.quick)
    bars()
    fit_step(args.quick)
    if not args.skip_full:
        full_table(args.quick)
    RESULTS["seconds"] = time.perf_counter() - t0
    (out / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    rows = RESULTS.get("full", []) + RESULTS.get("bars", [])
    if rows:
        with open(out / "bench_gpu.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print("\n" + "=" * 100)
    print(f"SUMMARY ({RESULTS['seconds']:.0f} s; rows in {out}/bench_gpu.json and .csv)")
    for line in SUMMARY:
        print(line)
    if not math.isfinite(RESULTS["seconds"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
