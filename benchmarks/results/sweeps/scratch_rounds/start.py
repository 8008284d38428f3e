import sys, torch, sparsefit
size, depth, steps, target, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sys.path.insert(0, '/work/main/benchmarks')
from bench_quality import TARGETS
kind, k = TARGETS[target]
a = sparsefit.synth(kind, size=size, k=k, seed=seed)
cfg = sparsefit.FitConfig(depth=depth, steps=steps, batch=size, seed=seed, sweeps=0)
r = sparsefit.fit(a, cfg)
torch.save({'blocks': r.operator.blocks.detach().double(), 'perms': r.operator.perms, 'a': torch.as_tensor(a).double()}, f'/tmp/proto/start_{target}_{size}_d{depth}_s{seed}.pt')
print('saved', r.relative_error if hasattr(r,'relative_error') else '')
