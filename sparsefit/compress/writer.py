"""The checkpoint workflow: :func:`compress_checkpoint` writes a compressed folder layer by layer.

One shard and one weight are in memory at a time. Per-layer files are written atomically and
carry the settings that produced them, so an interrupted run resumes: layers whose file is there
with matching settings are skipped. Layers are split round-robin across ``torch.distributed``
ranks (``torchrun``, see :mod:`.distributed`); rank 0 writes the untouched tensors and, after a
barrier, the manifest. The files hold no timings, so the same command gives the same bytes, also
when a killed run (even SIGKILL mid-write) is resumed; a rank that fails stops the others.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import FLOAT_DTYPES, Checkpoint, TensorEntry, copy_passthrough, open_checkpoint
from ..errors import SparsefitError
from ..fitting import _emit as emit
from .budget import checkpoint_budgets
from .config import CompressConfig, LayerPlan, select_layers
from .distributed import RankGroup, dist_info
from .format import MANIFEST_FORMAT, MANIFEST_VERSION, read_layer_header, write_layer
from .layer import LayerRecord, fit_layer


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
    distill: dict[str, Any] | None = None

    @property
    def params_saved(self) -> int:
        return sum(r.params_before - r.params_after for r in self.layers)

    @property
    def kept_fraction(self) -> float:
        """Parameters of the selected layers after / before."""
        before = sum(r.params_before for r in self.layers)
        return sum(r.params_after for r in self.layers) / before if before else 1.0

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

    def to_dict(self, run: bool = True) -> dict[str, Any]:
        """The report as JSON; ``run=False`` (the manifest) leaves out what differs between runs of
        the same command (seconds, which layers were resumed), so it always gives the same bytes."""
        d = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "source": self.source,
            "output": self.output,
            "complete": True,
            "config": self.config,
            "totals": self.totals(),
            "kept_fraction": self.kept_fraction,
            "layers": [r.to_dict() if run else r.to_file_dict() for r in self.layers],
            "dense_files": self.dense_files,
            "copied": self.copied,
            **({"distill": self.distill} if self.distill is not None else {}),
        }
        if run:
            d.update(resumed_layers=self.skipped, seconds=self.seconds)
        return d


def plan_checkpoint(source: str | os.PathLike[str], config: CompressConfig) -> tuple[Checkpoint, list[LayerPlan]]:
    """Open and validate ``source`` and the selection (no fitting, nothing written): the dry run."""
    from .calibrate import calibration_samples, is_activation_file
    from .hf import linear_weights, model_folder

    ckpt = open_checkpoint(source)
    known = linear_weights(source, [e.name for e in ckpt.entries])
    linear, conv = known if known is not None else (None, frozenset())
    plans = select_layers(ckpt.entries, config, conv, linear)
    if config.calibration is not None:
        if is_activation_file(config.calibration):
            from ..calibration import Calibration

            calib = Calibration(config.calibration)
            for p in plans:
                calib.check(p.name, p.shape[1])
        else:
            model_folder(source)
            calibration_samples(config.calibration)  # readable and not empty, before anything is written
    return ckpt, plans


def open_stats(
    source: str | os.PathLike[str], plans: list[LayerPlan], config: CompressConfig, out: Path, callbacks: Sequence[Any]
) -> tuple[Any, dict[str, Any] | None]:
    """The calibration statistics source (``.get(weight name) -> LayerStats``) and its fingerprint.

    Text calibration runs once (rank 0) and is saved as ``calibration.safetensors`` in ``out``;
    a rerun with the same text and layers reuses it.
    """
    from .calibrate import STATS_FILE, ActivationStats, StatsFile, is_activation_file, text_stats

    if config.calibration is None:
        return None, None
    if is_activation_file(config.calibration):
        acts = ActivationStats(config.calibration)
        return acts, acts.fingerprint()
    path = out / STATS_FILE
    with RankGroup() as group:
        if group.rank == 0:
            text_stats(
                source, [p.name for p in plans], config.calibration, path, seed=config.fit.seed, callbacks=callbacks
            )
        group.barrier()
    stats = StatsFile(path)
    return stats, stats.key


def _layer_key(config: CompressConfig, plan: LayerPlan, calib_fp: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": plan.name,
        "shape": list(plan.entry.shape),
        "dtype": plan.entry.dtype,
        "settings": config.fit_key(),
        "calibration": calib_fp,
    }


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
    """Compress the selected weights of ``source`` into the folder ``output`` (see :mod:`sparsefit.compress`).

    callbacks: objects with optional ``on_plan(plans)``, ``on_layer_start(plan)``,
    ``on_layer_end(plan, record, resumed: bool)`` and the fit callbacks (``on_start``,
    ``on_step``, ``on_end``) for each fit. Under ``torch.distributed`` each rank fits the layers
    whose index ≡ rank (mod world size); every rank returns the full report.
    Raises :class:`~sparsefit.compress.Interrupted` (a ``KeyboardInterrupt``) when a fit is
    stopped; rerun to resume.
    """
    if not config.has_rule:
        raise SparsefitError("give --depth, --target-error or --keep (the depth rule for every layer)")
    t_start = time.perf_counter()
    ckpt, plans = plan_checkpoint(source, config)
    out = Path(output)
    prepare_output(out)
    rank, world = dist_info()
    (out / "layers").mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out, {f"{p.index:05d}.safetensors" for p in plans if p.index % world == rank}, rank == 0)
    stats_source, calib_fp = open_stats(source, plans, config, out, callbacks)
    budgets = checkpoint_budgets(source, plans, stats_source, config)
    emit(callbacks, "on_plan", plans)

    skipped: list[str] = []
    dense_files: list[str] = []
    seconds: dict[str, float] = {}
    n_shards = len(ckpt.shards)
    selected = {p.name for p in plans}
    with RankGroup() as group:
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
                    group.check()
                    key = _layer_key(config, plan, calib_fp)
                    path = out / "layers" / f"{plan.index:05d}.safetensors"
                    header = read_layer_header(path)
                    if header is not None and header.get("key") == key:
                        skipped.append(plan.name)
                        emit(callbacks, "on_layer_end", plan, LayerRecord.from_dict(header["record"]), True)
                        continue
                    emit(callbacks, "on_layer_start", plan)
                    a = reader.get(plan.name)
                    if not torch.isfinite(a).all():
                        raise SparsefitError(f"{plan.name}: the weight contains NaN or Inf")
                    w = a.float().t().contiguous() if plan.transposed else a.float()
                    stats = stats_source.get(plan.name) if stats_source is not None else None
                    rep, rec = fit_layer(w, stats, budgets[plan.name], config, name=plan.name, callbacks=callbacks)
                    rec.dtype, rec.rank, rec.file = plan.entry.dtype, rank, f"layers/{path.name}"
                    rec.transposed = plan.transposed
                    _withdraw_manifest(out)
                    write_layer(path, plan.module, rec.to_file_dict(), rep, a, plan.name, key)
                    seconds[plan.name] = rec.seconds
                    emit(callbacks, "on_layer_end", plan, rec, False)
                    del a, w, rep, stats
                if rank == 0 and untouched:
                    _write_dense(out, dense_name, reader, untouched, str(ckpt.shards[s].name))
        group.barrier()

        records = []
        for plan in plans:
            path = out / "layers" / f"{plan.index:05d}.safetensors"
            header = read_layer_header(path)
            if header is None or header.get("key") != _layer_key(config, plan, calib_fp):
                raise SparsefitError(f"{path}: layer file missing or stale after the run; rerun to resume")
            records.append(LayerRecord.from_dict({**header["record"], "seconds": seconds.get(plan.name, 0.0)}))
        total = sum(e.numel for e in ckpt.entries if e.dtype in FLOAT_DTYPES)
        report = CompressReport(
            str(source), str(out), records, total, dense_files=dense_files, skipped=skipped, config=config.to_dict()
        )
        if rank == 0:
            report.copied = copy_passthrough(ckpt.passthrough_files(), out)
            from ..fileformat import save_text

            save_text(out / "manifest.json", json.dumps(report.to_dict(run=False), indent=2) + "\n")
        group.barrier(last=True)
    report.seconds = time.perf_counter() - t_start
    return report


def _withdraw_manifest(out: Path) -> None:
    """Remove the manifest before the folder changes: until it is written again, the folder reads
    as unfinished (so a run stopped part-way, e.g. by a full disk, never leaves a manifest that
    describes other layer files than those on disk)."""
    (out / "manifest.json").unlink(missing_ok=True)


def _remove_temp_files(out: Path, layer_files: set[str], top_level: bool) -> None:
    """Remove temporary files that a killed run left: of this rank's layer files, and of the
    folder's own files (dense shards, copies, manifest) when ``top_level`` (rank 0)."""
    from ..fileformat import temp_file_target

    for folder, mine in ((out / "layers", lambda n: n in layer_files), (out, lambda n: top_level)):
        for p in folder.iterdir():
            target = temp_file_target(p.name)
            if target is not None and mine(target) and p.is_file():
                p.unlink(missing_ok=True)


def _write_dense(out: Path, name: str, reader: Any, entries: list[TensorEntry], shard_name: str) -> None:
    """Write one shard's untouched tensors (skipped when an identical file is already there)."""
    from safetensors import safe_open

    from ..fileformat import save_safetensors

    path = out / name
    want = {"source_shard": shard_name, "tensors": json.dumps([[e.name, list(e.shape), e.dtype] for e in entries])}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}) == want:
                    return
        except Exception:  # a damaged file is rewritten
            pass
    tensors = {e.name: reader.get(e.name).contiguous() for e in entries}
    _withdraw_manifest(out)
    save_safetensors(path, tensors, metadata=want)
