"""Scratch study (2026-12-05, issue 14): does a near-identity start beat Haar-random blocks?

    python benchmarks/bench_init.py SIZE DEPTH STEPS TARGETS INITS [SCHEDULE] [LR]
    e.g. NUMBA_NUM_THREADS=1 python benchmarks/bench_init.py 256 32 4000 sparse3,band3 haar,rot:0.2,rot:0.3,rot:0.5

INITS: ``haar`` (the default), ``rot:S`` (rotations by N(0, S²) angles), ``swap:S`` (identity or
swap, plus N(0, S²) angles). Exact loss, seed 0. Prints one JSON line per fit. The study's figures
are in benchmarks/NOTES.md (2026-12-05); no init beat Haar blocks consistently.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from bench_quality import TARGETS  # benchmarks/ is on the path when run as a script

import sparsefit
from sparsefit.operator import GTilde


def make_init(name: str, size: int, depth: int, seed: int) -> GTilde:
    """A width-``2·size`` operator whose blocks start as ``name`` says."""
    op = GTilde(size, size, depth, 2 * size, seed=seed)
    if name == "haar":
        return op
    kind, sigma = name.split(":")
    g = torch.Generator().manual_seed(1000 + seed)
    d, h = op.blocks.shape[:2]
    theta = torch.randn(d, h, generator=g, dtype=torch.float64) * float(sigma)
    if kind == "swap":  # identity or swap at random, plus the noise
        theta = theta + (math.pi / 2) * (torch.rand(d, h, generator=g, dtype=torch.float64) < 0.5)
    c, s = torch.cos(theta), torch.sin(theta)
    rotations = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    with torch.no_grad():
        op.blocks.copy_(rotations.float())
    return op


def main(argv: list[str]) -> None:
    if len(argv) < 5:
        raise SystemExit("usage: bench_init.py SIZE DEPTH STEPS TARGETS INITS [SCHEDULE] [LR]")
    size, depth, steps = int(argv[0]), int(argv[1]), int(argv[2])
    kinds, inits = argv[3].split(","), argv[4].split(",")
    schedule = argv[5] if len(argv) > 5 else "hold-anneal"
    lr = float(argv[6]) if len(argv) > 6 else 0.01
    for kind in kinds:
        name, k = TARGETS[kind]
        target = sparsefit.synth(name, size=size, k=k, seed=0)
        for init in inits:
            t0 = time.time()
            config = sparsefit.FitConfig(
                depth=depth, steps=steps, batch=size, loss="exact", schedule=schedule, seed=0, lr=lr, sweeps=0
            )
            r = sparsefit.fit(target, config, init=make_init(init, size, depth, 0))
            row = dict(
                kind=kind,
                init=init,
                depth=depth,
                size=size,
                steps=steps,
                sched=schedule,
                lr=lr,
                err=round(r.metrics.relative_error, 5),
                svd=round(r.metrics.svd_relative_error, 4),
                s=round(time.time() - t0, 1),
            )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
