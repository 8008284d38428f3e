"""The verb, :func:`distill`: the stages (layer-wise, then end to end), the optimiser and its
schedule, validation and keeping the best parameters, checkpoints and resuming, Ctrl-C, and the
callbacks."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError
from ..spill import SpillStore
from .attention import find_attention
from .config import DistillConfig, DistillEval, DistillReport, DistillStep, lr_factor
from .data import _as_samples, _augment, _gather, _inner_tokens, batch_order, make_batches, split_samples
from .losses import _e2e_loss, _layer_loss
from .models import _first, find_blocks, replaced_modules, train_only, trainable_parameters
from .precision import BF16_WIDTH_MULTIPLE, bfloat16_linear_weights, runs_in_bfloat16
from .state import STATE_FORMAT, STATE_VERSION, _fingerprint, _load_state, _save_state
from .teacher import _run_teacher, _Teacher, _TeacherCache, pool


def distill(
    teacher: nn.Module,
    student: nn.Module,
    calibration: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    config: DistillConfig | None = None,
    *,
    state_path: str | os.PathLike[str] | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Any] = (),
) -> DistillReport:
    """Train ``student`` in place to reproduce ``teacher``'s hidden states on ``calibration``.

    teacher: the original model (left untouched). student: the same architecture with some
    ``nn.Linear`` modules replaced (by :class:`~sparsefit.SparseLinear`, low-rank modules, …; the
    replaced ones are found by comparing module types). Both are called as ``model(**batch)`` and
    must return the last hidden state first (``last_hidden_state`` or ``output[0]``).
    calibration: tokenised text, ``{input_ids, attention_mask, …}: (N, T)`` (right padding), or a
    list of such batches. Never pass held-out evaluation text.
    state_path: a checkpoint file to write (atomically) and to resume from when its settings match.
    spill_dir: the folder of the temporary file that holds the teacher's activations beyond
    ``config.cache_mb`` (``None``: the system's temporary folder; the file is deleted as soon as it
    is made and its space comes back when distillation ends).
    Returns a :class:`DistillReport`; the student ends with the best parameters on the validation split.
    """
    config = (config or DistillConfig()).resolved()
    if teacher is student:
        raise SparsefitError("teacher and student are the same module; distil a compressed copy")
    samples = _as_samples(calibration)
    lengths = samples["attention_mask"].sum(1)
    n = int(lengths.shape[0])
    train_idx, val_idx = split_samples(n, config)
    train_batches = make_batches(train_idx, lengths, config.batch)
    val_batches = make_batches(val_idx, lengths, config.batch)
    blocks_path, t_blocks = find_blocks(teacher, config.blocks)
    s_blocks = student.get_submodule(blocks_path) if blocks_path else student
    if not isinstance(s_blocks, nn.ModuleList) or len(s_blocks) != len(t_blocks):
        raise SparsefitError(f"student and teacher differ in their blocks {blocks_path!r}")
    params = trainable_parameters(teacher, student, config, blocks_path)
    attention = find_attention(teacher, t_blocks, config.attention_weight)
    prefix = f"{blocks_path}." if blocks_path else ""
    by_block: list[list[str]] = [[] for _ in s_blocks]
    for name in params:
        if name.startswith(prefix):
            i = name[len(prefix) :].split(".", 1)[0]
            if i.isdigit() and int(i) < len(by_block):
                by_block[int(i)].append(name)
    layer_blocks = [i for i, names in enumerate(by_block) if names] if config.layer_steps else []
    # With the teacher's inputs the blocks' losses are independent: one stage trains them all, each
    # teacher pass serving every block. Fed the student's own upstream outputs, block i must wait
    # for blocks 0..i-1, so each block gets a stage of its own (``block`` None: all blocks).
    layer_stages = [None] if config.layer_inputs == "teacher" and layer_blocks else layer_blocks
    stages: list[tuple[str, int | None, int]] = [("layer", i, int(config.layer_steps or 0)) for i in layer_stages]
    if int(config.steps) > 0:
        stages.append(("e2e", None, int(config.steps)))
    total = sum(s[2] for s in stages)
    device = next(iter(params.values())).device
    low_precision = runs_in_bfloat16(config.teacher_dtype, device)
    low_student = runs_in_bfloat16(config.student_dtype, device)
    multiple = BF16_WIDTH_MULTIPLE if low_precision or low_student else 1
    teacher_weights = bfloat16_linear_weights(teacher) if low_precision else None

    was_training = (teacher.training, student.training)
    grad_flags = {n: p.requires_grad for n, p in student.named_parameters()}
    train_only(teacher, student, params)
    # step sizes relative to each tensor's starting RMS (floored so zero-initialised biases move)
    scales = {n: max(float(p.detach().double().square().mean().sqrt()), 1e-3) for n, p in params.items()}

    def to_dev(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in b.items()}

    train_data = [to_dev(_gather(samples, b, multiple)) for b in train_batches]
    token_pool = _inner_tokens(_gather(samples, train_idx)) if config.augment > 0 else None
    cache = _TeacherCache(SpillStore(config.cache_mb * 2**20, config.spill_mb * 2**20, spill_dir))

    def teacher_for(bi: int) -> _Teacher:
        t = cache.get(bi)
        if t is None:
            t = _run_teacher(teacher, t_blocks, train_data[bi], attention, low_precision, teacher_weights)
            cache.put(bi, t)
        return t

    val_data = [to_dev(_gather(samples, b)) for b in val_batches]
    with torch.no_grad():
        val_ref = [pool(_first(teacher(**b)), b["attention_mask"]) for b in val_data]

    @torch.no_grad()
    def validate() -> float:
        cos = [
            nn.functional.cosine_similarity(pool(_first(student(**b)), b["attention_mask"]), r, dim=-1)
            for b, r in zip(val_data, val_ref, strict=True)
        ]
        return float(torch.cat(cos).double().mean())

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in params.items()}

    def restore(state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    spath = Path(state_path) if state_path is not None else None
    fp = _fingerprint(config, params, samples)
    state = _load_state(spath, fp) if spath is not None else None
    resumed = state is not None
    if state is not None:
        restore(state["params"])
        stage_i, step_i = int(state["stage"]), int(state["step"])
        best, best_metric, best_at = state["best"], float(state["best_metric"]), int(state["best_at"])
        metric_before, history = float(state["metric_before"]), list(state["history"])
        opt_state = state["optimizer"]
        elapsed0 = float(state["seconds"])
    else:
        stage_i = step_i = 0
        metric_before = validate()
        best, best_metric, best_at, history = snapshot(), metric_before, 0, []
        opt_state = None
        elapsed0 = 0.0

    def done_before(si: int) -> int:
        return sum(s[2] for s in stages[:si])

    info = {
        "stages": [(s[0], s[1], s[2]) for s in stages],
        "total": total,
        "train_samples": len(train_idx),
        "val_samples": len(val_idx),
        "trainable_params": sum(p.numel() for p in params.values()),
        "metric_before": metric_before,
        "resumed": resumed,
        "done": done_before(stage_i) + step_i,
        "config": config.to_dict(),
    }
    _emit(callbacks, "on_start", info)
    t0 = time.perf_counter()
    interrupted = False

    def checkpoint(si: int, step: int, opt: torch.optim.Optimizer | None) -> None:
        if spath is None:
            return
        _save_state(
            spath,
            {
                "format": STATE_FORMAT,
                "format_version": STATE_VERSION,
                "fingerprint": fp,
                "stage": si,
                "step": step,
                "params": snapshot(),
                "optimizer": opt.state_dict() if opt is not None else None,
                "best": best,
                "best_metric": best_metric,
                "best_at": best_at,
                "metric_before": metric_before,
                "history": history,
                "seconds": elapsed0 + time.perf_counter() - t0,
            },
        )

    def consider(stage: str, block: int | None, done: int) -> None:
        nonlocal best, best_metric, best_at
        metric = validate()
        if metric > best_metric:
            best, best_metric, best_at = snapshot(), metric, done
        history.append({"stage": stage, "block": block, "done": done, "metric": metric})
        _emit(callbacks, "on_eval", DistillEval(stage, block, done, metric, best_metric))

    try:
        while stage_i < len(stages):
            kind, block, n_steps = stages[stage_i]
            trained = (layer_blocks if block is None else [block]) if kind == "layer" else []
            names = [n for i in trained for n in by_block[i]] if kind == "layer" else list(params)
            opt = _adam(
                [{"params": [params[n]], "lr": config.lr * scales[n], "base": config.lr * scales[n]} for n in names]
            )
            if opt_state is not None:
                opt.load_state_dict(opt_state)
                opt_state = None
            if kind == "e2e" and token_pool is not None:
                cache.clear()  # an augmented stage never reads it: give the memory back
            warm = max(1, min(50, n_steps // 10))
            while step_i < n_steps:
                epoch, pos = divmod(step_i, len(train_batches))
                bi = batch_order(len(train_batches), config.seed, stage_i, epoch)[pos]
                if token_pool is not None and kind == "e2e":
                    # a fresh variant of the batch each step (seeded by the step: resumable, same bytes)
                    batch = _augment(train_data[bi], token_pool, config.augment, (config.seed, stage_i, step_i))
                    t = _run_teacher(teacher, t_blocks, batch, attention, low_precision, teacher_weights)
                else:
                    t = teacher_for(bi)
                    batch = train_data[bi]
                frac = lr_factor(step_i, n_steps, warm, config.decay)
                for g in opt.param_groups:
                    g["lr"] = g["base"] * frac
                if kind == "layer":
                    loss = torch.zeros((), device=device)
                    for i in trained:
                        hidden = t.hidden[i]
                        if config.layer_inputs == "student":
                            with torch.no_grad():  # blocks before this one are final for this stage
                                hidden = t.hidden[0]
                                for b in range(i):
                                    hidden = t.calls[b](s_blocks[b], hidden)
                        loss = loss + _layer_loss(
                            s_blocks, i, hidden, t, batch["attention_mask"], config, attention, low_student
                        )
                else:
                    loss = _e2e_loss(student, s_blocks, batch, t, config, attention, low_student)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step_i += 1
                loss_value = float(loss.detach())
                done = done_before(stage_i) + step_i
                _emit(
                    callbacks,
                    "on_step",
                    DistillStep(
                        kind,
                        block,
                        step_i,
                        n_steps,
                        done,
                        total,
                        loss_value,
                        config.lr * frac,
                        elapsed0 + time.perf_counter() - t0,
                    ),
                )
                if kind == "e2e" and step_i % config.eval_every == 0 and step_i < n_steps:
                    consider(kind, block, done)
                if step_i % config.checkpoint_every == 0 and step_i < n_steps:
                    checkpoint(stage_i, step_i, opt)
            consider(kind, block, done_before(stage_i) + n_steps)
            stage_i, step_i = stage_i + 1, 0
            checkpoint(stage_i, 0, None)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        cache.clear()
        restore(best)
        for n, p in student.named_parameters():
            p.requires_grad_(grad_flags[n])
        teacher.train(was_training[0])
        student.train(was_training[1])

    report = DistillReport(
        config=config.to_dict(),
        metric_before=metric_before,
        metric_after=best_metric,
        best_at=best_at,
        steps_done=done_before(stage_i) + step_i if stage_i < len(stages) else total,
        steps_total=total,
        seconds=elapsed0 + time.perf_counter() - t0,
        interrupted=interrupted,
        resumed=resumed,
        train_samples=len(train_idx),
        val_samples=len(val_idx),
        trainable_params=sum(p.numel() for p in params.values()),
        trained_modules=len(replaced_modules(teacher, student)),
        cached_batches=cache.kept["memory"],
        spilled_batches=cache.kept["disk"],
        batches=len(train_batches),
        attention_weight=0.0 if attention is None else attention.weight,
        teacher_dtype="bfloat16" if low_precision else "float32",
        student_dtype="bfloat16" if low_student else "float32",
        history=history,
    )
    _emit(callbacks, "on_end", report)
    return report


def _adam(groups: list[dict[str, Any]]) -> torch.optim.Adam:
    """Adam over ``groups``: the fused implementation (one pass over all tensors: about 2× faster
    than the per-tensor loop for MiniLM's 5.3M trained parameters on 2 CPU cores,
    ``benchmarks/bench_distill_step.py``) where this torch build has it for the parameters' device,
    else the default one."""
    kwargs: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-10}
    try:
        return torch.optim.Adam(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused Adam for this device or torch version
        return torch.optim.Adam(groups, **kwargs)


def _emit(callbacks: Sequence[Any], name: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)
