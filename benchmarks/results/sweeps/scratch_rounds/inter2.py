import sys, time, torch, sparsefit
from sparsefit import als
from sparsefit.operator import GTilde
from sparsefit.config import Phase
d = torch.load(sys.argv[1]); cycles = int(sys.argv[2]); S = int(sys.argv[3]); M = int(sys.argv[4]); lr = float(sys.argv[5]); mode = sys.argv[6]
blocks, perms, a = d['blocks'].clone(), d['perms'], d['a']
out, k = a.shape; n = perms.shape[1]
norm = float((a**2).sum()) / out
rel = lambda L: (L / norm) ** 0.5
t0 = time.perf_counter(); log = []
g = torch.Generator().manual_seed(0)
for c in range(cycles):
    L = als.als_sweeps(blocks, perms, a, S)[-1]; log.append(f's{rel(L):.4f}')
    if c == cycles - 1: break
    if mode == 'adam':
        op = GTilde(k, out, perms.shape[0], n, perms=perms, blocks=blocks.float())
        cfg = sparsefit.FitConfig(depth=perms.shape[0], width=n, steps=M, batch=k, loss='exact', sweeps=0, phases=(Phase(1.0, lr, 0.0),), seed=c)
        r = sparsefit.fit(a.float().numpy(), cfg, init=op)
        nb = r.operator.blocks.detach().double().clone()
        log.append(f'k{rel(als.als_sweeps(nb, perms, a, 0)[0]):.4f}{"=" if torch.equal(nb.float(), blocks.float()) else ""}')
        blocks = nb
    elif mode == 'f32':
        blocks = blocks.float().double()
    elif mode == 'noise':
        blocks = blocks + lr * blocks.abs().mean() * torch.randn(blocks.shape, generator=g, dtype=blocks.dtype)
        log.append(f'n{rel(als.als_sweeps(blocks, perms, a, 0)[0]):.4f}')
print(sys.argv[1].split('start_')[1][:-3], sys.argv[2:], ' '.join(log), f'time {time.perf_counter()-t0:.1f}s', flush=True)
