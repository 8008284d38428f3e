"""Peak memory of ``sparsefit compress`` against shard size and checkpoint size.

Writes a synthetic sharded checkpoint (``--shards`` × about ``--shard-mb`` MB of float32 linear
weights, Hugging Face layout with an index), compresses the first linear of each shard with very few fit steps (and copies all the other
tensors through, so every shard is streamed) in a fresh
child process per run (so each peak is its own), and prints a table of the child's peak RSS next
to the shard and total sizes. Compression streams one shard and one weight at a time, so the
peak should follow the shard size, not the total.

Example
-------
    python benchmarks/bench_compress_memory.py --shards 4 --shard-mb 100 --json bench_compress_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import sparsefit
from sparsefit.compress import CompressConfig, compress_checkpoint
src, out, depth, steps, include = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
cfg = CompressConfig(depth=depth, max_params_ratio=1.0, include=(include,), fit=sparsefit.FitConfig(steps=steps, batch=16))
rep = compress_checkpoint(src, out, cfg)
print(json.dumps({"seconds": time.perf_counter() - t, "baseline_kb": base,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "layers": len(rep.layers)}))
"""


def make_checkpoint(folder: Path, shards: int, shard_mb: float, dim: int) -> tuple[int, int]:
    """``shards`` files of ``dim × dim`` float32 linears (plus biases); returns (bytes, layers)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, round(shard_mb * 1e6 / (dim * dim * 4)))
    gen = torch.Generator().manual_seed(0)
    weight_map, total, n = {}, 0, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for _ in range(per_shard):
            part[f"layers.{n}.linear.weight"] = torch.randn(dim, dim, generator=gen) / dim**0.5
            part[f"layers.{n}.linear.bias"] = torch.zeros(dim)
            n += 1
        save_file(part, str(folder / name))
        total += (folder / name).stat().st_size
        weight_map.update({k: name for k in part})
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return total, n


def run_child(src: Path, out: Path, depth: int, steps: int, include: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out), str(depth), str(steps), include],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description="peak RSS of sparsefit compress vs shard and checkpoint size")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mb", type=float, default=100.0)
    ap.add_argument("--dim", type=int, default=2048, help="each linear is dim × dim")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # same shard size, growing checkpoint; then the same checkpoint in fewer, larger shards
        settings = [(1, args.shard_mb), (args.shards, args.shard_mb), (max(1, args.shards // 2), args.shard_mb * 2)]
        for i, (shards, mb) in enumerate(settings):
            src = Path(tmp) / f"ckpt{i}"
            t = time.perf_counter()
            total, layers = make_checkpoint(src, shards, mb, args.dim)
            made = time.perf_counter() - t
            # fit the first linear of each shard (fits cost time, not memory); every shard is still
            # streamed, since its untouched tensors are copied to the output
            per = layers // shards
            include = r"layers\.(" + "|".join(str(s * per) for s in range(shards)) + r")\.linear\.weight"
            res = run_child(src, Path(tmp) / f"out{i}", args.depth, args.steps, include)
            rows.append(
                {
                    "shards": shards,
                    "shard_mb": total / shards / 1e6,
                    "total_mb": total / 1e6,
                    "layers": layers,
                    "baseline_rss_mb": res["baseline_kb"] / 1024,
                    "peak_rss_mb": res["peak_kb"] / 1024,
                    "peak_minus_baseline_mb": (res["peak_kb"] - res["baseline_kb"]) / 1024,
                    "compress_seconds": res["seconds"],
                    "write_seconds": made,
                }
            )
            import shutil

            shutil.rmtree(src)
            shutil.rmtree(Path(tmp) / f"out{i}")
    print("| shards | shard MB | total MB | tensors | peak RSS MB | peak − import baseline MB | compress s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shards']} | {r['shard_mb']:.0f} | {r['total_mb']:.0f} | {r['layers']} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_minus_baseline_mb']:.0f} | {r['compress_seconds']:.1f} |"
        )
    print(f"(benchmark process itself: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB peak)")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
