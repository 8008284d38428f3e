"""Time one least-squares sweep (``sparsefit.als``) against the Adam steps it is budgeted in.

The default fit runs as many sweeps as cost no more than its Adam steps, by a fixed cost model
(``sparsefit.als.SWEEP_COST``: a sweep counts as ``SWEEP_COST · width²`` probe-steps). This script
measures what that constant should be on this machine: one sweep with the truncated
conjugate-gradient layer solve (the default) and with the exact Cholesky solve (the reference),
interleaved, on the operator a short fit of the target left, and the seconds per Adam step of
the same fit (batch ``--batch``). It prints min and median of each and the implied constant:

    python benchmarks/bench_sweep.py [--size 1024 --depth 40 --batch 1024 --repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import sparsefit
from sparsefit import als
from sparsefit.fileformat import save_text

TARGETS = {"perm": ("perm", 1), "sparse3": ("sparse", 3), "band3": ("band", 3), "lowrank3": ("lowrank", 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300, help="Adam steps timed (and the start of the sweeps)")
    ap.add_argument("--target", default="sparse3", choices=sorted(TARGETS))
    ap.add_argument("--repeats", type=int, default=3, help="sweeps of each solver, interleaved")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    kind, k = TARGETS[a.target]
    target = sparsefit.synth(kind, size=a.size, k=k, seed=0)
    cfg = sparsefit.FitConfig(depth=a.depth, steps=a.steps, batch=a.batch, seed=0, sweeps=0)
    sparsefit.fit(target, cfg.replace(steps=20))  # compile and warm the kernels
    t = time.perf_counter()
    res = sparsefit.fit(target, cfg)
    step_s = (time.perf_counter() - t) / a.steps
    op = res.operator
    width = op.width
    start = op.blocks.detach().to(torch.float64)
    a64 = torch.as_tensor(target, dtype=torch.float64)
    als.als_sweeps(start.clone(), op.perms, a64, 1)  # compile the Hessian kernel
    times: dict[str, list[float]] = {"cg": [], "cholesky": []}
    losses: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for name in times:
            blocks = start.clone()
            t = time.perf_counter()
            losses[name] = als.als_sweeps(blocks, op.perms, a64, 1, exact=name == "cholesky")
            times[name].append(time.perf_counter() - t)
    rows = []
    print(
        f"width {width}, depth {a.depth}, {a.target} {a.size}x{a.size}; Adam step (batch {a.batch}): {1e3 * step_s:.1f} ms"
    )
    print(f"{'solver':<10} {'min s':>8} {'median s':>9} {'error after':>12} {'SWEEP_COST':>11}")
    norm = float(torch.sum(a64**2)) / a64.shape[0]
    for name, ts in times.items():
        cost = min(ts) / step_s * a.batch / width**2
        err = (losses[name][-1] / norm) ** 0.5
        rows.append(
            {
                "solver": name,
                "min_s": min(ts),
                "median_s": statistics.median(ts),
                "relative_error_before": (losses[name][0] / norm) ** 0.5,
                "relative_error_after": err,
                "implied_sweep_cost": cost,
            }
        )
        print(f"{name:<10} {min(ts):>8.2f} {statistics.median(ts):>9.2f} {err:>12.5f} {cost:>11.3f}")
    if a.json:
        out = {
            "settings": vars(a),
            "width": width,
            "step_seconds": step_s,
            "cg_iters": als.CG_ITERS,
            "sweep_cost_in_use": als.SWEEP_COST,
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        save_text(a.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
