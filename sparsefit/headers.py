"""Checking what a file's header claims against the file itself, before anything is allocated.

Every reader of a user's file calls one of these first: a header that claims more data than the
file holds (a truncated or corrupt file, or a hostile one) is refused with one
:class:`SparsefitError` line, so no reader ever allocates memory for data that is not there.

* :func:`npy_header` — a ``.npy`` stream (also the members of a ``.npz``);
* :func:`safetensors_header` — a ``.safetensors`` file (header length, dtypes, shapes, offsets);
* :func:`zip_members` — a zip archive (``.npz``, PyTorch files): every member's claimed size;
* :func:`mtx_header` — a Matrix Market file (claimed shape and entry count).
"""

from __future__ import annotations

import ast
import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import SparsefitError

#: safetensors dtype code → bytes per element.
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
#: Longest header accepted: safetensors' own limit (100 MB) and a generous one for ``.npy``.
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_NPY_HEADER = 65_535
#: A deflated zip member cannot expand more than this (deflate's best ratio is about 1032:1).
MAX_DEFLATE_RATIO = 1100
#: Errors the standard library raises for malformed zip archives and their members.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    OverflowError,
)


def _prod(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape) if shape else 1


def sparse_dim_limit(file_bytes: int) -> int:
    """Largest row or column count accepted for a sparse matrix stored in ``file_bytes`` bytes.

    A sparse matrix costs memory per row (its row pointer) even when the row is empty, so the
    claimed shape is bounded by the file's size (every real row or column takes at least a byte
    to store), with a floor of 2^20 for small files of very sparse matrices.
    """
    return max(int(file_bytes), 1 << 20)


# ----------------------------------------------------------------------------------------------
# .npy
# ----------------------------------------------------------------------------------------------
def npy_header(f: BinaryIO, size: int, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Read the ``.npy`` header at ``f``'s position; check it against ``size`` (the stream's bytes).

    Returns ``(shape, dtype, fortran_order)`` with ``f`` positioned at the data. Object arrays
    (pickles) are refused.
    """
    start = f.tell()
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        raise SparsefitError(f"{where}: not a readable .npy file (no NumPy header); was it saved with numpy.save?")
    major = magic[6]
    if major not in (1, 2, 3):
        raise SparsefitError(f"{where}: .npy format version {major}.{magic[7]} is not supported")
    width = 2 if major == 1 else 4
    raw = f.read(width)
    if len(raw) < width:
        raise SparsefitError(f"{where}: the .npy header is truncated")
    hlen = int.from_bytes(raw, "little")
    if hlen > MAX_NPY_HEADER or start + 8 + width + hlen > size:
        raise SparsefitError(f"{where}: the .npy header claims {hlen:,} bytes; the file is truncated or corrupt")
    text = f.read(hlen)
    try:
        d = ast.literal_eval(text.decode("utf8" if major == 3 else "latin1"))
        if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
            raise ValueError("keys")
        shape, fortran = d["shape"], d["fortran_order"]
        if not isinstance(shape, tuple) or not all(type(s) is int for s in shape) or type(fortran) is not bool:
            raise ValueError("types")
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, UnicodeDecodeError):
        raise SparsefitError(f"{where}: the .npy header is not valid; the file is corrupt") from None
    if any(s < 0 for s in shape):
        raise SparsefitError(f"{where}: the .npy header claims a negative shape {shape}; the file is corrupt")
    if dtype.hasobject:
        raise SparsefitError(f"{where}: array holds Python objects; save a numeric array")
    claimed = _prod(shape) * dtype.itemsize
    left = size - f.tell()
    if claimed > left:
        raise SparsefitError(
            f"{where}: the header claims shape {shape} of {dtype} ({claimed:,} bytes) but only {left:,} bytes "
            "follow; the file is truncated or corrupt"
        )
    return shape, dtype, fortran


def read_npy_data(f: BinaryIO, shape: tuple[int, ...], dtype: np.dtype, fortran: bool, where: str) -> np.ndarray:
    """Read the data of a checked ``.npy`` stream (see :func:`npy_header`) into a writable array."""
    arr = np.empty(_prod(shape), dtype=dtype)
    buf = memoryview(arr.view(np.uint8) if dtype.itemsize else np.empty(0, np.uint8))
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])  # type: ignore[attr-defined]
        if not n:
            raise SparsefitError(f"{where}: the data ends early; the file is truncated")
        got += n
    return arr.reshape(shape, order="F" if fortran else "C")


def read_npy_file(p: Path) -> np.ndarray:
    """A ``.npy`` file, checked before anything is allocated (never unpickles)."""
    try:
        with open(p, "rb") as f:
            shape, dtype, fortran = npy_header(f, os.fstat(f.fileno()).st_size, str(p))
            return read_npy_data(f, shape, dtype, fortran, str(p))
    except OSError as e:
        raise SparsefitError(f"{p}: cannot read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# zip archives (.npz, PyTorch files)
# ----------------------------------------------------------------------------------------------
def zip_members(zf: zipfile.ZipFile, size: int, where: str) -> dict[str, zipfile.ZipInfo]:
    """Check every member's claimed size against the archive's ``size``; return them by name."""
    out = {}
    for info in zf.infolist():
        if info.compress_type == zipfile.ZIP_STORED:
            ok = info.file_size <= size and info.compress_size == info.file_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            ok = info.compress_size <= size and info.file_size <= MAX_DEFLATE_RATIO * info.compress_size + 1024
        else:
            raise SparsefitError(f"{where}: member {info.filename!r} uses an unsupported compression method")
        if not ok or info.header_offset < 0 or info.header_offset + info.compress_size > size:
            raise SparsefitError(
                f"{where}: member {info.filename!r} claims {info.file_size:,} bytes, more than the archive "
                f"({size:,} bytes) can hold; the file is truncated or corrupt"
            )
        out[info.filename] = info
    return out


def read_npz_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    """One ``.npy`` member of a checked archive (see :func:`zip_members`)."""
    with zf.open(info) as m:
        shape, dtype, fortran = npy_header(m, info.file_size, where)
        return read_npy_data(m, shape, dtype, fortran, where)


# ----------------------------------------------------------------------------------------------
# .safetensors
# ----------------------------------------------------------------------------------------------
def safetensors_header(p: Path) -> dict[str, Any]:
    """The checked JSON header of a safetensors file: every tensor's bytes lie inside the file."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SparsefitError(f"{p}: not a readable safetensors file (only {size} bytes); is it truncated?")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise SparsefitError(
                    f"{p}: not a readable safetensors file: the header claims {n:,} bytes but the file has "
                    f"{size:,}; is it truncated?"
                )
            text = f.read(n)
    except OSError as e:
        raise SparsefitError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        raise SparsefitError(f"{p}: not a readable safetensors file (the header is not JSON); is it corrupt?") from None
    if not isinstance(header, dict):
        raise SparsefitError(f"{p}: not a readable safetensors file (the header is not a JSON object)")
    data = size - 8 - n
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SparsefitError(f"{p}: the safetensors metadata is not a map of strings; the file is corrupt")
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict):
            raise SparsefitError(f"{p}: tensor {name!r} has no valid entry in the header; the file is corrupt")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise SparsefitError(f"{p}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise SparsefitError(f"{p}: tensor {name!r} has an invalid shape {shape!r}; the file is corrupt")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data
            or offsets[1] - offsets[0] != _prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        ):
            raise SparsefitError(
                f"{p}: tensor {name!r} claims shape {shape} at bytes {offsets!r} of a {data:,}-byte data section; "
                "the file is truncated or corrupt"
            )
    return header


# ----------------------------------------------------------------------------------------------
# Matrix Market
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MtxHeader:
    """What a Matrix Market file's banner and size line say; ``body`` is where the entries start."""

    layout: str  # "coordinate" or "array"
    field: str  # "real", "integer", "pattern", "complex"
    symmetry: str  # "general", "symmetric", "skew-symmetric", "hermitian"
    rows: int
    cols: int
    stored: int  # entries written in the file
    body: int


def mtx_header(p: Path) -> MtxHeader:
    """The banner and size line of a Matrix Market file, checked against the file's size."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            banner = f.readline(1024).split()
            line = f.readline(1 << 20)
            while line.startswith(b"%") or not line.strip():
                if not line:
                    raise SparsefitError(f"{p}: not a readable Matrix Market file (no size line)")
                line = f.readline(1 << 20)
            body = size - f.tell()
    except OSError as e:
        raise SparsefitError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(banner) != 5 or banner[0].lower() != b"%%matrixmarket" or banner[1].lower() != b"matrix":
        raise SparsefitError(f"{p}: not a readable Matrix Market file (no %%MatrixMarket matrix banner)")
    layout, field, symmetry = (b.lower().decode("latin1") for b in banner[2:])
    try:
        dims = [int(t) for t in line.split()]
    except ValueError:
        dims = []
    if layout not in ("coordinate", "array") or len(dims) != (3 if layout == "coordinate" else 2) or min(dims) < 0:
        raise SparsefitError(f"{p}: not a readable Matrix Market file (bad size line {line[:80]!r})")
    rows, cols = dims[0], dims[1]
    stored = dims[2] if layout == "coordinate" else rows * cols
    if layout == "array" and symmetry != "general":  # only the lower triangle is stored
        stored = rows * (rows - 1) // 2 if symmetry == "skew-symmetric" else rows * (rows + 1) // 2
    # an entry takes at least 2 bytes ("1\n") in an array, 4 ("1 1\n") in coordinates
    per_entry = 4 if layout == "coordinate" else 2
    limit = sparse_dim_limit(size) if layout == "coordinate" else body
    if stored * per_entry > body + 1 or rows > limit or cols > limit:
        raise SparsefitError(
            f"{p}: the header claims a {rows} × {cols} matrix with {stored:,} entries, more than the file's "
            f"{size:,} bytes can hold; the file is truncated or corrupt"
        )
    return MtxHeader(layout, field, symmetry, rows, cols, stored, size - body)
