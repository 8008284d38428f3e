"""Quick start: fit G~ to a low-rank matrix, compare with truncated SVD, save, reload, apply.

python examples/quickstart.py [--size 256] [--depth 24] [--steps 2000]
"""

from __future__ import annotations

import argparse

import torch

import sparsefit


class Print:
    """A minimal callback: the library never prints, so the script does."""

    def on_step(self, s: sparsefit.StepInfo) -> None:
        if s.step % 500 == 0 or s.step == s.total:
            print(f"step {s.step:>6}/{s.total}  mse {s.mse:.3e}  ({s.seconds:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="lowrank.safetensors")
    args = ap.parse_args()

    a = sparsefit.synth("lowrank", size=args.size, k=3, seed=0)
    result = sparsefit.fit(a, sparsefit.FitConfig(depth=args.depth, steps=args.steps, batch=256), [Print()])
    m = result.metrics
    print(
        f"relative error {m.relative_error:.3e} ({m.relative_error_method}); "
        f"{m.params} parameters vs {m.dense_params} dense; "
        f"truncated SVD at the same budget: rank {m.svd_rank}, error {m.svd_relative_error:.3e}"
    )
    result.save(args.out)

    layer = sparsefit.SparseLinear.from_file(args.out)
    x = torch.randn(4, args.size)
    y = layer(x)
    exact = x.double() @ torch.from_numpy(a).t()
    print(f"SparseLinear on 4 vectors: relative error {float((y.double() - exact).norm() / exact.norm()):.3e}")


if __name__ == "__main__":
    main()
