import sys, time, torch, sparsefit
sys.path.insert(0, '/tmp/pcg')
from pcg import make_solve
from sparsefit import als
torch.set_num_threads(2)
kind, size, depth, steps, nsw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
A = sparsefit.synth(kind, size=size, k=3, seed=0) if kind != 'perm' else sparsefit.synth(kind, size=size, seed=0)
A = torch.as_tensor(A, dtype=torch.float64)
r = sparsefit.fit(A.numpy(), sparsefit.FitConfig(depth=depth, steps=steps, batch=min(size,1024), seed=0, sweeps=0))
op = r.operator
blocks = op.blocks.detach().to(torch.float64).clone(); perms = op.perms.long()
torch.save((blocks, perms), f'/tmp/pcg/op_{kind}_{size}_{depth}_{steps}.pt')
na = float((A**2).sum()); out = A.shape[0]
print('adam', r.metrics.relative_error, flush=True)
orig = als._solve_layer
for name in ['exact'] + [f'pcg{k}' for k in map(int, sys.argv[6].split(','))]:
    als._solve_layer = orig if name == 'exact' else make_solve(int(name[3:]))
    b1 = blocks.clone(); t = time.perf_counter()
    ls = als_sweeps = als.als_sweeps(b1, perms, A, nsw)
    print(name, round(time.perf_counter()-t, 1), 's', [round((l*out/na)**.5, 4) for l in ls], flush=True)
