"""Reading model checkpoints one shard at a time, without loading the whole model.

A checkpoint is one of:

* a Hugging Face-style model folder: ``model.safetensors``, or shards listed by
  ``model.safetensors.index.json``, or ``pytorch_model.bin`` (or its sharded index), usually beside
  ``config.json`` and tokenizer files;
* a single ``.safetensors`` file;
* a ``.pt`` / ``.pth`` / ``.bin`` state dict, read with ``torch.load(weights_only=True, mmap=True)``
  (files holding pickled code are refused).

:func:`open_checkpoint` validates every shard's header up front (so a truncated shard is found
before any work starts) and lists every tensor with its shape and dtype; :meth:`Checkpoint.shard`
opens one shard and reads tensors from it one by one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SparsefitError
from .headers import safetensors_header
from .targets import load_state_dict_file

#: safetensors dtype codes → torch dtype names.
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: Weight files that are never copied through to a compressed output folder.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".gguf")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: ``shard`` indexes :attr:`Checkpoint.shards`."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class Checkpoint:
    """A validated checkpoint: its shards and every tensor's name, shape, dtype and shard."""

    path: Path
    kind: str  # "hf-dir", "safetensors" or "torch"
    shards: list[Path]
    entries: list[TensorEntry]
    model_dir: Path | None = None
    _torch_cache: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def config_json(self) -> Path | None:
        if self.model_dir is not None and (self.model_dir / "config.json").is_file():
            return self.model_dir / "config.json"
        return None

    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}

    def shard_entries(self, shard: int) -> list[TensorEntry]:
        return [e for e in self.entries if e.shard == shard]

    @contextlib.contextmanager
    def shard(self, index: int) -> Iterator[ShardReader]:
        """Open shard ``index``; the reader's ``get(name)`` reads one tensor at a time."""
        path = self.shards[index]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                f = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for corrupt files
                raise SparsefitError(f"{path}: cannot read tensors ({_one_line(e)}); is it truncated?") from None
            with f:
                yield ShardReader(path, f.get_tensor)
        else:
            state = load_torch_state(path, mmap=True)
            yield ShardReader(path, lambda name: state[name])
            del state

    def passthrough_files(self) -> list[Path]:
        """Files of a model folder that are not weights (config, tokenizer, …), to copy through.

        Top-level files, and sub-folders holding no weight files (e.g. sentence-transformers'
        ``1_Pooling``); hidden files are skipped.
        """
        if self.model_dir is None:
            return []
        out: list[Path] = []
        for p in sorted(self.model_dir.iterdir()):
            if p.name.startswith(".") or p.name.endswith(".index.json"):
                continue
            if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES):
                out.append(p)
            elif p.is_dir() and not any(q.name.endswith(_WEIGHT_SUFFIXES) for q in p.rglob("*")):
                out.append(p)
        return out


@dataclass
class ShardReader:
    path: Path
    _get: Any

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._get(name)
        except KeyError:
            raise SparsefitError(f"{self.path}: tensor {name!r} listed in the index is not in the shard") from None
        except SparsefitError:
            raise
        except Exception as e:  # safetensors raises its own error type for unreadable data
            raise SparsefitError(
                f"{self.path}: cannot read tensor {name!r} ({_one_line(e)}); is it truncated?"
            ) from None


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------
def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Validate ``path`` (folder, ``.safetensors`` or ``.pt/.pth/.bin``) and list its tensors.

    Reads only headers (safetensors) or maps the file lazily (torch), so memory stays small.
    Raises :class:`SparsefitError` for a missing path, a folder without weights, a truncated
    shard, an inconsistent index or a pickle holding code.
    """
    p = Path(path)
    if not p.exists():
        raise SparsefitError(f"{p}: no such file or folder")
    if p.is_dir():
        return _open_dir(p)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        entries = _safetensors_entries(p, 0)
        return Checkpoint(p, "safetensors", [p], entries)
    if suffix in TORCH_SUFFIXES:
        return Checkpoint(p, "torch", [p], _torch_entries(p, 0))
    raise SparsefitError(
        f"{p}: unknown checkpoint type {suffix or '(none)'}; give a model folder, a .safetensors file or a .pt/.pth/.bin state dict"
    )


def _open_dir(d: Path) -> Checkpoint:
    # Hugging Face layouts in order of preference: sharded or single, safetensors before pickles.
    for stem, read_entries in (("model.safetensors", _safetensors_entries), ("pytorch_model.bin", _torch_entries)):
        index, single = d / f"{stem}.index.json", d / stem
        if index.is_file():
            shards, names = _read_index(index)
            entries: list[TensorEntry] = []
            for i, s in enumerate(shards):
                entries += read_entries(s, i)
            _check_index(index, names, entries)
            return Checkpoint(d, "hf-dir", shards, entries, model_dir=d)
        if single.is_file():
            return Checkpoint(d, "hf-dir", [single], read_entries(single, 0), model_dir=d)
    others = sorted(q.name for q in d.glob("*.safetensors"))
    if not (d / "config.json").is_file():
        if others:
            raise SparsefitError(
                f"{d}: no config.json and no model.safetensors; give one of the .safetensors files ({', '.join(others[:3])}) directly"
            )
        raise SparsefitError(
            f"{d}: not a model folder: no config.json and no model.safetensors (or .index.json) inside"
        )
    raise SparsefitError(
        f"{d}: has config.json but no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("empty weight_map")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise SparsefitError(f"{index}: not a valid shard index ({_one_line(e)})") from None
    files: list[str] = []
    for f in weight_map.values():
        if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts:
            raise SparsefitError(f"{index}: shard name {f!r} is not a file name inside {index.parent}")
        if f not in files:
            files.append(f)
    shards = []
    for f in sorted(files):
        s = index.parent / f
        if not s.is_file():
            raise SparsefitError(f"{index}: shard {f} is listed but missing from {index.parent}")
        shards.append(s)
    return shards, {str(k): str(v) for k, v in weight_map.items()}


def _check_index(index: Path, names: dict[str, str], entries: list[TensorEntry]) -> None:
    seen: dict[str, TensorEntry] = {}
    for e in entries:
        if e.name in seen:
            raise SparsefitError(f"{index}: tensor {e.name!r} appears in two shards")
        seen[e.name] = e
    missing = [n for n in names if n not in seen]
    if missing:
        raise SparsefitError(f"{index}: tensor {missing[0]!r} is listed but in no shard ({len(missing)} missing)")


def _safetensors_entries(p: Path, shard: int) -> list[TensorEntry]:
    from safetensors import safe_open

    safetensors_header(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            out = []
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                out.append(TensorEntry(name, tuple(int(s) for s in sl.get_shape()), dtype, shard))
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise SparsefitError(f"{p}: not a readable safetensors file ({_one_line(e)}); is it truncated?") from None
    return out


def load_torch_state(p: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """``torch.load(p, weights_only=True)`` (memory-mapped when the file allows), as a flat dict of tensors."""
    obj = load_state_dict_file(p, mmap=mmap)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SparsefitError(f"{p}: holds a {type(obj).__name__}, expected a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_entries(p: Path, shard: int) -> list[TensorEntry]:
    state = load_torch_state(p, mmap=True)
    if not state:
        raise SparsefitError(f"{p}: the state dict holds no tensors")
    return [TensorEntry(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), shard) for k, v in state.items()]


# ----------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------
def copy_passthrough(files: list[Path], dest: Path) -> list[str]:
    """Copy non-weight files/folders into ``dest`` (each atomically); returns the names copied."""
    from .fileformat import atomic_output

    names = []
    for src in files:
        target = dest / src.name
        if src.is_dir():
            tmp = dest / f".{src.name}.part"
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        else:
            with atomic_output(target) as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out)
        names.append(src.name)
    return names


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
