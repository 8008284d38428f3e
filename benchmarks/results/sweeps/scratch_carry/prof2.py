import time, torch, sys
sys.path.insert(0,'/tmp/oldals')
import als_old
from sparsefit import als, GTilde
from sparsefit.kernels import sweep
torch.manual_seed(0)
n, out = 2048, 1024; h = n//2
q = torch.randn(out, n, dtype=torch.float64); c = torch.randn(n, n, dtype=torch.float64); c = c@c.t()
u = torch.randn(out, n, dtype=torch.float64); b = torch.randn(h, 2, 2, dtype=torch.float64); p = torch.randperm(n)
def t(f, r=5):
    f(); ts=[]
    for _ in range(r):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return f'{min(ts)*1e3:.1f}'
print("QtQ", t(lambda: q.t()@q))
print("congruence fused", t(lambda: sweep.congruence(c, b, p)), "ref", t(lambda: sweep.congruence_reference(c, b, p)))
print("mix_gather fused Q", t(lambda: sweep.mix_gather(q, b, p)), "ref", t(lambda: sweep.mix_gather_reference(q, b, p)))
print("layer_system", t(lambda: als._layer_system(q, c, c, u)))
print("solve_layer", t(lambda: als._solve_layer(q, c, c, u, b)))
print("hprod", t(lambda: sweep.hessian_product(c, c, b)))
a = torch.randn(1024, 1024, dtype=torch.float64)
g = GTilde(1024, 1024, 40, 2048, seed=1, dtype=torch.float64)
b0 = g.blocks.detach().clone()
for name, f in (("new", als.als_sweeps), ("old", als_old.als_sweeps), ("new", als.als_sweeps), ("old", als_old.als_sweeps)):
    bb = b0.clone(); t0 = time.perf_counter(); l = f(bb, g.perms, a, 1); print(name, "sweep d40 w2048", f"{time.perf_counter()-t0:.2f}s", l[-1])
