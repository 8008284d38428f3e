"""The settings of :func:`~sparsefit.distill.distill` and what it reports: :class:`DistillConfig`
(with its choices, the ``auto`` schedule and its validation), the step-size schedule
:func:`lr_factor`, and the plain records the callbacks receive (:class:`DistillStep`,
:class:`DistillEval`, :class:`DistillReport`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import VersionedConfig
from ..errors import SparsefitError

DISTILL_CONFIG_VERSION = 3

#: Choices of :attr:`DistillConfig.layer_inputs`.
LAYER_INPUTS = ("teacher", "student")

#: Choices of :attr:`DistillConfig.teacher_dtype` and :attr:`DistillConfig.student_dtype`.
PRECISIONS = ("auto", "float32", "bfloat16")

#: Choices of :attr:`DistillConfig.decay`.
DECAYS = ("linear", "cosine")

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
    on a 2-core AVX512-BF16 CPU (``benchmarks/bench_distill_step.py``). The validation metric always
    uses the float32 teacher.
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
