import sys, time, torch
from sparsefit import als
d = torch.load(sys.argv[1]); nsw = int(sys.argv[2]); mode = sys.argv[3]
blocks, perms, a = d['blocks'].clone(), d['perms'], d['a']
norm = float((a**2).sum()) / a.shape[0]
loss = lambda b: als.als_sweeps(b, perms, a, 0)[0]
L = loss(blocks); hist = [L]; t0 = time.perf_counter(); acc = 0
alpha = 2.0
for s in range(nsw):
    prev = blocks.clone()
    L = als.als_sweeps(blocks, perms, a, 1)[-1]
    if mode != 'plain' and s >= 1:
        dirn = blocks - prev
        if mode == 'fixed':
            cands = [float(x) for x in sys.argv[4].split(',')]
        else:  # adaptive
            cands = [alpha]
        best = None
        for al in cands:
            tr = prev + al * dirn
            lt = loss(tr)
            if lt < L and (best is None or lt < best[0]):
                best = (lt, al, tr)
        if best:
            L, blocks = best[0], best[2]; acc += 1
            if mode == 'adaptive': alpha = min(alpha * 1.5, 64)
        elif mode == 'adaptive':
            alpha = max(2.0, alpha / 2)
    hist.append(L)
rel = [(h / norm) ** 0.5 for h in hist]
print(mode, sys.argv[4:] , 'rel', ' '.join(f'{r:.4f}' for r in rel[::5]), f'final {rel[-1]:.5f} accepted {acc} time {time.perf_counter()-t0:.1f}s')
