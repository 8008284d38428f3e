"""Structured-sparse compression of model checkpoints: ``compress_checkpoint`` and ``load_compressed``.

Every selected ``out × in`` weight of a checkpoint is replaced by a fitted G~ (see
:mod:`sparsefit.operator`), layer by layer, holding one shard and one weight in memory at a time.

Output folder (format ``sparsefit.compressed``, version 1)::

    manifest.json                       format, config, one record per selected layer, totals
    layers/00000.safetensors            one file per selected layer: `X.blocks` and
                                        `X.permutations` (int32) of G~ for weight `X.weight`,
                                        or `X.weight` itself when the layer stayed dense; the
                                        layer record as JSON metadata (key "sparsefit")
    dense-00001-of-00002.safetensors    the untouched tensors, one file per input shard
    config.json, tokenizer files, …     copied through from a model folder

Per-layer files are written atomically and carry the settings that produced them, so an
interrupted run resumes: layers whose file is there with matching settings are skipped.
Layers are split round-robin across ``torch.distributed`` ranks (``torchrun``); rank 0 writes
the untouched tensors and, after a barrier, the manifest.

Depth per layer: a fixed ``depth``, or the smallest depth on the ladder ``d0, 2·d0, 4·d0, …, cap``
reaching ``target_error`` (each rung warm-started from the previous fit with
:func:`deepen`). The cap is ``max_params_ratio · out · in`` parameters (G~ has ``2·width·depth``);
a layer that cannot meet the target within it stays dense.

Example
-------
>>> cfg = CompressConfig(target_error=0.3, fit=FitConfig(steps=2000, batch=256))    # doctest: +SKIP
>>> report = compress_checkpoint("bert-dir", "bert-sparse", cfg)                     # doctest: +SKIP
>>> load_compressed(model, "bert-sparse")                                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import FLOAT_DTYPES, Checkpoint, TensorEntry, copy_passthrough, open_checkpoint
from .config import FitConfig
from .errors import SparsefitError
from .operator import GTilde

MANIFEST_FORMAT = "sparsefit.compressed"
MANIFEST_VERSION = 1
COMPRESS_CONFIG_VERSION = 1
WIDTH_MODES = ("tight", "double")

#: Default exclusions (applied when no --include is given), matched per dotted name component.
HEAD_COMPONENTS = frozenset({"lm_head", "classifier", "pooler", "qa_outputs", "score", "cls", "head", "heads"})
_NORM_COMPONENT = re.compile(r"(?i).*norm.*|ln(_.*|\d+)?|ln_f")


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how.

    include / exclude: regexes fully matching tensor names (``re.fullmatch``). Without
    ``include`` the default selection is every 2-D floating ``*.weight`` that is not an
    embedding (name contains ``embed``), a norm (a name component containing ``norm``, or
    ``ln``/``ln_1``/``ln_f``), or an output head (a component in :data:`HEAD_COMPONENTS`:
    ``lm_head``, ``classifier``, ``pooler``, ``qa_outputs``, ``score``, ``cls``, ``head``).
    depth: a fixed depth for every layer; target_error: else the smallest depth on the ladder
    reaching this relative error (data-aware with calibration). One of the two is needed to run.
    max_params_ratio: G~ may use at most this fraction of the dense parameters (default 0.5).
    width: ``"tight"`` (``max(out, in)`` rounded up to even, the default: at a fixed parameter
    budget it allows twice the depth, which fitted MiniLM layers better), ``"double"`` (the
    note's ``2·max(out, in)``) or an even integer for every layer.
    min_depth / growth: the ladder's first rung (default ``ceil(log2 width)``) and growth factor.
    fit: the per-layer fit settings (its depth/width are set per layer).
    calibration: a safetensors file of recorded layer inputs; fits then use its rows as probes.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    depth: int | None = None
    target_error: float | None = None
    max_params_ratio: float = 0.5
    width: str | int = "tight"
    min_depth: int | None = None
    growth: float = 2.0
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=3000, batch=256))
    calibration: str | None = None
    version: int = COMPRESS_CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for rx in (*self.include, *self.exclude):
            try:
                re.compile(rx)
            except re.error as e:
                raise SparsefitError(f"bad regular expression {rx!r}: {e}") from None
        if self.depth is not None and self.target_error is not None:
            raise SparsefitError("give either --depth or --target-error, not both")
        if self.depth is not None and self.depth < 1:
            raise SparsefitError(f"depth must be at least 1, got {self.depth}")
        if self.target_error is not None and not (0 < self.target_error <= 1):
            raise SparsefitError(f"target error must be in (0, 1], got {self.target_error}")
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
        if isinstance(self.fit, dict):
            object.__setattr__(self, "fit", FitConfig.from_dict(self.fit))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["fit"] = self.fit.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SparsefitError(f"unknown compress config keys: {', '.join(sorted(unknown))}")
        return cls(**{**d, "include": tuple(d.get("include", ())), "exclude": tuple(d.get("exclude", ()))})

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
        return int(self.max_params_ratio * out_features * in_features) // (2 * w)

    def ladder(self, out_features: int, in_features: int) -> list[int]:
        """Depths tried in ``target_error`` mode, shallowest first, ending at the cap."""
        cap = self.max_depth(out_features, in_features)
        if cap < 1:
            return []
        w = self.layer_width(out_features, in_features)
        d = min(cap, self.min_depth or max(1, math.ceil(math.log2(w))))
        rungs = [d]
        while rungs[-1] < cap:
            rungs.append(min(cap, max(rungs[-1] + 1, math.ceil(rungs[-1] * self.growth))))
        return rungs

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
    """A selected weight: its index (round-robin key), entry, width and depth cap."""

    index: int
    entry: TensorEntry
    width: int
    max_depth: int

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def module(self) -> str:
        return re.sub(r"\.weight$", "", self.entry.name)

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


def select_layers(entries: Sequence[TensorEntry], config: CompressConfig) -> list[LayerPlan]:
    """Apply include/exclude (``re.fullmatch``) or the default rule; validate the selection.

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
        elif not default_selected(e):
            continue
        chosen.append(e)
    if not chosen:
        raise SparsefitError("no tensor selected for compression; check --include/--exclude (see --dry-run)")
    plans = []
    for i, e in enumerate(chosen):
        m, k = e.shape
        plans.append(LayerPlan(i, e, config.layer_width(m, k), config.max_depth(m, k)))
    return plans


# ----------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------
def deepen(op: GTilde, depth: int, seed: int = 0) -> GTilde:
    """A deeper operator equal to ``op``: appends identity-initialised layers after its last one.

    Layers are added in pairs with permutations ``P`` then ``P⁻¹`` (random, seeded) and identity
    blocks, so the product is unchanged but the new layers mix along fresh random pairings once
    trained; an odd extra layer uses the identity permutation. ``op`` is not modified.
    """
    extra = depth - op.depth
    if extra < 0:
        raise SparsefitError(f"cannot deepen a depth-{op.depth} operator to depth {depth}")
    n = op.width
    gen = torch.Generator().manual_seed(seed * 1_000_003 + op.depth)
    perms = [op.perms.detach().cpu()]
    while extra >= 2:
        p = torch.randperm(n, generator=gen)
        perms += [p[None], torch.argsort(p)[None]]
        extra -= 2
    if extra:
        perms.append(torch.arange(n)[None])
    eye = torch.eye(2, dtype=op.blocks.dtype).expand(depth - op.depth, n // 2, 2, 2)
    blocks = torch.cat([op.blocks.detach().cpu(), eye])
    return GTilde(
        op.in_features,
        op.out_features,
        depth,
        n,
        seed=op.seed,
        sampler=op.sampler,
        dtype=op.blocks.dtype,
        device=op.blocks.device,
        perms=torch.cat(perms),
        blocks=blocks,
    )


@dataclass
class LayerRecord:
    """The outcome for one selected weight (one entry of the manifest)."""

    name: str
    shape: tuple[int, int]
    dtype: str
    status: str  # "compressed" or "dense"
    depth: int | None
    width: int
    params_before: int
    params_after: int
    relative_error: float | None
    relative_error_method: str | None
    data_relative_error: float | None
    svd_rank: int | None
    svd_relative_error: float | None
    depths_tried: list[int]
    errors_tried: list[float]
    seconds: float
    reason: str = ""
    file: str = ""
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Interrupted(KeyboardInterrupt):
    """A fit was stopped (Ctrl-C); finished layers are on disk and the run can be resumed."""


def compress_matrix(
    a: torch.Tensor,
    config: CompressConfig,
    *,
    name: str = "matrix",
    probes: Any = None,
    callbacks: Sequence[Any] = (),
) -> tuple[LayerRecord, GTilde | None]:
    """Fit one weight ``a: (out, in)`` per ``config``; returns ``(record, operator or None if dense)``.

    The fit runs on ``a / s`` with ``s = ||a||_F / sqrt(min(out, in))`` (mean squared singular
    value 1, the scale of the orthogonal start the schedule was made for); the last layer's blocks
    are multiplied by ``s`` afterwards. ``probes`` (an :class:`~sparsefit.calibration.ActivationProbes`)
    makes the fit data-aware and the target error refer to its held-out rows.
    """
    from .fitting import fit

    if config.depth is None and config.target_error is None:
        raise SparsefitError("give --depth or --target-error (the depth rule for every layer)")
    m, k = a.shape
    width = config.layer_width(m, k)
    cap = config.max_depth(m, k)
    a = a.detach().to("cpu", torch.float32)
    rec = LayerRecord(name, (m, k), "", "dense", None, width, m * k, m * k, None, None, None, None, None, [], [], 0.0)
    if cap < 1:
        rec.reason = f"even depth 1 ({2 * width} params) exceeds the cap of {config.max_params_ratio:g}×{m * k}"
        return rec, None
    depths = [config.depth] if config.depth is not None else config.ladder(m, k)
    if config.depth is not None and config.depth > cap:
        rec.reason = f"depth {config.depth} exceeds the cap (max depth {cap} at ratio {config.max_params_ratio:g})"
        return rec, None
    norm = float(torch.linalg.norm(a.double()))
    scale = norm / math.sqrt(min(m, k)) if norm > 0 else 1.0
    target = a / scale
    t0 = time.perf_counter()
    prev: GTilde | None = None
    chosen = None
    for d in depths:
        init = deepen(prev, d, config.fit.seed) if prev is not None else None
        fc = config.fit.replace(depth=d, width=width)
        result = fit(target, fc, callbacks, init=init, probes=probes)
        if result.interrupted:
            raise Interrupted(name)
        err = result.metrics.relative_error
        data_err = None
        if probes is not None:
            from .calibration import data_relative_error

            data_err = data_relative_error(result.operator, target, probes.holdout)
        judged = data_err if data_err is not None else err
        rec.depths_tried.append(d)
        rec.errors_tried.append(judged)
        chosen = (result, data_err)
        if config.target_error is None or judged <= config.target_error:
            break
        prev = result.operator
    rec.seconds = time.perf_counter() - t0
    assert chosen is not None
    result, data_err = chosen
    met = result.metrics
    rec.depth, rec.relative_error, rec.relative_error_method = met.depth, met.relative_error, met.relative_error_method
    rec.data_relative_error = data_err
    rec.svd_rank, rec.svd_relative_error = met.svd_rank, met.svd_relative_error
    if config.target_error is not None and rec.errors_tried[-1] > config.target_error:
        rec.reason = f"target {config.target_error:g} not met within the cap: best {min(rec.errors_tried):.4g} at depth {rec.depths_tried[-1]}"
        return rec, None
    op = result.operator.cpu()
    with torch.no_grad():
        op.blocks[-1].mul_(scale)
    rec.status = "compressed"
    rec.params_after = op.num_parameters
    return rec, op


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Start a gloo process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); True if started.

    Also divides the CPU threads between the ranks.
    """
    import datetime

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    return True


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Whole checkpoints
# ----------------------------------------------------------------------------------------------
@dataclass
class CompressReport:
    """What :func:`compress_checkpoint` did (``layers`` in selection order)."""

    source: str
    output: str | None
    layers: list[LayerRecord]
    total_params: int
    dense_files: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def params_saved(self) -> int:
        return sum(r.params_before - r.params_after for r in self.layers)

    def totals(self) -> dict[str, Any]:
        sel_before = sum(r.params_before for r in self.layers)
        sel_after = sum(r.params_after for r in self.layers)
        return {
            "selected_layers": len(self.layers),
            "compressed_layers": sum(r.status == "compressed" for r in self.layers),
            "selected_params_before": sel_before,
            "selected_params_after": sel_after,
            "model_params_before": self.total_params,
            "model_params_after": self.total_params - sel_before + sel_after,
            "params_saved": sel_before - sel_after,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "source": self.source,
            "output": self.output,
            "complete": True,
            "config": self.config,
            "totals": self.totals(),
            "layers": [r.to_dict() for r in self.layers],
            "dense_files": self.dense_files,
            "copied": self.copied,
            "resumed_layers": self.skipped,
            "seconds": self.seconds,
        }


def plan_checkpoint(source: str | os.PathLike[str], config: CompressConfig) -> tuple[Checkpoint, list[LayerPlan]]:
    """Open and validate ``source`` and the selection (no fitting, nothing written): the dry run."""
    ckpt = open_checkpoint(source)
    plans = select_layers(ckpt.entries, config)
    if config.calibration is not None:
        from .calibration import Calibration

        calib = Calibration(config.calibration)
        for p in plans:
            calib.check(p.name, p.entry.shape[1])
    return ckpt, plans


def _layer_key(config: CompressConfig, plan: LayerPlan, calib_fp: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": plan.name,
        "shape": list(plan.entry.shape),
        "dtype": plan.entry.dtype,
        "settings": config.fit_key(),
        "calibration": calib_fp,
    }


def _read_layer_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a finished layer file, or None when absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        header = json.loads(meta["sparsefit"])
    except Exception:  # a foreign or damaged file is simply redone
        return None
    return header if isinstance(header, dict) and header.get("format") == MANIFEST_FORMAT + ".layer" else None


def _write_layer(path: Path, plan: LayerPlan, rec: LayerRecord, op: GTilde | None, a: torch.Tensor, key: dict) -> None:
    from .fileformat import make_header, operator_tensors, save_safetensors

    header: dict[str, Any] = {"format": MANIFEST_FORMAT + ".layer", "format_version": MANIFEST_VERSION, "key": key}
    header["record"] = rec.to_dict()
    if op is not None:
        tensors = operator_tensors(op, prefix=plan.module + ".")
        header["operator"] = make_header(op, has_bias=False)
    else:
        tensors = {plan.name: a.contiguous()}
    save_safetensors(path, tensors, metadata={"sparsefit": json.dumps(header, sort_keys=True)})


def prepare_output(output: Path) -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not a compress output."""
    if output.exists() and not output.is_dir():
        raise SparsefitError(f"output {output} is a file; give a folder (it will be created)")
    if (
        output.is_dir()
        and any(output.iterdir())
        and not (output / "manifest.json").exists()
        and not (output / "layers").is_dir()
    ):
        raise SparsefitError(f"output folder {output} is not empty and holds no sparsefit compression; choose another")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise SparsefitError(f"cannot create {output}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SparsefitError(f"cannot create {output}: permission denied")


def compress_checkpoint(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: CompressConfig,
    callbacks: Sequence[Any] = (),
) -> CompressReport:
    """Compress the selected weights of ``source`` into the folder ``output`` (see the module doc).

    callbacks: objects with optional ``on_plan(plans)``, ``on_layer_start(plan)``,
    ``on_layer_end(plan, record, resumed: bool)`` and the fit callbacks (``on_start``,
    ``on_step``, ``on_end``) for each fit. Under ``torch.distributed`` each rank fits the layers
    whose index ≡ rank (mod world size); every rank returns the full report.
    Raises :class:`Interrupted` (a ``KeyboardInterrupt``) when a fit is stopped; rerun to resume.
    """
    from .calibration import ActivationProbes, Calibration

    if config.depth is None and config.target_error is None:
        raise SparsefitError("give --depth or --target-error (the depth rule for every layer)")
    t_start = time.perf_counter()
    ckpt, plans = plan_checkpoint(source, config)
    calib = Calibration(config.calibration) if config.calibration else None
    calib_fp = calib.fingerprint() if calib else None
    out = Path(output)
    prepare_output(out)
    rank, world = dist_info()
    (out / "layers").mkdir(parents=True, exist_ok=True)
    _emit(callbacks, "on_plan", plans)

    skipped: list[str] = []
    dense_files: list[str] = []
    n_shards = len(ckpt.shards)
    selected = {p.name for p in plans}
    for s in range(n_shards):
        mine = [p for p in plans if p.entry.shard == s and p.index % world == rank]
        untouched = [e for e in ckpt.shard_entries(s) if e.name not in selected]
        dense_name = f"dense-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        if untouched:
            dense_files.append(dense_name)
        if not mine and not (rank == 0 and untouched):
            continue
        with ckpt.shard(s) as reader:
            for plan in mine:
                key = _layer_key(config, plan, calib_fp)
                path = out / "layers" / f"{plan.index:05d}.safetensors"
                header = _read_layer_header(path)
                if header is not None and header.get("key") == key:
                    skipped.append(plan.name)
                    _emit(callbacks, "on_layer_end", plan, LayerRecord.from_dict(header["record"]), True)
                    continue
                _emit(callbacks, "on_layer_start", plan)
                a = reader.get(plan.name)
                if not torch.isfinite(a).all():
                    raise SparsefitError(f"{plan.name}: the weight contains NaN or Inf")
                probes = ActivationProbes(calib.rows(plan.name), seed=config.fit.seed) if calib is not None else None
                rec, op = compress_matrix(a.float(), config, name=plan.name, probes=probes, callbacks=callbacks)
                rec.dtype, rec.rank, rec.file = plan.entry.dtype, rank, f"layers/{path.name}"
                _write_layer(path, plan, rec, op, a, key)
                _emit(callbacks, "on_layer_end", plan, rec, False)
                del a, op
            if rank == 0 and untouched:
                _write_dense(out / dense_name, reader, untouched, str(ckpt.shards[s].name))
    _barrier()

    records = []
    for plan in plans:
        path = out / "layers" / f"{plan.index:05d}.safetensors"
        header = _read_layer_header(path)
        if header is None or header.get("key") != _layer_key(config, plan, calib_fp):
            raise SparsefitError(f"{path}: layer file missing or stale after the run; rerun to resume")
        records.append(LayerRecord.from_dict(header["record"]))
    total = sum(e.numel for e in ckpt.entries if e.dtype in FLOAT_DTYPES)
    report = CompressReport(
        str(source), str(out), records, total, dense_files=dense_files, skipped=skipped, config=config.to_dict()
    )
    if rank == 0:
        report.copied = copy_passthrough(ckpt.passthrough_files(), out)
        report.seconds = time.perf_counter() - t_start
        from .fileformat import save_text

        save_text(out / "manifest.json", json.dumps(report.to_dict(), indent=2) + "\n")
    _barrier()
    report.seconds = time.perf_counter() - t_start
    return report


def _write_dense(path: Path, reader: Any, entries: list[TensorEntry], shard_name: str) -> None:
    """Write one shard's untouched tensors (skipped when an identical file is already there)."""
    from safetensors import safe_open

    from .fileformat import save_safetensors

    want = {"source_shard": shard_name, "tensors": json.dumps([[e.name, list(e.shape), e.dtype] for e in entries])}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}) == want:
                    return
        except Exception:  # a damaged file is rewritten
            pass
    tensors = {e.name: reader.get(e.name).contiguous() for e in entries}
    save_safetensors(path, tensors, metadata=want)


def _emit(callbacks: Sequence[Any], name: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a compressed folder."""
    p = Path(path)
    mpath = p / "manifest.json" if p.is_dir() else p
    if not mpath.is_file():
        if p.is_dir() and (p / "layers").is_dir():
            raise SparsefitError(f"{p}: the compression is unfinished (no manifest.json); rerun compress to resume it")
        raise SparsefitError(f"{p}: not a compressed model folder (no manifest.json)")
    try:
        man = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise SparsefitError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        raise SparsefitError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    v = man.get("format_version")
    if not isinstance(v, int) or not (1 <= v <= MANIFEST_VERSION):
        raise SparsefitError(f"{mpath}: format_version {v!r} is not supported; upgrade sparsefit")
    return man


def load_layer(folder: Path, rec: dict[str, Any], device: Any = None) -> tuple[GTilde | None, dict[str, torch.Tensor]]:
    """One layer file: ``(operator, {})`` for a compressed layer, ``(None, {weight name: tensor})`` for a dense one."""
    from safetensors.torch import load_file

    from .fileformat import operator_from_tensors

    path = folder / rec["file"]
    header = _read_layer_header(path)
    if header is None:
        raise SparsefitError(f"{path}: missing or not a sparsefit layer file")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise SparsefitError(f"{path}: cannot read tensors ({e}); the file may be truncated") from None
    if rec["status"] != "compressed":
        return None, tensors
    module = re.sub(r"\.weight$", "", rec["name"])
    op, _ = operator_from_tensors(tensors, header["operator"], prefix=module + ".", where=str(path), device=device)
    return op, {}


@dataclass
class LoadReport:
    """What :func:`load_compressed` did."""

    replaced: list[str]
    loaded: int
    missing: list[str]
    unexpected: list[str]


def _resolver(model: nn.Module, keys: set[str]) -> Callable[[str], str | None]:
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(name: str) -> str | None:
        if name in keys:
            return name
        if prefix and f"{prefix}.{name}" in keys:
            return f"{prefix}.{name}"
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in keys:
            return name[len(prefix) + 1 :]
        return None

    return resolve


def load_compressed(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = False, backend: str = "auto"
) -> LoadReport:
    """Swap the compressed ``nn.Linear`` modules of ``model`` for :class:`~sparsefit.SparseLinear`
    (biases kept) and load every other tensor from the compressed folder ``path``.

    Names are matched as stored, or with/without the model's ``base_model_prefix`` (so a
    ``BertModel`` checkpoint loads into ``BertForSequenceClassification``). ``strict=True``
    raises when a model tensor was not in the folder or a folder tensor has no place in the model.

    Example
    -------
    >>> model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(out))  # doctest: +SKIP
    >>> load_compressed(model, out)                                                               # doctest: +SKIP
    """
    from safetensors import safe_open

    from .nn import SparseLinear

    folder = Path(path)
    man = read_manifest(folder)
    keys = set(model.state_dict().keys())
    resolve = _resolver(model, keys)
    replaced: list[str] = []
    dense_parts: list[dict[str, torch.Tensor]] = []
    for rec in man["layers"]:
        key = resolve(rec["name"])
        if key is None:
            raise SparsefitError(f"the model has no parameter {rec['name']!r}; is this the right model for {folder}?")
        module_name = re.sub(r"\.weight$", "", key)
        module = model.get_submodule(module_name)
        if rec["status"] != "compressed":
            _, tensors = load_layer(folder, rec)
            dense_parts.append({key: tensors[rec["name"]]})
            continue
        if not isinstance(module, nn.Linear):
            raise SparsefitError(f"{module_name} is a {type(module).__name__}, not nn.Linear; it cannot be swapped")
        if (module.out_features, module.in_features) != tuple(rec["shape"]):
            raise SparsefitError(
                f"{module_name}: the model's layer is {module.out_features}x{module.in_features}, the compressed one {tuple(rec['shape'])}"
            )
        op, _ = load_layer(folder, rec, device=module.weight.device)
        assert op is not None
        new = SparseLinear(op, module.bias, backend=backend)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(module_name)
    new_keys = set(model.state_dict().keys())
    resolve = _resolver(model, new_keys)
    loaded: set[str] = set()
    unexpected: list[str] = []

    def load_part(part: dict[str, torch.Tensor]) -> None:
        mapped = {}
        for name, t in part.items():
            key = resolve(name)
            if key is None:
                unexpected.append(name)
            else:
                mapped[key] = t
        model.load_state_dict(mapped, strict=False)
        loaded.update(mapped)

    for part in dense_parts:
        load_part(part)
    for fname in man.get("dense_files", []):
        fpath = folder / fname
        try:
            with safe_open(str(fpath), framework="pt") as f:
                part = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise SparsefitError(f"{fpath}: cannot read ({e}); the folder is incomplete") from None
        load_part(part)
        del part
    sparse_params = {f"{r}.operator.{n}" for r in replaced for n in ("blocks", "perms")}
    missing = sorted(k for k in new_keys if k not in loaded and k not in sparse_params)
    if strict and (missing or unexpected):
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SparsefitError(f"{folder} does not match the model: {what}")
    return LoadReport(replaced, len(loaded), missing, unexpected)


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def verify_compressed(
    output: str | os.PathLike[str], source: str | os.PathLike[str], *, seed: int = 0, use_transformers: bool = True
) -> dict[str, Any]:
    """Reload a compressed folder and check it against the source.

    Always: every compressed layer's G~ against its dense weight (exact relative error, which
    must agree with the manifest). For a model folder with ``config.json`` when ``transformers``
    is installed: the original and the compressed ``AutoModel`` on a few random token ids
    (relative error and cosine similarity of the last hidden states). Raises on a mismatch.
    """
    folder = Path(output)
    man = read_manifest(folder)
    ckpt = open_checkpoint(source)
    entries = ckpt.by_name()
    layer_checks = []
    for s in range(len(ckpt.shards)):
        recs = [r for r in man["layers"] if r["status"] == "compressed" and entries[r["name"]].shard == s]
        if not recs:
            continue
        with ckpt.shard(s) as reader:
            for rec in recs:
                op, _ = load_layer(folder, rec)
                assert op is not None
                a = reader.get(rec["name"]).double()
                g = op.to_dense(torch.float64)
                err = float(torch.linalg.norm(g - a) / torch.linalg.norm(a))
                exact = rec["relative_error_method"] == "exact" and rec["relative_error"] is not None
                ok = not exact or abs(err - rec["relative_error"]) <= 1e-3 + 1e-2 * err
                layer_checks.append(
                    {"name": rec["name"], "relative_error": err, "recorded": rec["relative_error"], "ok": ok}
                )
    bad = [c for c in layer_checks if not c["ok"]]
    if bad:
        raise SparsefitError(
            f"verify: layer {bad[0]['name']} reloads with error {bad[0]['relative_error']:.4g}, manifest says {bad[0]['recorded']:.4g}"
        )
    result: dict[str, Any] = {"layers": layer_checks, "model": None}
    if use_transformers and ckpt.config_json is not None:
        try:
            import transformers
        except ImportError:
            result["model"] = {"skipped": "transformers is not installed"}
            return result
        result["model"] = _verify_hf(transformers, Path(source), folder, seed)
    return result


def _verify_hf(transformers: Any, source: Path, folder: Path, seed: int) -> dict[str, Any]:
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder))  # never trust_remote_code
    except (ValueError, OSError, KeyError) as e:
        return {"skipped": f"transformers cannot build this model ({str(e).splitlines()[0][:120]})"}
    original = transformers.AutoModel.from_pretrained(str(source)).eval()
    compressed = transformers.AutoModel.from_config(cfg).eval()
    rep = load_compressed(compressed, folder)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(cfg, "vocab_size", 1000))
    ids = torch.randint(min(vocab - 1, 1000), vocab, (2, 16), generator=gen)
    ref = original(input_ids=ids).last_hidden_state.double()
    got = compressed(input_ids=ids).last_hidden_state.double()
    if not torch.isfinite(got).all():
        raise SparsefitError("verify: the compressed model produced NaN or Inf")
    rel = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
    cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean())
    return {
        "architecture": type(compressed).__name__,
        "replaced": len(rep.replaced),
        "missing": rep.missing,
        "hidden_relative_error": rel,
        "hidden_cosine": cos,
    }
