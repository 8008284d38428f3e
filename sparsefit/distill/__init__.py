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

# The package, one responsibility per module: config (settings, schedule, reports), data (samples,
# batches, augmentation), models (blocks, trained parameters), attention (the attention-map term),
# precision (bfloat16), teacher (targets and their cache), losses, state (resume files) and loop
# (distill itself). Every name below stays importable from ``sparsefit.distill``: the public ones,
# and the private ones that tests and benchmarks import (a monkeypatch must target the module that
# reads the name, e.g. ``sparsefit.distill.precision._cpu_flags``).

from __future__ import annotations

from .attention import _Attention as _Attention
from .attention import _Map as _Map
from .attention import find_attention
from .config import (
    AUTO_ATTENTION_WEIGHT,
    AUTO_SCHEDULE,
    DECAYS,
    DISTILL_CONFIG_VERSION,
    LAYER_INPUTS,
    PRECISIONS,
    DistillConfig,
    DistillEval,
    DistillReport,
    DistillStep,
    lr_factor,
)
from .data import _augment as _augment
from .data import _gather as _gather
from .data import _inner_tokens as _inner_tokens
from .data import batch_order, make_batches, split_samples, tokenize
from .loop import _adam as _adam
from .loop import distill
from .losses import _e2e_loss as _e2e_loss
from .models import find_blocks, replaced_modules, train_only, trainable_parameters
from .precision import BF16_WIDTH_MULTIPLE, bfloat16_linear_weights, runs_in_bfloat16
from .precision import _Float32Attention as _Float32Attention
from .precision import _student_precision as _student_precision
from .state import STATE_FORMAT, STATE_VERSION
from .teacher import _run_teacher as _run_teacher
from .teacher import pool

__all__ = [
    "AUTO_ATTENTION_WEIGHT",
    "AUTO_SCHEDULE",
    "BF16_WIDTH_MULTIPLE",
    "DECAYS",
    "DISTILL_CONFIG_VERSION",
    "LAYER_INPUTS",
    "PRECISIONS",
    "STATE_FORMAT",
    "STATE_VERSION",
    "DistillConfig",
    "DistillEval",
    "DistillReport",
    "DistillStep",
    "batch_order",
    "bfloat16_linear_weights",
    "distill",
    "find_attention",
    "find_blocks",
    "lr_factor",
    "make_batches",
    "pool",
    "replaced_modules",
    "runs_in_bfloat16",
    "split_samples",
    "tokenize",
    "train_only",
    "trainable_parameters",
]
