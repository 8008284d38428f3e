import sys, time, torch, sparsefit
from sparsefit import als
from sparsefit.operator import GTilde
from sparsefit.config import Phase
d = torch.load(sys.argv[1]); cycles = int(sys.argv[2]); S = int(sys.argv[3]); M = int(sys.argv[4]); lr = float(sys.argv[5]); reg = float(sys.argv[6])
blocks, perms, a = d['blocks'].clone(), d['perms'], d['a']
out, k = a.shape; n = perms.shape[1]
norm = float((a**2).sum()) / out
S0 = int(sys.argv[7]) if len(sys.argv) > 7 else S
t0 = time.perf_counter(); hist = []
for c in range(cycles):
    hist.append(als.als_sweeps(blocks, perms, a, S0 if c == 0 else S)[-1])
    if M and c < cycles - 1:
        op = GTilde(k, out, perms.shape[0], n, perms=perms, blocks=blocks.float())
        cfg = sparsefit.FitConfig(depth=perms.shape[0], width=n, steps=M, batch=k, loss='exact', sweeps=0, phases=(Phase(1.0, lr, reg),), seed=c)
        r = sparsefit.fit(a.float().numpy(), cfg, init=op)
        blocks = r.operator.blocks.detach().double().clone()
        hist.append(als.als_sweeps(blocks, perms, a, 0)[0])
rel = [(h / norm) ** 0.5 for h in hist]
print(sys.argv[1].split('start_')[1][:-3], sys.argv[2:], ' '.join(f'{r:.4f}' for r in rel), f'final {rel[-1]:.5f} time {time.perf_counter()-t0:.1f}s', flush=True)
