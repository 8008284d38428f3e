"""The compressed folder's files: manifest, one safetensors file per selected layer.

Folder layout (format ``sparsefit.compressed``)::

    manifest.json                       format, format_version, config, one record per layer, totals
    layers/00000.safetensors            one file per selected layer: the replacement's tensors
                                        (for G~ of weight `X.weight`: `X.blocks`, `X.permutations`)
                                        or `X.weight` itself when the layer stayed dense; the
                                        layer record as JSON metadata (key "sparsefit")
    dense-00001-of-00002.safetensors    the untouched tensors, one file per input shard
    config.json, tokenizer files, …     copied through from a model folder

Version history: 1 — G~ or dense layers; 2 — records carry ``structure`` and ``transposed``
(GPT-2 ``Conv1D`` weights stored ``(in, out)``). Version-1 folders load unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import SparsefitError
from .replacement import Replacement

MANIFEST_FORMAT = "sparsefit.compressed"
MANIFEST_VERSION = 2
LAYER_FORMAT = MANIFEST_FORMAT + ".layer"


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
    except (OSError, ValueError, RecursionError) as e:
        raise SparsefitError(f"{mpath}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        raise SparsefitError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    v = man.get("format_version")
    if not isinstance(v, int) or not (1 <= v <= MANIFEST_VERSION):
        raise SparsefitError(f"{mpath}: format_version {v!r} is not supported; upgrade sparsefit")
    _check_manifest(man, mpath)
    return man


def _check_manifest(man: dict[str, Any], where: Path) -> None:
    """The fields a loader relies on have the right types, and every file named lies in the folder."""
    layers, dense = man.get("layers"), man.get("dense_files", [])
    ok = isinstance(layers, list) and isinstance(dense, list) and all(_inside(f) for f in dense)
    for rec in layers if ok else []:
        ok = ok and (
            isinstance(rec, dict)
            and isinstance(rec.get("name"), str)
            and rec.get("status") in ("compressed", "dense")
            and _inside(rec.get("file"))
            and isinstance(rec.get("shape"), list)
            and len(rec["shape"]) == 2
            and all(type(s) is int and s > 0 for s in rec["shape"])
        )
    if not ok:
        raise SparsefitError(f"{where}: the manifest's layer or file list is damaged; rerun compress to rewrite it")


def _inside(name: Any) -> bool:
    """``name`` is a relative path that stays inside the folder."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def read_layer_header(path: Path) -> dict[str, Any] | None:
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
    return header if isinstance(header, dict) and header.get("format") == LAYER_FORMAT else None


def write_layer(
    path: Path,
    module: str,
    record: dict[str, Any],
    replacement: Replacement | None,
    dense: torch.Tensor,
    weight_name: str,
    key: dict,
) -> None:
    """Write one layer file atomically: the replacement's tensors, or ``dense`` (as stored) when None."""
    from ..fileformat import save_safetensors

    header: dict[str, Any] = {"format": LAYER_FORMAT, "format_version": MANIFEST_VERSION, "key": key, "record": record}
    if replacement is not None:
        tensors = replacement.tensors(module)
        header.update(replacement.header())
    else:
        tensors = {weight_name: dense.contiguous()}
    save_safetensors(path, tensors, metadata={"sparsefit": json.dumps(header, sort_keys=True)})


def load_layer(
    folder: Path, rec: dict[str, Any], device: Any = None
) -> tuple[Replacement | None, dict[str, torch.Tensor]]:
    """One layer file: ``(replacement, {})`` for a compressed layer, ``(None, {weight name: tensor})`` for a dense one."""
    import re

    from safetensors.torch import load_file

    from ..headers import safetensors_header

    path = folder / rec["file"]
    header = read_layer_header(path)
    if header is None:
        raise SparsefitError(f"{path}: missing or not a sparsefit layer file")
    safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise SparsefitError(f"{path}: cannot read tensors ({e}); the file may be truncated") from None
    if rec["status"] != "compressed":
        if rec["name"] not in tensors:
            raise SparsefitError(f"{path}: holds no tensor {rec['name']!r}; the folder is damaged, rerun compress")
        return None, tensors
    if not isinstance(header.get("operator", {}), dict):
        raise SparsefitError(f"{path}: the layer header's operator is damaged; rerun compress")
    module = re.sub(r"\.weight$", "", rec["name"])
    return Replacement.from_tensors(tensors, header, module, str(path), device), {}
