import sys, time, torch
from sparsefit import als
from sparsefit.kernels.sweep import hessian_product
RHO = [0.0]
orig = als._solve_layer
def solve(q, m, c, u, b_old, iters=als.CG_ITERS):
    rho = RHO[0]
    if rho == 0: return orig(q, m, c, u, b_old, iters)
    h = b_old.shape[0]
    rhs, diag_blocks, _ = als._layer_system(q, m, c, u)
    mu = rho * float(diag_blocks.diagonal(dim1=1, dim2=2).mean())
    eye = torch.eye(4, dtype=m.dtype)
    precond = torch.linalg.inv(diag_blocks + (1e-6 * diag_blocks.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None] + mu) * eye)
    A = lambda v: hessian_product(m, c, v) + mu * v
    P = lambda r: torch.bmm(precond, r.reshape(h, 4, 1)).reshape(h, 2, 2)
    x = b_old.clone(); r = rhs - A(x); z = P(r); p = z.clone(); rz = float((r*z).sum())
    for _ in range(iters):
        ap = A(p); pap = float((p*ap).sum())
        if not pap > 0: break
        st = rz / pap; x.add_(p, alpha=st); r.sub_(ap, alpha=st); z = P(r)
        rzn = float((r*z).sum()); p = z.add_(p, alpha=rzn/rz); rz = rzn
    return x
als._solve_layer = solve
d = torch.load(sys.argv[1]); nsw = int(sys.argv[2]); mode = sys.argv[3]; rho0 = float(sys.argv[4]); nr = int(sys.argv[5])
blocks, perms, a = d['blocks'].clone(), d['perms'], d['a']
norm = float((a**2).sum()) / a.shape[0]
hist = [als.als_sweeps(blocks, perms, a, 0)[0]]; t0 = time.perf_counter()
best = (hist[0], blocks.clone())
for s in range(nsw):
    if s < nr:
        RHO[0] = rho0 if mode == 'fixed' else rho0 * (1e-3) ** (s / max(1, nr - 1))
    else:
        RHO[0] = 0.0
    L = als.als_sweeps(blocks, perms, a, 1)[-1]
    hist.append(L)
    if L < best[0]: best = (L, blocks.clone())
rel = [(h / norm) ** 0.5 for h in hist]
print(sys.argv[1].split('start_')[1][:-3], mode, rho0, nr, 'rel', ' '.join(f'{r:.4f}' for r in rel[::5]), f'final {rel[-1]:.5f} best {(best[0]/norm)**.5:.5f} time {time.perf_counter()-t0:.1f}s', flush=True)
