"""Structured-sparse compression of models: ``compress_checkpoint`` and ``load_compressed``.

Every selected ``out × in`` weight of a checkpoint is replaced by a fitted G~ (see
:mod:`sparsefit.operator`), layer by layer, holding one shard and one weight in memory at a time.
The folder format is described in :mod:`.format`.

Modules: :mod:`.config` (what to compress, the selection rule), :mod:`.calibrate` (calibration
statistics from text or recorded inputs), :mod:`.layer` (the one per-layer fit and its record),
:mod:`.replacement` (what replaces a weight), :mod:`.writer` (the checkpoint workflow,
resumable), :mod:`.inplace` (:func:`compress_`, in memory), :mod:`.distributed` (``torchrun``),
:mod:`.format` (the files), :mod:`.load` (into a model), :mod:`.verify`, :mod:`.hf`
(``transformers`` models), :mod:`.evaluate` (quality on held-out text against SVD baselines).

Depth per layer: a fixed ``depth``, or the smallest depth on the ladder ``d0, 2·d0, 4·d0, …, cap``
reaching ``target_error`` (each rung warm-started from the previous fit with
:func:`sparsefit.autosize.extend_operator`). The cap is ``max_params_ratio · out · in``
parameters (G~ has ``2·width·depth``); a layer that cannot meet the target within it stays dense.

Example
-------
>>> cfg = CompressConfig(target_error=0.3, fit=FitConfig(steps=2000, batch=256))    # doctest: +SKIP
>>> report = compress_checkpoint("bert-dir", "bert-sparse", cfg)                     # doctest: +SKIP
>>> load_compressed(model, "bert-sparse")                                            # doctest: +SKIP
"""

from __future__ import annotations

from .calibrate import LayerStats, builtin_sentences, collect_stats, read_text_samples, tokenizer_batches
from .config import HEAD_COMPONENTS, WIDTH_MODES, CompressConfig, LayerPlan, default_selected, select_layers
from .distributed import dist_info, init_distributed_from_env, torchrun_session
from .format import MANIFEST_FORMAT, MANIFEST_VERSION, load_layer, read_manifest
from .inplace import compress_
from .layer import Interrupted, LayerRecord, compress_matrix, fit_layer
from .load import LoadReport, load_compressed
from .replacement import Replacement
from .verify import verify_compressed
from .writer import CompressReport, compress_checkpoint, plan_checkpoint, prepare_output

__all__ = [
    "HEAD_COMPONENTS",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "WIDTH_MODES",
    "CompressConfig",
    "CompressReport",
    "Interrupted",
    "LayerPlan",
    "LayerRecord",
    "LayerStats",
    "Replacement",
    "LoadReport",
    "builtin_sentences",
    "collect_stats",
    "compress_",
    "compress_checkpoint",
    "compress_matrix",
    "default_selected",
    "dist_info",
    "fit_layer",
    "init_distributed_from_env",
    "load_compressed",
    "load_layer",
    "plan_checkpoint",
    "prepare_output",
    "read_manifest",
    "read_text_samples",
    "select_layers",
    "tokenizer_batches",
    "torchrun_session",
    "verify_compressed",
]
