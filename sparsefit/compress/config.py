"""What to compress and how: :class:`CompressConfig` and the layer selection rule."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..autosize import depth_ladder, max_depth_for
from ..checkpoint import FLOAT_DTYPES, TensorEntry
from ..config import FitConfig, VersionedConfig
from ..errors import SparsefitError

COMPRESS_CONFIG_VERSION = 2
WIDTH_MODES = ("tight", "double")

#: Default exclusions (applied when no --include is given), matched per dotted name component.
HEAD_COMPONENTS = frozenset({"lm_head", "classifier", "pooler", "qa_outputs", "score", "cls", "head", "heads"})
_NORM_COMPONENT = re.compile(r"(?i).*norm.*|ln(_.*|\d+)?|ln_f")


@dataclass(frozen=True)
class CompressConfig(VersionedConfig):
    """What to compress and how.

    include / exclude: regexes fully matching tensor names (``re.fullmatch``). Without
    ``include`` the default selection is every 2-D floating ``*.weight`` that is not an
    embedding (name contains ``embed``), a norm (a name component containing ``norm``, or
    ``ln``/``ln_1``/``ln_f``), or an output head (a component in :data:`HEAD_COMPONENTS`:
    ``lm_head``, ``classifier``, ``pooler``, ``qa_outputs``, ``score``, ``cls``, ``head``).
    depth: a fixed depth for every layer; target_error: else the smallest depth on the ladder
    reaching this relative error (data-aware with calibration); keep: else a global budget, the
    fraction of the selected layers' parameters kept, in (0, 1]. One of the three is needed to run.
    max_params_ratio: G~ may use at most this fraction of the dense parameters (default 0.5).
    width: ``"tight"`` (``max(out, in)`` rounded up to even, the default: at a fixed parameter
    budget it allows twice the depth, which fitted MiniLM layers better), ``"double"`` (the
    note's ``2·max(out, in)``) or an even integer for every layer.
    min_depth / growth: the ladder's first rung (default ``ceil(log2 width)``) and growth factor.
    fit: the per-layer fit settings. Its ``depth`` and ``width`` must stay unset: they are chosen
    per layer from the fields above (one place for each setting).
    calibration: a safetensors file of recorded layer inputs, a text file or folder (plain text
    or JSONL, one sample per line), or ``"builtin"``; fits then use the layers' real inputs.
    structures: with ``keep`` and calibration, the candidates each layer chooses from at its
    budget (smallest data error wins; see :mod:`sparsefit.compress.structures`). The default
    leaves out ``gtilde`` and ``gtilde+lowrank``: on all-MiniLM-L6-v2 they won no layer
    (``benchmarks/NOTES.md``) and cost most of the time. candidate_steps: Adam steps of each G~
    candidate fit.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    depth: int | None = None
    target_error: float | None = None
    keep: float | None = None
    max_params_ratio: float = 0.5
    width: str | int = "tight"
    min_depth: int | None = None
    growth: float = 2.0
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=3000, batch=256))
    calibration: str | None = None
    structures: tuple[str, ...] = ("lowrank", "dense")
    candidate_steps: int = 100

    KIND: ClassVar[str] = "compress config"
    VERSION: ClassVar[int] = COMPRESS_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for rx in (*self.include, *self.exclude):
            try:
                re.compile(rx)
            except re.error as e:
                raise SparsefitError(f"bad regular expression {rx!r}: {e}") from None
        if sum(x is not None for x in (self.depth, self.target_error, self.keep)) > 1:
            raise SparsefitError("give one of --depth, --target-error or --keep, not several")
        if self.depth is not None and self.depth < 1:
            raise SparsefitError(f"depth must be at least 1, got {self.depth}")
        if self.target_error is not None and not (0 < self.target_error <= 1):
            raise SparsefitError(f"target error must be in (0, 1], got {self.target_error}")
        if self.keep is not None and not (0 < self.keep <= 1):
            raise SparsefitError(f"--keep must be a fraction of the parameters in (0, 1], got {self.keep}")
        if not (0 < self.max_params_ratio <= 1) or not math.isfinite(self.max_params_ratio):
            raise SparsefitError(f"max params ratio must be in (0, 1], got {self.max_params_ratio}")
        if isinstance(self.width, str) and self.width.isdigit():
            object.__setattr__(self, "width", int(self.width))
        if isinstance(self.width, int):
            if self.width < 2 or self.width % 2:
                raise SparsefitError(f"width must be an even number >= 2, 'tight' or 'double', got {self.width}")
        elif self.width not in WIDTH_MODES:
            raise SparsefitError(f"width must be 'tight', 'double' or an even number, got {self.width!r}")
        if self.min_depth is not None and self.min_depth < 1:
            raise SparsefitError(f"min depth must be at least 1, got {self.min_depth}")
        if not (self.growth > 1) or not math.isfinite(self.growth):
            raise SparsefitError(f"depth growth factor must be > 1, got {self.growth}")
        from .structures import STRUCTURES

        object.__setattr__(self, "structures", tuple(self.structures))
        bad = [x for x in self.structures if x not in STRUCTURES]
        if bad or not self.structures:
            raise SparsefitError(
                f"unknown structure {bad[0] if bad else '(none)'}; choose from {', '.join(STRUCTURES)}"
            )
        if self.candidate_steps < 1:
            raise SparsefitError(f"candidate steps must be at least 1, got {self.candidate_steps}")
        if isinstance(self.fit, dict):
            object.__setattr__(self, "fit", FitConfig.from_dict(self.fit))
        if self.fit.depth is not None or self.fit.width is not None:
            raise SparsefitError(
                "set the depth and width of compressed layers on CompressConfig (depth=, width=), not on its fit config"
            )

    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        # version 1 (before --keep) had the same keys; its fit dict may carry depth/width = None.
        return d

    @property
    def has_rule(self) -> bool:
        """True when a depth rule (``depth``, ``target_error`` or ``keep``) is set."""
        return self.depth is not None or self.target_error is not None or self.keep is not None

    def layer_width(self, out_features: int, in_features: int) -> int:
        big = max(out_features, in_features)
        if self.width == "double":
            return 2 * big
        if self.width == "tight":
            return big + big % 2
        if int(self.width) < big:
            raise SparsefitError(f"width {self.width} is smaller than a selected layer ({out_features}x{in_features})")
        return int(self.width)

    def max_depth(self, out_features: int, in_features: int) -> int:
        """Deepest G~ within the parameter cap (0 when even depth 1 is over it)."""
        w = self.layer_width(out_features, in_features)
        return max_depth_for(int(self.max_params_ratio * out_features * in_features), w)

    def ladder(self, out_features: int, in_features: int) -> list[int]:
        """Depths tried in ``target_error`` mode, shallowest first, ending at the cap."""
        cap = self.max_depth(out_features, in_features)
        if cap < 1:
            return []
        w = self.layer_width(out_features, in_features)
        d0 = min(cap, self.min_depth or max(1, math.ceil(math.log2(w))))
        return depth_ladder(d0, cap, self.growth)

    def fit_key(self) -> dict[str, Any]:
        """The settings a layer file must match to be reused on resume."""
        d = self.to_dict()
        for k in ("include", "exclude", "version"):
            d.pop(k)
        d["fit"] = {k: v for k, v in d["fit"].items() if k not in ("device", "eval_every")}
        return d


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """A selected weight: its index (round-robin key), entry, width and depth cap.

    ``transposed``: the tensor is stored ``(in, out)`` (GPT-2's ``Conv1D``); :attr:`shape` is
    always ``(out, in)``.
    """

    index: int
    entry: TensorEntry
    width: int
    max_depth: int
    transposed: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def module(self) -> str:
        return re.sub(r"\.weight$", "", self.entry.name)

    @property
    def shape(self) -> tuple[int, int]:
        m, k = self.entry.shape
        return (k, m) if self.transposed else (m, k)

    @property
    def dense_params(self) -> int:
        return self.entry.shape[0] * self.entry.shape[1]


def default_selected(entry: TensorEntry) -> bool:
    """The default rule: a 2-D floating ``*.weight`` of a linear layer, not embedding/norm/head."""
    if len(entry.shape) != 2 or entry.dtype not in FLOAT_DTYPES or not entry.name.endswith(".weight"):
        return False
    low = entry.name.lower()
    if "embed" in low:
        return False
    parts = low.split(".")[:-1]
    if any(_NORM_COMPONENT.fullmatch(p) for p in parts):
        return False
    return not any(p in HEAD_COMPONENTS for p in parts)


def select_layers(
    entries: Sequence[TensorEntry],
    config: CompressConfig,
    transposed: frozenset[str] = frozenset(),
    linear: frozenset[str] | None = None,
) -> list[LayerPlan]:
    """Apply include/exclude (``re.fullmatch``) or the default rule; validate the selection.

    transposed: names of weights stored ``(in, out)`` (GPT-2 ``Conv1D``). linear: when the
    architecture is known, the names of its linear layers' weights: only those are selected
    (GPT-2's position embedding ``wpe`` is 2-D but no linear layer).
    Raises when a regex matches no tensor, when an explicitly included tensor is not a 2-D
    floating matrix, or when nothing is selected.
    """
    names = [e.name for e in entries]
    for opt, rxs in (("--include", config.include), ("--exclude", config.exclude)):
        for rx in rxs:
            pat = re.compile(rx)
            if not any(pat.fullmatch(n) for n in names):
                raise SparsefitError(
                    f"{opt} {rx!r} matches no tensor name (names look like {names[0]!r}; the regex must match the whole name)"
                )
    inc = [re.compile(r) for r in config.include]
    exc = [re.compile(r) for r in config.exclude]
    chosen = []
    for e in entries:
        if any(p.fullmatch(e.name) for p in exc):
            continue
        if inc:
            if not any(p.fullmatch(e.name) for p in inc):
                continue
            if len(e.shape) != 2:
                raise SparsefitError(
                    f"{e.name} is {len(e.shape)}-D (shape {e.shape}); only 2-D weight matrices can be compressed, narrow --include"
                )
            if e.dtype not in FLOAT_DTYPES:
                raise SparsefitError(f"{e.name} has dtype {e.dtype}; only floating-point weights can be compressed")
            if linear is not None and e.name not in linear:
                raise SparsefitError(f"{e.name} is not the weight of an nn.Linear or Conv1D layer; narrow --include")
        elif not default_selected(e) or (linear is not None and e.name not in linear):
            continue
        chosen.append(e)
    if not chosen:
        raise SparsefitError("no tensor selected for compression; check --include/--exclude (see --dry-run)")
    plans = []
    for i, e in enumerate(chosen):
        t = e.name in transposed
        m, k = (e.shape[1], e.shape[0]) if t else e.shape
        plans.append(LayerPlan(i, e, config.layer_width(m, k), config.max_depth(m, k), t))
    return plans
