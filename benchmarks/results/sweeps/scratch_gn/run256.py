import sys, time, torch, sparsefit
sys.path.insert(0, '/tmp/gn')
from gn2 import gn_lm
from sparsefit.als import als_sweeps
torch.set_num_threads(2)
kind, depth, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = int(sys.argv[4]) if len(sys.argv) > 4 else 256
A = sparsefit.synth(kind, size=size, k=3, seed=0) if kind != 'perm' else sparsefit.synth(kind, size=size, seed=0)
A = torch.as_tensor(A, dtype=torch.float64)
r = sparsefit.fit(A.numpy(), sparsefit.FitConfig(depth=depth, steps=steps, batch=size, seed=0))
op = r.operator
blocks = op.blocks.detach().to(torch.float64).clone(); perms = op.perms.long()
na = float((A**2).sum())
out = A.shape[0]
print('adam', r.metrics.relative_error, flush=True)
b1 = blocks.clone(); t = time.perf_counter()
ls = als_sweeps(b1, perms, A, int(sys.argv[5]) if len(sys.argv) > 5 else 30)
print('sweeps', [round((l*out/na)**.5, 4) for l in ls][::5], ls and round(time.perf_counter()-t,1), flush=True)
tl = time.perf_counter() - t
th, hist = gn_lm(blocks, perms, A, 10000, cg_iters=int(sys.argv[6]) if len(sys.argv) > 6 else 50, time_limit=tl, log=sys.stderr)
print('gn', [(i, round((l*out/na)**.5, 4), round(s,1)) for i, l, s in hist][::max(1,len(hist)//12)], (hist[-1][1]*out/na)**.5, flush=True)
