"""Scratch check (2026-12-07, fourth session): the fused step's loss and gradient for every
segment length the tuner may choose, at the README's and the note's shapes (float32, random
blocks). Prints one line per length and writes them to seglen_bytes.json beside this script;
the sums and the gradient digests must agree.

    python benchmarks/results/rounds/seglen_bytes.py
"""

import hashlib
import json
from pathlib import Path

import torch

from sparsefit.kernels import cpu

torch.manual_seed(0)
rows = []
for depth, n, batch in [(24, 2048, 256), (40, 2048, 1024), (24, 1024, 256)]:
    blocks = torch.randn(depth, n // 2, 2, 2) * 0.7
    perms = torch.stack([torch.randperm(n) for _ in range(depth)])
    x, t = torch.randn(batch, n), torch.randn(batch, 1024)
    for s in cpu.segment_candidates(depth, n, torch.float32):
        sq, gacc = cpu._run_kernel(x, t, blocks, perms, 1024, s)
        digest = hashlib.sha256(gacc.tobytes()).hexdigest()[:12]
        rows.append(dict(depth=depth, width=n, batch=batch, seglen=s, sum_sq=sq, grad_sha256_12=digest))
        print(f"depth {depth} width {n} batch {batch} seglen {s}: {sq!r} {digest}")
Path(__file__).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
