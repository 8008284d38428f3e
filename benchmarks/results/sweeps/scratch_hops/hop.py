"""Scratch (2026-12-07, fourth session): basin hopping after the default's rounds.

python hop.py START HOPS KIND STRENGTH
  START     a start saved by ../scratch_extrapolation/start.py (blocks after the Adam steps)
  KIND      plain | adam | noise: between hops, nothing / STRENGTH-lr Adam steps (200, exact
            loss, fresh state) / relative Gaussian noise of scale STRENGTH on every block entry
Runs the default's 16 sweeps in 8 rounds first, then HOPS hops of (kick, 4 sweeps in 2 rounds),
keeping a hop only when it ends lower. Prints one JSON line."""

import json
import sys
import time

import torch

from sparsefit import FitConfig
from sparsefit.config import Phase
from sparsefit.fitting import ExactProbes, _steps_between, _sweep
from sparsefit.operator import GTilde
from sparsefit.targets import as_target

d = torch.load(sys.argv[1])
hops, kind, strength = int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
blocks, perms, a = d["blocks"], d["perms"], d["a"]
out, k = a.shape
n = perms.shape[1]
op = GTilde(k, out, perms.shape[0], n, perms=perms, blocks=blocks.float())
tgt = as_target(a.float().numpy())
tgt.prepare(torch.device("cpu"), torch.float32)
ex = ExactProbes(tgt, torch.device("cpu"), torch.float32)
base = FitConfig(depth=perms.shape[0], width=n, sweeps=16, rounds=8, round_steps=200)
hop = base.replace(sweeps=4, rounds=2)


def rel() -> float:
    return float(((op.to_dense().double() - a) ** 2).sum() / (a**2).sum()) ** 0.5


t0 = time.perf_counter()
_sweep(op, ex, base, [], None)
log = [(0, rel(), round(time.perf_counter() - t0, 1))]
gen = torch.Generator().manual_seed(0)
for h in range(1, hops + 1):
    best, before = op.blocks.detach().clone(), log[-1][1]
    if kind == "adam":
        _steps_between(op, base, ex.x, ex.t, Phase(1.0, strength, 0.0), None)
    elif kind == "noise":
        with torch.no_grad():
            op.blocks.mul_(1 + strength * torch.randn(op.blocks.shape, generator=gen))
    _sweep(op, ex, hop, [], None)
    r = rel()
    if r >= before:
        with torch.no_grad():
            op.blocks.copy_(best)
        r = before
    log.append((h, r, round(time.perf_counter() - t0, 1)))
res = dict(start=sys.argv[1], hops=hops, kind=kind, strength=strength, rel=log[-1][1], log=log)
print(json.dumps(res), flush=True)
