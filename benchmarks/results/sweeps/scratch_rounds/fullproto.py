import sys, time, math, json, torch
from sparsefit import FitConfig
from sparsefit.operator import GTilde
from sparsefit.fitting import _sweep, ExactProbes
from sparsefit.targets import as_target
d = torch.load(sys.argv[1]); sweeps, rounds, rsteps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
blocks, perms, a = d['blocks'], d['perms'], d['a']
out, k = a.shape; n = perms.shape[1]
op = GTilde(k, out, perms.shape[0], n, perms=perms, blocks=blocks.float())
tgt = as_target(a.float().numpy()); tgt.prepare(torch.device('cpu'), torch.float32)
ex = ExactProbes(tgt, torch.device('cpu'), torch.float32)
cfg = FitConfig(depth=perms.shape[0], width=n, sweeps=sweeps, rounds=rounds, round_steps=rsteps)
norm = float((a**2).sum()) / out
log = []
class L:
    def on_sweep(self, s): log.append((s.sweep, (s.mse / norm) ** .5, round(s.seconds, 1), s.round))
t0 = time.perf_counter()
kept, _ = _sweep(op, ex, cfg, [L()], None)
rel = float(((op.to_dense().double() - a) ** 2).sum() / (a ** 2).sum()) ** .5
res = dict(start=sys.argv[1], sweeps=sweeps, rounds=rounds, round_steps=rsteps, kept=kept, rel=rel, seconds=round(time.perf_counter() - t0, 1), log=log)
print(json.dumps(res), flush=True)
