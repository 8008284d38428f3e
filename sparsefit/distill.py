"""Distillation after compression: train a compressed model to reproduce the original's hidden states.

Replacing a model's linears by structured approximations (G~, low rank, …) changes what it
computes. :func:`distill` gives the behaviour back by training the structured parameters (and
optionally biases and norms) of the *student* (the compressed model) against the *teacher* (the
original) on calibration text, in two stages:

1. **layer by layer**: each transformer block of the student, fed the teacher's input to that
   block, is trained to produce the teacher's output of that block (relative masked MSE). Blocks
   are independent here, so errors do not pile up while they are being fixed.
2. **end to end**: the whole student is trained on the teacher's last hidden state (relative
   masked MSE), its mean-pooled embedding (1 − cosine), every intermediate block output (weight
   4) and, where the model's query/key projections can be found, every block's attention maps
   (KL divergence, weight 4; also in stage 1).

Where the hardware multiplies bfloat16 natively, the teacher's target passes and the matrix products
of the student's training steps run in bfloat16 (``teacher_dtype`` / ``student_dtype`` ``"auto"``);
parameters, optimiser, losses, targets and validation stay float32.

Padding never counts: every loss and pool is masked by the batch's ``attention_mask``. The
teacher's activations are cached in memory up to ``cache_mb``, then in a temporary file up to
``spill_mb``, and computed on the fly beyond.

A small validation split carved from the *calibration* samples measures the mean cosine of the
student's mean-pooled embeddings to the teacher's; the student ends with the parameters that
scored best on it (the starting point counts, so distillation never makes that metric worse).
Held-out evaluation text must not be passed here: this function trains on everything it is given
except its own validation split.

Behaviour users rely on: progress through callbacks (``on_start(info)``, ``on_step(DistillStep)``,
``on_eval(DistillEval)``, ``on_end(DistillReport)``); Ctrl-C stops cleanly and keeps the best state
so far (``report.interrupted``); with ``state_path`` a checkpoint is written atomically every
``checkpoint_every`` steps and at each stage's end, and a later call with the same settings resumes
from it (the result is the same bytes as an uninterrupted run); the same seed gives the same bytes
(fixed data order, no dropout: both models run in eval mode).

Example
-------
>>> batches = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")  # doctest: +SKIP
>>> report = distill(teacher, student, dict(batches), DistillConfig(steps="auto"))              # doctest: +SKIP
>>> report.metric_before, report.metric_after                                                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .config import VersionedConfig
from .errors import SparsefitError
from .spill import SpillStore

DISTILL_CONFIG_VERSION = 3
STATE_FORMAT = "sparsefit.distill-state"
STATE_VERSION = 1

#: Choices of :attr:`DistillConfig.layer_inputs`.
LAYER_INPUTS = ("teacher", "student")

#: Choices of :attr:`DistillConfig.teacher_dtype` and :attr:`DistillConfig.student_dtype`.
PRECISIONS = ("auto", "float32", "bfloat16")

#: Choices of :attr:`DistillConfig.decay`.
DECAYS = ("linear", "cosine")

#: Where a pass runs in bfloat16, batch widths are rounded up to a multiple of this many tokens:
#: oneDNN compiles a kernel per new matrix shape, and a width per batch made every step pay for it.
BF16_WIDTH_MULTIPLE = 8

#: The attention-map weight used when ``attention_weight`` is ``None`` (``benchmarks/NOTES.md``,
#: 2026-12-02, fourth part: +0.0007 cosine / +0.003 Spearman at 600 steps on all-MiniLM-L6-v2).
AUTO_ATTENTION_WEIGHT = 4.0

#: The ``auto`` schedule: steps of the layer-wise stage, steps of the end-to-end stage, the token
#: augmentation of the end-to-end stage. Chosen on all-MiniLM-L6-v2 at ``--keep 0.5`` with the builtin
#: corpus (``benchmarks/NOTES.md``): on the 2,000 calibration sentences alone the student learnt them
#: by heart and augmentation helped (2026-12-02); on the 12,000 sentences with the corpus's
#: ``distill`` part it no longer does (2,400 steps: 0.9683 / 0.9701 held-out without it, 0.9676 /
#: 0.9694 with 0.1; 2026-12-04), and without it every batch's targets can be kept (memory, then the
#: spill file), so a step skips the teacher and the same 15 minutes hold 3,800 steps instead of
#: 2,400: held-out cosine 0.970 / Spearman 0.972 in 12.8 minutes on a 2-core AMD EPYC.
AUTO_SCHEDULE: dict[str, Any] = {"layer_steps": 150, "steps": 3800, "augment": 0.0}


@dataclass(frozen=True)
class DistillConfig(VersionedConfig):
    """How to distil.

    steps: steps of the end-to-end stage, or ``"auto"`` (:data:`AUTO_SCHEDULE`).
    layer_steps: steps per transformer block in the layer-wise stage (``None``: the auto value
    when ``steps="auto"``, else ``steps // 4``; ``0`` skips the stage).
    lr: Adam step size *relative to each parameter tensor's RMS at the start* (so factors of any
    scale move at the same rate); a short linear warm-up, then ``decay`` to zero over each stage.
    decay: the step size's decay after the warm-up: ``"linear"`` (reaching zero at the stage's end)
    or ``"cosine"`` (half a cosine period; versions 1–2 of this config, see ``benchmarks/NOTES.md``,
    2026-12-03, for the comparison).
    batch: calibration samples per step (batches group samples of similar length).
    max_length: token cap used when the text is tokenised for distillation (see :func:`tokenize`).
    train_biases: also train the biases inside the blocks; train_norms: also their LayerNorms;
    train_dense: also the weights of the blocks' linear layers that were kept dense (the parameter
    count does not change; on all-MiniLM-L6-v2 at ``--keep 0.5`` with 600 end-to-end steps it took
    the held-out cosine from 0.954 to 0.958).
    Structured factors (every parameter of a replaced layer except its bias) always train.
    seed: data order; the same seed gives the same bytes.
    cache_mb: memory for cached teacher activations (MiB). spill_mb: disk for the ones beyond it
    (MiB), in a temporary file (:func:`distill`'s ``spill_dir``) capped at the free space less
    1 GiB; batches beyond both run through the teacher on the fly. Cached in memory, on disk or
    recomputed, the targets are the same bytes. The cache serves the layer-wise stage and an
    end-to-end stage without augmentation, and is dropped when an augmented one begins. A batch of
    32 MiniLM sentences takes about 12 MiB (the 12,000 builtin sentences about 4.4 GiB); 256 MiB of
    memory holds a small calibration text whole, and 1 GiB had put the command over 3 GB (NOTES,
    2026-12-03).
    val_fraction / val_max: the validation split carved from the calibration samples.
    eval_every / checkpoint_every: end-to-end steps between validations / state files.
    pooled_weight / intermediate_weight: weights of the pooled-embedding cosine and of the
    intermediate block outputs in the end-to-end loss (the last hidden state has weight 1).
    attention_weight: weight of the attention maps in both stages' losses: the KL divergence from
    the teacher's attention distributions (``softmax(q·kᵀ/√d)`` per head, from the outputs of each
    block's query and key projections, padding masked) to the student's, averaged over blocks,
    heads and real query tokens. Needs projections named ``query``/``key`` or ``q_proj``/``k_proj``
    and ``config.num_attention_heads`` on the teacher; the map is the one before any rotary
    position encoding, which is exactly the model's map for absolute-position models (BERT family).
    ``None``: :data:`AUTO_ATTENTION_WEIGHT` where the model has such projections, else 0 (an explicit
    weight > 0 on a model without them is an error).
    augment: each end-to-end step replaces this fraction of the batch's inner tokens by tokens drawn
    from the calibration text (a new draw every step; the teacher then runs on the fly, so the
    cache is not used); ``None``: the auto value when ``steps="auto"`` (0), else 0. It helps where
    the text is small (a few thousand sentences learnt by heart), not on the builtin 12,000.
    layer_inputs: what block ``i`` is fed in the layer-wise stage: ``"teacher"`` (the teacher's
    input to block ``i``; every block learns its own map, so all blocks train together in one stage
    of ``layer_steps`` steps and each teacher pass serves them all) or ``"student"`` (the output of
    the student's already trained blocks ``0..i-1`` on the same batch, so block ``i`` also learns to
    undo the error that reaches it; one stage of ``layer_steps`` steps per block, in order).
    teacher_dtype: the precision of the teacher's forward passes that make the training targets:
    ``"bfloat16"`` (autocast; the targets are stored as float32), ``"float32"``, or ``"auto"``:
    bfloat16 where the hardware multiplies bfloat16 natively (a CUDA device that supports it, a CPU
    with AVX512-BF16 or AMX), else float32. On all-MiniLM-L6-v2 the bfloat16 teacher's pooled
    embeddings keep cosine ≥ 0.9999 to the float32 ones and its forward pass is about 1.35× faster
    on a 2-core AVX512-BF16 CPU (``benchmarks/bench_distill_step.py``). The validation metric always uses the float32 teacher.
    student_dtype: the precision of the student's matrix products in training steps: ``"bfloat16"``
    (autocast around the student's forward pass; its attention, the losses, the parameters and
    Adam stay float32), ``"float32"``, or ``"auto"``: the choice ``teacher_dtype="auto"`` makes.
    Attention is kept in float32 on CPUs because there its bfloat16 backward pass is far slower
    (``benchmarks/NOTES.md``, 2026-12-03).
    blocks: dotted name of the module list holding the transformer blocks (``None``: detected).
    """

    steps: int | str = "auto"
    layer_steps: int | None = None
    lr: float = 0.01
    decay: str = "linear"
    batch: int = 32
    max_length: int = 64
    train_biases: bool = True
    train_norms: bool = True
    train_dense: bool = True
    seed: int = 0
    cache_mb: float = 256.0
    spill_mb: float = 8192.0
    val_fraction: float = 0.05
    val_max: int = 64
    eval_every: int = 100
    checkpoint_every: int = 100
    pooled_weight: float = 1.0
    intermediate_weight: float = 4.0
    attention_weight: float | None = None
    augment: float | None = None
    layer_inputs: str = "teacher"
    teacher_dtype: str = "auto"
    student_dtype: str = "auto"
    blocks: str | None = None

    KIND: ClassVar[str] = "distillation config"
    VERSION: ClassVar[int] = DISTILL_CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.steps, str):
            if self.steps.strip().lower() == "auto":
                object.__setattr__(self, "steps", "auto")
            elif self.steps.strip().isdigit():
                object.__setattr__(self, "steps", int(self.steps))
            else:
                raise SparsefitError(f"distillation steps must be a positive integer or 'auto', got {self.steps!r}")
        if isinstance(self.steps, bool) or (not isinstance(self.steps, int) and self.steps != "auto"):
            raise SparsefitError(f"distillation steps must be a positive integer or 'auto', got {self.steps!r}")
        if isinstance(self.steps, int) and self.steps < 0:
            raise SparsefitError(f"distillation steps must be >= 0, got {self.steps}")
        _check_int("layer steps", self.layer_steps, 0, allow_none=True)
        _check_int("batch", self.batch, 1)
        _check_int("max length", self.max_length, 2)
        _check_int("seed", self.seed, 0)
        _check_int("validation samples (val_max)", self.val_max, 1)
        _check_int("eval_every", self.eval_every, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        for name, v, positive in (
            ("learning rate", self.lr, True),
            ("cache budget (MiB)", self.cache_mb, False),
            ("spill budget (MiB)", self.spill_mb, False),
            ("pooled weight", self.pooled_weight, False),
            ("intermediate weight", self.intermediate_weight, False),
            ("attention weight", 0.0 if self.attention_weight is None else self.attention_weight, False),
        ):
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not (v > 0 if positive else v >= 0)
            ):
                raise SparsefitError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
        if self.augment is not None and (
            isinstance(self.augment, bool) or not isinstance(self.augment, (int, float)) or not (0 <= self.augment < 1)
        ):
            raise SparsefitError(f"augment (fraction of tokens replaced) must be in [0, 1), got {self.augment!r}")
        if self.layer_inputs not in LAYER_INPUTS:
            raise SparsefitError(f"layer_inputs must be one of {', '.join(LAYER_INPUTS)}, got {self.layer_inputs!r}")
        if self.decay not in DECAYS:
            raise SparsefitError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        for name in ("teacher_dtype", "student_dtype"):
            if getattr(self, name) not in PRECISIONS:
                raise SparsefitError(f"{name} must be one of {', '.join(PRECISIONS)}, got {getattr(self, name)!r}")
        if not isinstance(self.val_fraction, (int, float)) or not (0 < self.val_fraction < 0.5):
            raise SparsefitError(f"validation fraction must be in (0, 0.5), got {self.val_fraction!r}")

    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        """Version 1 had no ``student_dtype`` (its students trained in float32); versions 1 and 2 had
        no ``decay`` (their step sizes followed a cosine)."""
        if version < 2:
            d.setdefault("student_dtype", "float32")
        if version < 3:
            d.setdefault("decay", "cosine")
        return d

    def resolved(self) -> DistillConfig:
        """The same config with ``steps``, ``layer_steps`` and ``augment`` made concrete."""
        if self.steps == "auto":
            return dataclasses.replace(
                self,
                steps=AUTO_SCHEDULE["steps"],
                layer_steps=AUTO_SCHEDULE["layer_steps"] if self.layer_steps is None else self.layer_steps,
                augment=AUTO_SCHEDULE["augment"] if self.augment is None else self.augment,
            )
        return dataclasses.replace(
            self,
            layer_steps=int(self.steps) // 4 if self.layer_steps is None else self.layer_steps,
            augment=0.0 if self.augment is None else self.augment,
        )


def lr_factor(step: int, steps: int, warm: int, decay: str) -> float:
    """The step size of step ``step`` (0-based) of a stage of ``steps``, relative to its peak: a
    linear warm-up over ``warm`` steps, then ``decay`` (``"linear"`` or ``"cosine"``) towards zero."""
    if step < warm:
        return (step + 1) / warm
    u = (step - warm) / max(1, steps - warm)
    return 1.0 - u if decay == "linear" else 0.5 * (1 + math.cos(math.pi * u))


def _check_int(name: str, v: Any, lo: int, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise SparsefitError(f"{name} must be an integer >= {lo}, got {v!r}")


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillStep:
    """What ``on_step`` receives. ``stage`` is ``"layer"`` (``block``: the block trained, or ``None``
    when all blocks train together; ``loss`` is then the sum of theirs) or ``"e2e"``;
    ``done``/``total`` count steps over the whole run."""

    stage: str
    block: int | None
    step: int
    steps: int
    done: int
    total: int
    loss: float
    lr: float
    seconds: float


@dataclass(frozen=True)
class DistillEval:
    """What ``on_eval`` receives: the validation metric (mean cosine of the pooled embeddings)."""

    stage: str
    block: int | None
    done: int
    metric: float
    best: float


@dataclass
class DistillReport:
    """The outcome. ``metric_*`` is the validation mean cosine (calibration split) of the student's
    mean-pooled embeddings to the teacher's; ``metric_after`` is the best seen, which the student keeps."""

    config: dict[str, Any]
    metric_before: float
    metric_after: float
    best_at: int
    steps_done: int
    steps_total: int
    seconds: float
    interrupted: bool
    resumed: bool
    train_samples: int
    val_samples: int
    trainable_params: int
    trained_modules: int
    cached_batches: int
    spilled_batches: int
    batches: int
    attention_weight: float = 0.0
    teacher_dtype: str = "float32"
    student_dtype: str = "float32"
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def tokenize(tokenizer: Any, texts: Sequence[str], config: DistillConfig) -> dict[str, torch.Tensor]:
    """``texts`` tokenised for :func:`distill`: ``{input_ids, attention_mask, …}: (N, T)`` with
    ``T <= config.max_length`` (right padding)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
    return {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}


def _as_samples(calibration: Any) -> dict[str, torch.Tensor]:
    """One ``(N, T)`` dict from a dict or a list of batch dicts (right-padded with zeros to a common T)."""
    parts = [calibration] if isinstance(calibration, Mapping) else list(calibration)
    if not parts:
        raise SparsefitError("no calibration samples to distil on")
    keys = list(parts[0].keys())
    if "attention_mask" not in keys:
        raise SparsefitError("calibration batches need an 'attention_mask' (tokenise with padding=True)")
    for p in parts:
        if list(p.keys()) != keys:
            raise SparsefitError("all calibration batches must have the same keys")
        for k in keys:
            if not isinstance(p[k], torch.Tensor) or p[k].dim() != 2 or p[k].shape != p["attention_mask"].shape:
                raise SparsefitError(f"calibration tensor {k!r} must be (samples, tokens) like the attention mask")
    width = max(int(p["attention_mask"].shape[1]) for p in parts)
    out = {}
    for k in keys:
        out[k] = torch.cat([nn.functional.pad(p[k], (0, width - p[k].shape[1])) for p in parts]).cpu()
    lengths = out["attention_mask"].sum(1)
    if int(lengths.min()) < 1:
        raise SparsefitError("a calibration sample has no tokens (its attention mask is all zero)")
    return out


def split_samples(n: int, config: DistillConfig) -> tuple[list[int], list[int]]:
    """``(train, validation)`` sample indices: a seeded shuffle, the validation part first."""
    n_val = min(config.val_max, max(1, round(n * config.val_fraction)))
    if n - n_val < 1:
        raise SparsefitError(f"need at least 2 calibration samples to distil (one is kept for validation), got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def make_batches(indices: Sequence[int], lengths: torch.Tensor, batch: int) -> list[list[int]]:
    """Consecutive chunks of ``indices`` sorted by token length (little padding per batch)."""
    order = sorted(indices, key=lambda i: (int(lengths[i]), i))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _gather(samples: dict[str, torch.Tensor], idx: list[int], multiple: int = 1) -> dict[str, torch.Tensor]:
    """The samples ``idx`` cut to their longest one, rounded up to ``multiple`` tokens."""
    rows = torch.tensor(idx)
    width = int(samples["attention_mask"][rows].sum(1).max())
    width = min(-(-width // multiple) * multiple, samples["attention_mask"].shape[1])
    return {k: v[rows, :width].contiguous() for k, v in samples.items()}


def batch_order(n_batches: int, seed: int, stage: int, epoch: int) -> list[int]:
    """The order of the training batches in one epoch of one stage (a pure function: resumable)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n_batches, generator=g).tolist()


# ----------------------------------------------------------------------------------------------
# Model structure
# ----------------------------------------------------------------------------------------------
def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The module list of transformer blocks: ``path`` or the largest ``nn.ModuleList`` of one module type."""
    if path is not None:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise SparsefitError(f"the model has no module {path!r} (blocks=)") from None
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            raise SparsefitError(f"{path!r} is not a non-empty nn.ModuleList of blocks")
        return path, mod
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise SparsefitError(
            "cannot find the model's transformer blocks; name them with blocks= (e.g. 'encoder.layer')"
        )
    return best[1], best[2]


def replaced_modules(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Names of the teacher's ``nn.Linear`` modules that the student holds as another module type."""
    out = []
    smods = dict(student.named_modules())
    for name, mod in teacher.named_modules():
        if isinstance(mod, nn.Linear) and name in smods and type(smods[name]) is not type(mod):
            out.append(name)
    return out


def trainable_parameters(
    teacher: nn.Module, student: nn.Module, config: DistillConfig, blocks_path: str
) -> dict[str, nn.Parameter]:
    """The student's parameters :func:`distill` trains, by name (see :class:`DistillConfig`)."""
    replaced = replaced_modules(teacher, student)
    if not replaced:
        raise SparsefitError(
            "the student has no replaced layers to train (every teacher nn.Linear is still an nn.Linear)"
        )
    chosen: dict[str, nn.Parameter] = {}
    for name in replaced:
        for pname, p in student.get_submodule(name).named_parameters():
            if pname.rsplit(".", 1)[-1] != "bias" or config.train_biases:
                chosen[f"{name}.{pname}"] = p
    prefix = blocks_path + "." if blocks_path else ""
    for mname, mod in student.named_modules():
        if not mname.startswith(prefix):
            continue
        is_norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(mod).__name__.lower()
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}"
            if (
                (is_norm and config.train_norms)
                or (not is_norm and pname == "bias" and config.train_biases)
                or (isinstance(mod, nn.Linear) and pname == "weight" and config.train_dense)
            ):
                chosen.setdefault(full, p)
    for n, p in chosen.items():
        if not p.is_floating_point():
            raise SparsefitError(f"parameter {n!r} is not floating point and cannot be trained")
    return dict(sorted(chosen.items()))


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """How a block was called: everything but the hidden state, and where the hidden state goes."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_kw: bool

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_kw:
            out = block(*self.args, **{**self.kwargs, "hidden_states": hidden})
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return _first(out)


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def _detach(x: Any, dtype: torch.dtype | None = None) -> Any:
    """``x`` (tensors inside tuples, lists, dicts too) detached; floating tensors cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, tuple):
        return tuple(_detach(v, dtype) for v in x)
    if isinstance(x, list):
        return [_detach(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v, dtype) for k, v in x.items()}
    return x


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runs_in_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether a pass with this precision (:data:`PRECISIONS`: ``DistillConfig.teacher_dtype`` or
    ``student_dtype``) runs in bfloat16 on ``device``; ``"auto"``: where bfloat16 is multiplied
    natively (a CUDA device that supports it, a CPU with AVX512-BF16 or AMX)."""
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


class _Float32Attention(torch.overrides.TorchFunctionMode):
    """Runs ``scaled_dot_product_attention`` in float32 inside a bfloat16 autocast region (CPU): its
    bfloat16 backward pass took 19.4 ms a call against 1.3 ms in float32 (all-MiniLM-L6-v2, batch
    32, torch 2.13, 2-core AMX Xeon; ``benchmarks/NOTES.md``, 2026-12-03)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is not nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)

        def up(x: Any) -> Any:
            return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

        with torch.autocast("cpu", enabled=False):
            return func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def _student_precision(bfloat16: bool, device: torch.device):
    """The region of a student's training forward pass: bfloat16 autocast (attention in float32 on
    CPUs, :class:`_Float32Attention`) when ``bfloat16``, else nothing."""
    if not bfloat16:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if device.type == "cpu":
            stack.enter_context(_Float32Attention())
        yield


@dataclass
class _Teacher:
    """The teacher's activations on one batch: block inputs/outputs ``hidden[0..L]``, the calls, the
    model's output (``final``; the last block's output unless a final norm follows) and its pool."""

    hidden: list[torch.Tensor]
    calls: list[_Call]
    final: torch.Tensor
    pooled: torch.Tensor
    attention: list[_Map] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        """Every activation (not the calls), in the order :meth:`from_tensors` reads them back."""
        maps = [x for m in self.attention for x in (m.probs, m.entropy)]
        return [*self.hidden, self.final, self.pooled, *maps]

    @staticmethod
    def from_tensors(calls: list[_Call], tensors: Sequence[torch.Tensor]) -> _Teacher:
        """The record of a batch with these ``calls`` whose :meth:`tensors` were ``tensors``."""
        n = len(calls) + 1
        maps = tensors[n + 2 :]
        return _Teacher(
            list(tensors[:n]),
            calls,
            tensors[n],
            tensors[n + 1],
            [_Map(maps[2 * i], maps[2 * i + 1]) for i in range(len(maps) // 2)],
        )


class _TeacherCache:
    """The teacher's activations per training batch in a :class:`~sparsefit.spill.SpillStore`
    (memory, then a temporary file); a batch's calls (the blocks' extra arguments: masks, a few kB)
    stay in memory wherever its activations are."""

    def __init__(self, store: SpillStore) -> None:
        self.store = store
        self.calls: dict[int, list[_Call]] = {}
        self.kept = {"memory": 0, "disk": 0, "none": 0}  # batches put, by where they went (ever)

    def get(self, bi: int) -> _Teacher | None:
        tensors = self.store.get(bi)
        return None if tensors is None else _Teacher.from_tensors(self.calls[bi], tensors)

    def put(self, bi: int, t: _Teacher) -> None:
        where = self.store.put(bi, t.tensors())
        self.kept[where] += 1
        if where != "none":
            self.calls[bi] = t.calls

    def clear(self) -> None:
        self.store.clear()
        self.calls.clear()


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens: ``(B, T, H), (B, T) -> (B, H)``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass(frozen=True)
class _Map:
    """The teacher's attention distributions in one block: ``probs: (B, heads, T, T)`` (0 at padded
    keys) and ``entropy``, their mean entropy over heads and real queries (the part of the KL
    divergence that does not depend on the student)."""

    probs: torch.Tensor
    entropy: torch.Tensor


def _query_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x: (B, heads, T)`` over heads and the queries the mask keeps."""
    q = mask.to(x.dtype)[:, None, :]
    return (x * q).sum() / (q.sum() * x.shape[1]).clamp(min=1.0)


@dataclass(frozen=True)
class _Attention:
    """Where each block's query and key projections are (names inside the block), the head count
    and the weight of the attention-map term."""

    names: list[tuple[str, str]]
    heads: int
    weight: float

    def kl(self, qk: Sequence[torch.Tensor | None], target: _Map, mask: torch.Tensor) -> torch.Tensor:
        """The weighted term for one block: KL(teacher ‖ student) of the maps, from the student's
        captured ``(q, k)``. Written as cross-entropy minus the teacher's entropy, with
        ``log p_s = s − logsumexp(s)``, so that the student's log-probabilities are never formed."""
        q, k = qk
        assert q is not None and k is not None
        s = self.scores(q.to(target.probs.dtype), k.to(target.probs.dtype), mask)
        cross = torch.logsumexp(s, dim=-1) - (target.probs * s).sum(-1)
        return self.weight * (_query_mean(cross, mask) - target.entropy)

    def scores(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` queries and keys -> ``(B, heads, T, T)`` scaled scores, padded keys at the
        dtype's lowest value (so their probability is exactly 0)."""
        b, t, d = q.shape
        dh = d // self.heads
        qh = (q * (1.0 / math.sqrt(dh))).reshape(b, t, self.heads, dh).transpose(1, 2)
        kh = k.reshape(b, k.shape[1], self.heads, dh).transpose(1, 2)
        s = qh @ kh.transpose(-1, -2)
        return s.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(s.dtype).min)

    def logprobs(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` queries and keys -> ``(B, heads, T, T)`` log attention probabilities."""
        return torch.log_softmax(self.scores(q, k, mask), dim=-1)

    def target(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> _Map:
        """The teacher's map of one block, ready for :meth:`kl`."""
        logp = self.logprobs(q, k, mask)
        p = logp.exp()
        return _Map(p, _query_mean(-(p * logp).sum(-1), mask))


@contextlib.contextmanager
def _captured(attention: _Attention | None, blocks: nn.ModuleList, only: int | None = None):
    """Within the block, ``store[i]`` receives block ``i``'s query and key outputs (every block, or
    block ``only``); nothing is hooked when ``attention`` is None."""
    store: list[list[torch.Tensor | None]] = [[None, None] for _ in blocks]

    def keep(i: int, j: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[i][j] = _first(output)

        return hook

    handles = []
    if attention is not None:
        for i, pair in enumerate(attention.names):
            if only is None or i == only:
                handles += [blocks[i].get_submodule(n).register_forward_hook(keep(i, j)) for j, n in enumerate(pair)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


#: Leaf names of the query and key projections, per model family.
_QK_NAMES = (("query", "key"), ("q_proj", "k_proj"))


def find_attention(
    teacher: nn.Module, blocks: nn.ModuleList, weight: float | None = AUTO_ATTENTION_WEIGHT
) -> _Attention | None:
    """The query/key projections of every block and the head count for ``attention_weight``
    (:attr:`DistillConfig.attention_weight`): ``None`` when the weight is 0, or when it is ``None``
    (auto) and the model lacks them; an error when an explicit weight > 0 cannot be applied."""
    if weight == 0:
        return None
    heads = getattr(getattr(teacher, "config", None), "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        if weight is None:
            return None
        raise SparsefitError("attention_weight needs a model whose config has num_attention_heads; set it to 0")
    names: list[tuple[str, str]] = []
    for i, block in enumerate(blocks):
        mods = dict(block.named_modules())
        pair = next(
            (
                (n, n[: len(n) - len(qn)] + kn)
                for qn, kn in _QK_NAMES
                for n in mods
                if n.rsplit(".", 1)[-1] == qn and n[: len(n) - len(qn)] + kn in mods
            ),
            None,
        )
        if pair is None:
            if weight is None:
                return None
            raise SparsefitError(
                f"attention_weight: block {i} has no query/key projections named query/key or q_proj/k_proj;"
                " set attention_weight to 0"
            )
        names.append(pair)
    return _Attention(names, heads, AUTO_ATTENTION_WEIGHT if weight is None else float(weight))


@torch.no_grad()
def bfloat16_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """bfloat16 copies of the weights and biases of ``model``'s ``nn.Linear`` modules, by name.

    For a frozen model run under bfloat16 autocast: autocast casts every such weight on every call
    (it caches casts only of tensors that require gradients); with these copies swapped in
    (:func:`_run_teacher`'s ``weights``) it finds them cast already. The rounding is the same, so
    the outputs are the same bytes."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = p.detach().to(torch.bfloat16)
    return out


def _run_teacher(
    teacher: nn.Module,
    blocks: nn.ModuleList,
    batch: dict[str, torch.Tensor],
    attention: _Attention | None = None,
    bfloat16: bool = False,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> _Teacher:
    """The teacher's activations on ``batch``; with ``bfloat16`` its forward pass runs under bfloat16
    autocast and every stored activation is cast back to the teacher's own dtype; ``weights``
    (:func:`bfloat16_linear_weights`, with ``bfloat16`` only) replace the teacher's own for the pass."""
    dtype = next(teacher.parameters()).dtype if bfloat16 else None
    calls: list[_Call | None] = [None] * len(blocks)
    hidden: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
    handles = []

    def pre(i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                calls[i] = _Call(_detach(tuple(args[1:]), dtype), _detach(dict(kwargs), dtype), False)
                hidden[i] = _detach(args[0], dtype)
            else:
                kw = dict(kwargs)
                hidden[i] = _detach(kw.pop("hidden_states"), dtype)
                calls[i] = _Call((), _detach(kw, dtype), True)

        return hook

    def post(i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden[i + 1] = _detach(_first(output), dtype)

        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post(i)))
    try:
        with (
            _captured(attention, blocks) as qk,
            torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bfloat16),
        ):
            if weights is not None and bfloat16:
                out = torch.func.functional_call(teacher, dict(weights), (), batch, strict=False)
            else:
                out = teacher(**batch)
            out = _detach(_first(out), dtype)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        raise SparsefitError(
            "not every transformer block ran in the teacher's forward pass; name the blocks with blocks="
        )
    mask = batch["attention_mask"]
    maps = [] if attention is None else [attention.target(*_detach(pair, dtype), mask) for pair in qk]
    return _Teacher(
        [h for h in hidden if h is not None],
        [c for c in calls if c is not None],
        out,
        pool(out, mask),
        maps,
    )


def _rel_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_valid ||s − t||² / sum_valid ||t||²`` over the tokens the mask keeps (``s`` is cast to
    ``t``'s dtype: a bfloat16-autocast student's outputs meet float32 targets)."""
    s = s.to(t.dtype)
    m = mask.to(s.dtype).unsqueeze(-1)
    return ((s - t).square() * m).sum() / (t.square() * m).sum().clamp(min=1e-12)


def _cosine_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1.0 - nn.functional.cosine_similarity(s, t, dim=-1).mean()


# ----------------------------------------------------------------------------------------------
# State files
# ----------------------------------------------------------------------------------------------
#: Settings that change where the work is kept, not its result: a state file resumes across them.
_RESULT_NEUTRAL = ("cache_mb", "spill_mb", "checkpoint_every")


def _fingerprint(config: DistillConfig, params: dict[str, nn.Parameter], samples: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted((k, v) for k, v in config.to_dict().items() if k not in _RESULT_NEUTRAL)).encode())
    for n, p in params.items():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype}".encode())
    for k in sorted(samples):
        h.update(k.encode())
        h.update(samples[k].numpy().tobytes())
    return h.hexdigest()


def _save_state(path: Path, state: dict[str, Any]) -> None:
    from .fileformat import atomic_output

    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or damaged file: start afresh (it is overwritten atomically later)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
        return None
    return state


# ----------------------------------------------------------------------------------------------
# The verb
# ----------------------------------------------------------------------------------------------
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


def _inner_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Every real position but the first and last of each sample (no ``[CLS]``/``[SEP]``-like marker)."""
    mask = attention_mask.bool()
    inner = mask.clone()
    inner[:, 0] = False
    inner[torch.arange(mask.shape[0]), mask.sum(1) - 1] = False
    return inner


def _inner_tokens(samples: dict[str, torch.Tensor]) -> torch.Tensor:
    """The token ids at the inner positions (:func:`_inner_mask`), the pool :func:`_augment`
    draws replacements from."""
    pool = samples["input_ids"][_inner_mask(samples["attention_mask"])]
    return pool if pool.numel() else samples["input_ids"][samples["attention_mask"].bool()]


def _augment(
    batch: dict[str, torch.Tensor], pool: torch.Tensor, fraction: float, key: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    """``batch`` with about ``fraction`` of its inner tokens replaced by tokens drawn from ``pool``.

    Distillation matches the teacher on whatever input it gets, so perturbed sentences are as good
    a training signal as real ones and keep a few thousand calibration sentences from being learnt
    by heart. ``key`` seeds the draw.
    """
    seed = (key[0] * 1_000_003 + key[1]) * 1_000_003 + key[2]
    g = torch.Generator().manual_seed(seed % (2**63))
    ids = batch["input_ids"]
    hit = (torch.rand(ids.shape, generator=g) < fraction).to(ids.device) & _inner_mask(batch["attention_mask"])
    new = pool[torch.randint(pool.numel(), ids.shape, generator=g)].to(ids.device)
    return {**batch, "input_ids": torch.where(hit, new, ids)}


def train_only(teacher: nn.Module, student: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
    """Both models in eval mode (no dropout), gradients for ``params`` only."""
    teacher.eval()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)


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


def _layer_loss(
    s_blocks: nn.ModuleList,
    block: int,
    hidden: torch.Tensor,
    t: _Teacher,
    mask: torch.Tensor,
    config: DistillConfig,
    attention: _Attention | None,
    bfloat16: bool = False,
) -> torch.Tensor:
    """Block ``block`` of the student on ``hidden`` against the teacher's output of that block (and
    its attention map when ``attention`` is set); ``bfloat16``: :func:`_student_precision`."""
    with _captured(attention, s_blocks, only=block) as qk, _student_precision(bfloat16, hidden.device):
        out = t.calls[block](s_blocks[block], hidden)
    loss = _rel_mse(out, t.hidden[block + 1], mask)
    if attention is not None:
        loss = loss + attention.kl(qk[block], t.attention[block], mask)
    return loss


def _e2e_loss(
    student: nn.Module,
    s_blocks: nn.ModuleList,
    batch: dict[str, torch.Tensor],
    t: _Teacher,
    config: DistillConfig,
    attention: _Attention | None = None,
    bfloat16: bool = False,
) -> torch.Tensor:
    """The end-to-end loss of ``student`` on ``batch``; ``bfloat16``: :func:`_student_precision`."""
    outs: list[torch.Tensor | None] = [None] * len(s_blocks)
    handles = []

    def post(i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outs[i] = _first(output)

        return hook

    for i, b in enumerate(s_blocks):
        handles.append(b.register_forward_hook(post(i)))
    try:
        with _captured(attention, s_blocks) as qk, _student_precision(bfloat16, batch["input_ids"].device):
            last = _first(student(**batch))
    finally:
        for h in handles:
            h.remove()
    mask = batch["attention_mask"]
    last = last.to(t.final.dtype)
    loss = _rel_mse(last, t.final, mask)
    if config.pooled_weight > 0:
        loss = loss + config.pooled_weight * _cosine_loss(pool(last, mask), t.pooled)
    if config.intermediate_weight > 0 and len(s_blocks) > 1:
        inter = [_rel_mse(o, t.hidden[i + 1], mask) for i, o in enumerate(outs[:-1]) if o is not None]
        loss = loss + config.intermediate_weight * torch.stack(inter).mean()
    if attention is not None:
        kl = [attention.kl(pair, tm, mask) for pair, tm in zip(qk, t.attention, strict=True)]
        loss = loss + torch.stack(kl).mean()
    return loss


def _emit(callbacks: Sequence[Any], name: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)
