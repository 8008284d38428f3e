"""Issue-2 bars, end to end through the CLI.

Runs ``sparsefit synth perm --size S`` then ``sparsefit fit … --depth 24 --steps 3000`` in a
subprocess (as a user would), and prints wall time, fit time and relative error; ``--csv`` writes
the rows. Default sizes: 128 (bar: error < 1e-2 in < 60 s on 2 CPU cores).

    python benchmarks/bench_fit_bar.py [--sizes 128] [--depth 24] [--steps 3000] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time


def run_one(size: int, depth: int, steps: int, batch: int | None, seed: int, workdir: str) -> dict:
    a = os.path.join(workdir, f"P{size}.npy")
    out = os.path.join(workdir, f"P{size}.safetensors")
    rep = os.path.join(workdir, f"r{size}.json")
    cli = [sys.executable, "-m", "sparsefit"]
    subprocess.run(
        [*cli, "synth", "perm", "--size", str(size), "--seed", str(seed), "-o", a], check=True, capture_output=True
    )
    cmd = [*cli, "fit", a, "--depth", str(depth), "--steps", str(steps), "-o", out, "--json", rep, "--quiet"]
    if batch:
        cmd += ["--batch", str(batch)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    r = json.loads(open(rep).read())
    return {
        "size": size,
        "width": r["width"],
        "depth": r["depth"],
        "steps": steps,
        "batch": r["config"]["batch"],
        "wall_s": round(wall, 2),
        "fit_s": round(r["seconds"], 2),
        "ms_per_step": round(1e3 * r["seconds"] / steps, 2),
        "relative_error": r["relative_error"],
        "svd_relative_error": r["svd_relative_error"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128")
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for s in [int(v) for v in args.sizes.split(",")]:
            rows.append(run_one(s, args.depth, args.steps, args.batch, args.seed, d))
    cols = list(rows[0])
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{(f'{v:.3g}' if isinstance(v, float) else v):>18}" for v in r.values()))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
