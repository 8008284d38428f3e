"""Time one least-squares sweep (``sparsefit.als``) against the Adam steps it is budgeted in.

The default fit runs as many sweeps as cost no more than its Adam steps, by a fixed cost model
(``sparsefit.als.SWEEP_COST``: a sweep counts as ``SWEEP_COST · width`` probe-steps). This script
measures what that constant should be on this machine: one sweep with the truncated
conjugate-gradient layer solve (the default) and with the exact Cholesky solve (the reference),
interleaved, on the operator a short fit of the target left, and the seconds per Adam step of
the same fit (batch ``--batch``). It prints min and median of each and the implied constant:

    python benchmarks/bench_sweep.py [--size 1024 --depth 40 --batch 1024 --repeats 3] [--json out.json]

``--sweeps N`` runs N sweeps per repeat instead of one and reports the error after each, to
compare what the two solvers reach (``--targets`` takes several, comma-separated):

    python benchmarks/bench_sweep.py --size 256 --depth 32 --batch 256 --steps 1000 --sweeps 15 \
        --repeats 1 --targets sparse3,band3,lowrank3,perm
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from bench_quality import TARGETS  # benchmarks/ is on the path when run as a script

import sparsefit
from sparsefit import als
from sparsefit.fileformat import save_text
from sparsefit.kernels import sweep


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300, help="Adam steps timed (and the start of the sweeps)")
    ap.add_argument("--targets", default="sparse3", help="comma-separated: " + ",".join(TARGETS))
    ap.add_argument("--sweeps", type=int, default=1, help="sweeps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="sweeps of each solver, interleaved")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    unknown = sorted(set(a.targets.split(",")) - set(TARGETS))
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"settings": vars(a), "cg_iters": als.CG_ITERS, "sweep_cost_in_use": als.SWEEP_COST}
    out["machine"] = platform.processor() or platform.machine()
    out["threads"] = torch.get_num_threads()
    out["targets"] = [_one(a, name) for name in a.targets.split(",")]
    out["kernels"] = _time_kernels(2 * a.size)
    if a.json:
        save_text(a.json, json.dumps(out, indent=1) + "\n")


def _time_kernels(width: int, repeats: int = 15) -> dict:
    """A layer's kernels at this width, fused against their references: the Hessian product (ten
    per layer solve), the two-sided congruence (``ZZᵀ`` and ``QᵀQ`` carried one layer on) and the
    one-sided mix (``Q``, ``AZᵀ`` and ``Z``); beside them the ``QᵀQ`` product they replace."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(width // 2, width, dtype=torch.float64, generator=g)
    m = q.t() @ q
    x = torch.randn(width // 2, 2, 2, dtype=torch.float64, generator=g)
    perm = torch.randperm(width, generator=g)
    cases = {
        "hessian_product": ((sweep.hessian_product, sweep.hessian_product_reference), (m, m, x)),
        "congruence": ((sweep.congruence, sweep.congruence_reference), (m, x, perm)),
        "mix_gather": ((sweep.mix_gather, sweep.mix_gather_reference), (q, x, perm)),
        "gram_qtq": ((lambda q: q.t() @ q, None), (q,)),
    }
    out: dict = {"width": width}
    for case, (fns, args) in cases.items():
        row: dict = {}
        for name, f in zip(("fused", "reference"), fns, strict=True):
            if f is None:
                continue
            f(*args)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                f(*args)
                ts.append(time.perf_counter() - t)
            row[name] = {"min_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts)}
            print(
                f"{case}, width {width}, {name}: {row[name]['min_ms']:.2f} ms min, {row[name]['median_ms']:.2f} median"
            )
        out[case] = row
    return out


def _one(a: argparse.Namespace, name: str) -> dict:
    kind, k = TARGETS[name]
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
    als.als_sweeps(start.clone(), op.perms, a64, 1)  # compile the sweep kernels
    times: dict[str, list[float]] = {"cg": [], "cholesky": []}
    losses: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for solver in times:
            blocks = start.clone()
            t = time.perf_counter()
            losses[solver] = als.als_sweeps(blocks, op.perms, a64, a.sweeps, exact=solver == "cholesky")
            times[solver].append((time.perf_counter() - t) / (len(losses[solver]) - 1))
    norm = float(torch.sum(a64**2)) / a64.shape[0]
    print(
        f"{name} {a.size}x{a.size}, width {width}, depth {a.depth}, after {a.steps} Adam steps "
        f"(batch {a.batch}: {1e3 * step_s:.1f} ms each)"
    )
    print(f"{'solver':<10} {'min s/sweep':>12} {'median':>8} {'sweeps':>7} {'error after':>12} {'SWEEP_COST':>11}")
    rows = []
    for solver, ts in times.items():
        cost = min(ts) / step_s * a.batch / width  # probe-steps per unit of width
        errors = [(loss / norm) ** 0.5 for loss in losses[solver]]
        rows.append(
            {
                "solver": solver,
                "min_s_per_sweep": min(ts),
                "median_s_per_sweep": statistics.median(ts),
                "relative_errors": errors,
                "implied_sweep_cost": cost,
            }
        )
        n = len(errors) - 1
        print(f"{solver:<10} {min(ts):>12.2f} {statistics.median(ts):>8.2f} {n:>7} {errors[-1]:>12.6g} {cost:>11.3f}")
    return {"target": name, "width": width, "step_seconds": step_s, "rows": rows}


if __name__ == "__main__":
    main()
