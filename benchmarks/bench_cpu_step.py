"""Time one CPU training step (forward + loss + block gradient) of G~, per backend.

The issue's bar: width 2048, depth 24, batch 256 (a 1024×1024 target), ≤ 15 ms per step on
2 CPU cores. Backends: the generic-autograd reference, the hand-written torch path, and the
fused numba kernel; all compute the same loss and gradient (checked here before timing).

    python benchmarks/bench_cpu_step.py [--width 2048 --depth 24 --batch 256 --repeats 30] [--csv out.csv]

``--split TARGET`` (``sparse3``, ``lowrank3``, ...) times a whole fit step the way
:func:`sparsefit.fit` runs it instead, one part at a time: probes, the target product, the
kernel, the regulariser gradient, the optimiser (``--loss exact`` drops the first two):

    python benchmarks/bench_cpu_step.py --split sparse3 --depth 40 --batch 1024 [--loss exact]

``--seglen auto,1,2,8`` compares the fit's segment-length tuner (``auto``) with fixed checkpoint
segment lengths, their steps interleaved in one process (every length gives the same bytes):

    python benchmarks/bench_cpu_step.py --split sparse3 --depth 40 --batch 1024 --loss exact --seglen auto,2,8

``--baseline DIR`` runs another checkout's fit step (``git worktree add DIR COMMIT``) interleaved with
this one's, in the same process on the same target, for a before/after on a noisy host:

    python benchmarks/bench_cpu_step.py --split sparse3 --depth 40 --batch 1024 --baseline ../base

``--subnormal F`` sets a fraction ``F`` of the block entries to 1e-40 (subnormal in float32), as
happens near the end of a fit; the numba kernels flush such values to zero
(``sparsefit/kernels/fpenv.py``), so their time should not move, while the torch paths slow down.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch

from sparsefit.kernels.cpu import fit_step_numba, fit_step_reference
from sparsefit.operator import gtilde_torch, random_orthogonal_blocks
from sparsefit.permutations import sample_permutations


def fit_step_torch(x, t, blocks, perms, m):
    b = blocks.detach().clone().requires_grad_(True)
    y = gtilde_torch(x, b, perms, m)
    mse = ((y - t) ** 2).sum(1).mean() / m
    mse.backward()
    return mse.detach(), b.grad


def time_it(fn, args, repeats, inputs):
    fn(*args(0))  # warm-up (numba compiles here)
    ts = []
    for i in range(repeats):
        a = args(i % inputs)
        t0 = time.perf_counter()
        fn(*a)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def load_baseline(checkout: str):
    """The ``sparsefit`` package of another checkout (e.g. ``git worktree add ../base COMMIT``),
    imported as ``sparsefit_baseline`` beside the current one, so that both run in one process on
    the same inputs and share the host's load step by step. Copied to a folder under the temporary
    directory first (its numba cache then stays out of the checkout)."""
    import hashlib
    import importlib
    import shutil
    import tempfile
    from pathlib import Path

    src = Path(checkout).resolve() / "sparsefit"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"--baseline: {checkout} has no sparsefit package")
    # one folder per checkout, so that its numba cache (__pycache__) survives between runs
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"sparsefit_baseline_{tag}"
    shutil.copytree(src, root / "sparsefit_baseline", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("sparsefit_baseline")
    finally:
        sys.path.remove(str(root))


def split_step(a, dt) -> list[dict]:
    """Time each part of a fit step (median / min over ``a.repeats`` steps), in fit()'s order; one
    row set per ``--seglen`` setting (and per package with ``--baseline``), the settings' steps
    interleaved so that they share the host's load."""
    import importlib
    import math

    import sparsefit

    packages = [("", sparsefit)]
    if a.baseline:
        packages = [("baseline ", load_baseline(a.baseline)), ("current ", sparsefit)]
    kinds = {"perm": ("perm", 1), "sparse3": ("sparse", 3), "band3": ("band", 3), "lowrank3": ("lowrank", 3)}
    kind, kk = kinds[a.split]
    size = a.width // 2
    matrix = sparsefit.synth(kind, size=size, k=kk, seed=0)
    runs = []
    for label, pkg in packages:
        fitting = importlib.import_module(pkg.__name__ + ".fitting")
        cpu_kernel = importlib.import_module(pkg.__name__ + ".kernels.cpu")
        tgt = importlib.import_module(pkg.__name__ + ".targets").as_target(matrix)
        gtilde = importlib.import_module(pkg.__name__ + ".operator").GTilde
        config = pkg.FitConfig(depth=a.depth, batch=a.batch, loss=a.loss, dtype=a.dtype, backend=a.backend)
        for setting in a.seglen.split(","):
            op = gtilde(size, size, a.depth, a.width, seed=0, dtype=dt)
            step = fitting.make_step(op, config, tgt.shape[0])
            if setting != "auto":
                if not hasattr(step, "tuner"):
                    raise SystemExit("--seglen N needs the cpu backend (and a checkout with the tuner)")
                step.tuner = cpu_kernel.SegmentTuner((int(setting),))
            probes = fitting.make_probe_source(tgt, config, op, None)
            runs.append((label + f"seglen {setting}", probes, step, {}, []))
    phase = sparsefit.FitConfig(batch=a.batch).phase_steps()[0][1]
    for i in range(a.repeats + 1):
        for _, probes, step, parts, cpu in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            x, t = probes.next()
            step(x, t, phase)
            timings = {**probes.timings, **step.timings}
            if i:  # the first step compiles
                for name, sec in timings.items():
                    parts.setdefault(name, []).append(sec)
                parts.setdefault("total", []).append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    rows = []
    for setting, _, step, parts, cpu in runs:
        assert math.isfinite(float(step.last_mse))
        tag = setting + (f" (chose {step.tuner.choice})" if hasattr(step, "tuner") else "")
        rows += [
            dict(setting=tag, part=name, median_ms=statistics.median(v) * 1e3, min_ms=min(v) * 1e3)
            for name, v in parts.items()
        ]
        # CPU seconds of all threads: on a shared machine a steadier measure of the work than wall time
        rows.append(
            dict(
                setting=tag,
                part="total, CPU time of all threads",
                median_ms=statistics.median(cpu) * 1e3,
                min_ms=min(cpu) * 1e3,
            )
        )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--backends", default="torch,numba", help="comma list of reference,torch,numba")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--json", default=None, help="write the rows and the settings as JSON")
    ap.add_argument("--split", default=None, help="time a fit step part by part on this target class")
    ap.add_argument("--loss", default="probes", help="with --split: probes or exact")
    ap.add_argument("--backend", default="auto", help="with --split: the fit backend")
    ap.add_argument("--subnormal", type=float, default=0.0, help="fraction of block entries set to 1e-40")
    ap.add_argument(
        "--seglen",
        default="auto",
        help="with --split: comma list of checkpoint segment lengths to compare, 'auto' = the fit's tuner",
    )
    ap.add_argument(
        "--baseline",
        default=None,
        help="with --split: another checkout's folder (git worktree add DIR COMMIT); its fit step runs "
        "interleaved with this one's in the same process",
    )
    a = ap.parse_args(argv)
    if not 0 <= a.subnormal <= 1:
        ap.error(f"--subnormal is a fraction in [0, 1], got {a.subnormal}")
    dt = getattr(torch, a.dtype)
    if a.split:
        rows = split_step(a, dt)
        print(
            f"fit step split: {a.split}, width {a.width}, depth {a.depth}, batch {a.batch}, loss {a.loss}, "
            f"{a.dtype}, threads {torch.get_num_threads()}"
        )
        print("setting | part | median_ms | min_ms")
        for r in rows:
            print(f"{r['setting']} | {r['part']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}")
        _write_json(a, rows)
        return 0
    n, N = a.width, a.depth
    m = k = n // 2
    g = torch.Generator().manual_seed(0)
    blocks = random_orthogonal_blocks(N, n, g, dt)
    if a.subnormal > 0:
        hit = torch.rand(blocks.shape, generator=g) < a.subnormal
        blocks = torch.where(hit, torch.full_like(blocks, 1e-40), blocks)
    perms = sample_permutations(N, n, g)
    inputs = 4  # rotate probe batches so no run sees a warm copy of the previous one's data
    xs = [torch.randn(a.batch, k, generator=g, dtype=dt) for _ in range(inputs)]
    A = torch.randn(m, k, generator=g, dtype=dt) / k**0.5
    ts = [x @ A.T for x in xs]
    fns = {"reference": fit_step_reference, "torch": fit_step_torch, "numba": fit_step_numba}
    ref_mse, ref_grad = fit_step_reference(xs[0].double(), ts[0].double(), blocks.double(), perms, m)
    rows = []
    for name in a.backends.split(","):
        fn = fns[name]
        mse, grad = fn(xs[0], ts[0], blocks, perms, m)
        gerr = float((grad.double() - ref_grad).norm() / ref_grad.norm())
        med, best = time_it(fn, lambda i: (xs[i], ts[i], blocks, perms, m), a.repeats, inputs)
        rows.append(
            dict(
                backend=name,
                width=n,
                depth=N,
                batch=a.batch,
                dtype=a.dtype,
                subnormal=a.subnormal,
                threads=torch.get_num_threads(),
                median_ms=med * 1e3,
                min_ms=best * 1e3,
                grad_rel_err=gerr,
                mse_rel_err=abs(float(mse) - float(ref_mse)) / float(ref_mse),
            )
        )
    hdr = [
        "backend",
        "width",
        "depth",
        "batch",
        "dtype",
        "subnormal",
        "threads",
        "median_ms",
        "min_ms",
        "grad_rel_err",
        "mse_rel_err",
    ]
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in hdr))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=hdr)
            w.writeheader()
            w.writerows(rows)
    _write_json(a, rows)
    return 0


def _write_json(a: argparse.Namespace, rows: list[dict]) -> None:
    if a.json:
        import json
        import platform

        from sparsefit.fileformat import save_text

        out = {"settings": vars(a), "threads": torch.get_num_threads(), "machine": platform.processor(), "rows": rows}
        save_text(a.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
