"""The ``sparsefit.gtilde`` file format (safetensors) and atomic output files.

A file holds, for one operator (tensor names may carry a prefix, e.g. ``encoder.0.``, when
several operators share a file):

* ``blocks`` — ``(depth, width/2, 2, 2)``, float32/float64/float16/bfloat16, layers in
  application order, ``blocks[j, b, r, c]`` mixing positions ``2b + c`` into ``2b + r``;
* ``permutations`` — ``(depth, width)`` int32, gather convention: ``z'[i] = z[perm[j, i]]``;
* ``bias`` — ``(out_features,)``, optional.

and string metadata with a single key, ``{"sparsefit": <JSON header>}``, whose ``format`` field is
``"sparsefit.gtilde"``. (One key, because safetensors writes metadata keys in no fixed order and
the same fit must give a byte-identical file.) The header is documented in the README. Loading
validates everything before use.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import SparsefitError
from .operator import GTilde, check_shape
from .permutations import check_permutations

FORMAT_NAME = "sparsefit.gtilde"
FORMAT_VERSION = 1
LAYER_ORDER = "application"  # layer 0 is applied to the input first
PERMUTATION_CONVENTION = "gather"  # (P z)[i] = z[perm[i]]
BLOCK_LAYOUT = "blocks[j,b,r,c]: y[2b+r] += B[r,c] * z[2b+c]"

_FLOAT_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


# ----------------------------------------------------------------------------------------------
# Atomic output
# ----------------------------------------------------------------------------------------------
def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Fail early (before any long work) if ``path`` cannot be written as a file."""
    p = Path(path)
    if p.is_dir():
        raise SparsefitError(f"output {p} is a directory; give a file name, e.g. {p / 'out.safetensors'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SparsefitError(f"cannot write {p}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SparsefitError(f"cannot write {p}: permission denied; choose another output path")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# Tensors <-> operator
# ----------------------------------------------------------------------------------------------
def make_header(op: GTilde, **extra: Any) -> dict[str, Any]:
    """The JSON header describing ``op`` (plus any ``extra`` keys such as config and metrics)."""
    from . import __version__

    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sparsefit_version": __version__,
        "in_features": op.in_features,
        "out_features": op.out_features,
        "width": op.width,
        "depth": op.depth,
        "layer_order": LAYER_ORDER,
        "permutation_convention": PERMUTATION_CONVENTION,
        "block_layout": BLOCK_LAYOUT,
        "permutation_sampler": op.sampler,
        "seed": op.seed,
        "dtype": _FLOAT_DTYPES.get(op.blocks.dtype, str(op.blocks.dtype)),
    }
    header.update(extra)
    return header


def operator_tensors(
    op: GTilde, bias: torch.Tensor | None = None, prefix: str = "", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors that store ``op`` (CPU, contiguous), names prefixed with ``prefix``."""
    blocks = op.blocks.detach().to("cpu", dtype or op.blocks.dtype).contiguous()
    tensors = {
        f"{prefix}blocks": blocks,
        f"{prefix}permutations": op.perms.detach().to("cpu", torch.int32).contiguous(),
    }
    if bias is not None:
        tensors[f"{prefix}bias"] = bias.detach().to("cpu", blocks.dtype).contiguous()
    return tensors


def _header_int(header: dict[str, Any], key: str, where: str) -> int:
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SparsefitError(f"{where}: header field {key!r} must be a non-negative integer, got {v!r}")
    return v


def operator_from_tensors(
    tensors: dict[str, torch.Tensor],
    header: dict[str, Any],
    prefix: str = "",
    where: str = "file",
    device: torch.device | str | None = None,
) -> tuple[GTilde, torch.Tensor | None]:
    """Validate and rebuild ``(operator, bias or None)`` from stored tensors and header."""
    k = _header_int(header, "in_features", where)
    m = _header_int(header, "out_features", where)
    n = _header_int(header, "width", where)
    depth = _header_int(header, "depth", where)
    try:
        check_shape(m, k, depth, n)
    except SparsefitError as e:
        raise SparsefitError(f"{where}: {e}") from None
    if header.get("layer_order", LAYER_ORDER) != LAYER_ORDER:
        raise SparsefitError(f"{where}: unsupported layer_order {header.get('layer_order')!r}")
    for name in ("blocks", "permutations"):
        if f"{prefix}{name}" not in tensors:
            raise SparsefitError(
                f"{where}: tensor {prefix}{name!r} is missing; the file is not a complete sparsefit file"
            )
    blocks = tensors[f"{prefix}blocks"]
    perms = tensors[f"{prefix}permutations"]
    if blocks.dtype not in _FLOAT_DTYPES:
        raise SparsefitError(f"{where}: blocks have dtype {blocks.dtype}; expected a floating-point type")
    if tuple(blocks.shape) != (depth, n // 2, 2, 2):
        raise SparsefitError(
            f"{where}: blocks have shape {tuple(blocks.shape)}, expected {(depth, n // 2, 2, 2)} from the header"
        )
    if perms.dtype not in (torch.int32, torch.int64):
        raise SparsefitError(f"{where}: permutations have dtype {perms.dtype}; expected int32")
    try:
        check_permutations(perms, n, depth)
    except SparsefitError as e:
        raise SparsefitError(f"{where}: {e}") from None
    if not torch.isfinite(blocks.float()).all():
        raise SparsefitError(f"{where}: blocks contain NaN or Inf; the file is corrupt")
    bias = tensors.get(f"{prefix}bias")
    if bias is not None and (tuple(bias.shape) != (m,) or bias.dtype not in _FLOAT_DTYPES):
        raise SparsefitError(
            f"{where}: bias has shape {tuple(bias.shape)} and dtype {bias.dtype}, expected ({m},) float"
        )
    op = GTilde(
        k,
        m,
        depth,
        n,
        seed=int(header.get("seed", 0)),
        sampler=str(header.get("permutation_sampler", "uniform")),
        dtype=blocks.dtype,
        device=device,
        perms=perms.long(),
        blocks=blocks,
    )
    return op, (bias.to(device) if bias is not None else None)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def save(
    path: str | os.PathLike[str],
    op: GTilde,
    *,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    **header_extra: Any,
) -> dict[str, Any]:
    """Write ``op`` (and optional bias) to ``path`` atomically; returns the header written.

    ``header_extra`` (e.g. ``config=…``, ``metrics=…``) must be JSON-serialisable.
    """
    from safetensors.torch import save_file

    header = make_header(op, has_bias=bias is not None, **header_extra)
    if dtype is not None:
        header["dtype"] = _FLOAT_DTYPES[dtype]
    tensors = operator_tensors(op, bias, dtype=dtype)
    metadata = {"sparsefit": json.dumps(header, sort_keys=True)}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return header


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the JSON header of a sparsefit file without loading tensors."""
    from safetensors import safe_open

    p = _existing_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise SparsefitError(f"{p}: not a readable safetensors file ({_one_line(e)})") from None
    return _parse_header(meta, str(p))


def load(
    path: str | os.PathLike[str], device: torch.device | str | None = None
) -> tuple[GTilde, torch.Tensor | None, dict[str, Any]]:
    """Load and validate a sparsefit file: returns ``(operator, bias or None, header)``."""
    from safetensors.torch import load_file

    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise SparsefitError(f"{path}: cannot read tensors ({_one_line(e)}); the file may be truncated") from None
    op, bias = operator_from_tensors(tensors, header, where=str(path), device=device)
    return op, bias, header


def _parse_header(meta: dict[str, str], where: str) -> dict[str, Any]:
    if "sparsefit" not in meta:
        raise SparsefitError(
            f"{where}: not a sparsefit file (no 'sparsefit' metadata); was it written by sparsefit fit?"
        )
    try:
        header = json.loads(meta["sparsefit"])
    except json.JSONDecodeError:
        raise SparsefitError(f"{where}: the sparsefit header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise SparsefitError(f"{where}: the sparsefit header is not a JSON object; the file is corrupt")
    if header.get("format") != FORMAT_NAME:
        raise SparsefitError(f"{where}: format {header.get('format')!r} is not {FORMAT_NAME!r}; not a G~ file")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise SparsefitError(
            f"{where}: format_version {version!r} is not supported (this sparsefit reads up to {FORMAT_VERSION}); upgrade sparsefit"
        )
    return header


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise SparsefitError(f"{p}: no such file")
    if p.is_dir():
        raise SparsefitError(f"{p} is a directory; give a file")
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
