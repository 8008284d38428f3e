import sys, time, torch, sparsefit
from sparsefit.config import Phase
from sparsefit.autosize import extend_operator
size = int(sys.argv[1]); d1, d2 = int(sys.argv[2]), int(sys.argv[3]); s1, s2 = int(sys.argv[4]), int(sys.argv[5])
targets = sys.argv[6].split(","); seeds = [int(s) for s in sys.argv[7].split(",")]
reg2 = float(sys.argv[8]) if len(sys.argv) > 8 else 0.03
K = {"band3": ("band", 3), "sparse3": ("sparse", 3), "perm": ("perm", 1), "lowrank3": ("lowrank", 3)}
for tname in targets:
    for seed in seeds:
        a = sparsefit.synth(K[tname][0], size=size, k=K[tname][1], seed=seed)
        t0 = time.perf_counter()
        r1 = sparsefit.fit(a, sparsefit.FitConfig(depth=d1, steps=s1, batch=size, schedule="anneal", loss="exact", seed=seed))
        op = extend_operator(r1.operator, d2, seed=seed + 7)
        ph = (Phase(0.75, 1e-2, reg2), Phase(0.25, 1e-3, reg2))
        r2 = sparsefit.fit(a, sparsefit.FitConfig(depth=d2, steps=s2, batch=size, phases=ph, loss="exact", seed=seed), init=op)
        print(tname, seed, f"{d1}x{s1} -> {d2}x{s2}", "stage1 %.4f" % r1.metrics.relative_error, "final %.4f" % r2.metrics.relative_error, "%.0fs" % (time.perf_counter()-t0), flush=True)
