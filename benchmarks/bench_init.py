"""Scratch study (2026-12-05, issue 14): does a near-identity start beat Haar-random blocks?

Usage: python benchmarks/bench_init.py SIZE DEPTH STEPS TARGETS INITS [SCHEDULE] [LR]
  e.g. NUMBA_NUM_THREADS=1 python benchmarks/bench_init.py 256 32 4000 sparse3,band3 haar,rot:0.2,rot:0.3,rot:0.5
INITS: haar (the default), rot:S (rotations by N(0, S^2) angles), swap:S (identity or swap, plus
N(0, S^2) angles). Exact loss, seed 0. Prints one JSON line per fit.
"""
import math, sys, json, time, torch, sparsefit
from sparsefit.operator import GTilde
size=int(sys.argv[1]); depth=int(sys.argv[2]); steps=int(sys.argv[3]); kinds=sys.argv[4].split(","); inits=sys.argv[5].split(",")
sched = sys.argv[6] if len(sys.argv)>6 else "hold-anneal"
lr = float(sys.argv[7]) if len(sys.argv)>7 else 0.01
def make_init(name, seed):
    op = GTilde(size, size, depth, 2*size, seed=seed)
    if name == "haar": return op
    g = torch.Generator().manual_seed(1000+seed)
    D,h = op.blocks.shape[:2]
    kind, sig = name.split(":")
    sig = float(sig)
    th = torch.randn(D,h,generator=g,dtype=torch.float64)*sig
    if kind == "swap":   # random identity-or-swap plus noise
        th = th + (math.pi/2)*(torch.rand(D,h,generator=g,dtype=torch.float64)<0.5)
    c,s = torch.cos(th), torch.sin(th)
    b = torch.stack([torch.stack([c,-s],-1),torch.stack([s,c],-1)],-2)
    with torch.no_grad(): op.blocks.copy_(b.float())
    return op
for kind in kinds:
    k = {"sparse3":("sparse",3),"band3":("band",3),"lowrank3":("lowrank",3),"perm":("perm",1)}[kind]
    A = sparsefit.synth(k[0], size=size, k=k[1], seed=0)
    for name in inits:
        t0=time.time()
        cfg = sparsefit.FitConfig(depth=depth, steps=steps, batch=size, loss="exact", schedule=sched, seed=0, lr=lr)
        r = sparsefit.fit(A, cfg, init=make_init(name, 0))
        print(json.dumps(dict(kind=kind, init=name, depth=depth, size=size, steps=steps, sched=sched, lr=lr, err=round(r.metrics.relative_error,5), svd=round(r.metrics.svd_relative_error,4), s=round(time.time()-t0,1))), flush=True)
