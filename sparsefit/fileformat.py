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
import errno
import io
import json
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import SparsefitError
from .headers import safetensors_header
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
#: torch dtype → safetensors dtype code.
_ST_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# ----------------------------------------------------------------------------------------------
# Output files: never destroy what was there
# ----------------------------------------------------------------------------------------------
#: errno values that mean "the disk (or device) refused the data".
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}
#: Paths through these folders name an already-open stream (``/dev/stdout`` → ``/proc/self/fd/1``).
_FD_FOLDER = re.compile(r"^/(dev|proc/[^/]+)/fd/")


def _resolve(p: Path) -> tuple[Path, bool]:
    """``(final path, is_stream)`` after following symlinks; a path through ``/proc/*/fd`` is a stream."""
    q = os.path.abspath(p)
    for _ in range(40):
        if _FD_FOLDER.match(q):
            return Path(q), True
        if not os.path.islink(q):
            break
        q = os.path.normpath(os.path.join(os.path.dirname(q), os.readlink(q)))
    try:
        mode = os.stat(q).st_mode
    except FileNotFoundError:
        return Path(q), False
    return Path(q), not stat.S_ISREG(mode)


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Fail early (before any long work) if ``path`` cannot be written as a file."""
    p = Path(path)
    if p.is_dir():
        raise SparsefitError(f"output {p} is a directory; give a file name, e.g. {p / 'out.safetensors'}")
    if p.exists():
        mode = os.stat(p).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            raise SparsefitError(f"output {p} is not a regular file, character device or pipe; choose a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SparsefitError(f"cannot write {p}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SparsefitError(f"cannot write {p}: permission denied; choose another output path")
    return p


class _Stream(io.BufferedIOBase):
    """A device or pipe as a plain writable stream (numpy's fast path would seek in a real file)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _write_failed(p: Path, e: OSError, stream: bool) -> SparsefitError:
    why = e.strerror or str(e) or type(e).__name__
    hint = "free some space or choose another output" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
    left = "the output is incomplete" if stream else f"{p} was left as it was" if p.exists() else "nothing was written"
    return SparsefitError(f"cannot write {p}: {why} ({hint}); {left}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file to write ``path``'s new content into; nothing is lost on failure.

    * A new path or a regular file (also through symlinks): the data goes to a temporary file
      beside it, renamed onto it only when everything was written. A new file gets the mode a
      plain ``open(path, "w")`` gives (the umask applies); a replaced file keeps its mode.
    * A character device, a pipe or ``/dev/stdout``: written into directly (never replaced).

    A full or failing disk raises :class:`SparsefitError` (one line); the temporary file is
    removed and the previous file is left as it was.
    """
    p = check_output_path(path)
    final, stream = _resolve(p)
    if stream:
        try:
            with open(final, "wb") as f:
                yield _Stream(f)
        except OSError as e:
            raise _write_failed(p, e, True) from None
        return
    old = final.stat() if final.exists() else None
    while True:
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open()
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
                if (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
                    with contextlib.suppress(OSError):
                        os.fchown(f.fileno(), old.st_uid, old.st_gid)
            yield f
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_failed(p, e, False) from None
        raise


#: The name :func:`atomic_output` gives its temporary file: ``.<name>.<8 hex digits>.part``.
_TEMP_NAME = re.compile(r"^\.(.+)\.[0-9a-f]{8}\.part$")


def temp_file_target(name: str) -> str | None:
    """The output name that ``name`` was a temporary file of :func:`atomic_output` for, else None.

    A process killed while writing leaves such a file behind; a resumed run removes it.
    """
    m = _TEMP_NAME.match(name)
    return m.group(1) if m else None


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) to the open file ``f`` in the safetensors format.

    Streams one tensor at a time (no copy of the whole file in memory). Tensors are stored by
    decreasing element size, then name, as safetensors does, so the same input gives the same bytes.
    (``safetensors.torch.save_file`` is not used: it renames its own temporary file onto the path,
    which would replace a device node, and creates files with mode 0600.)
    """
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_CODES:
            raise SparsefitError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in names:
        t = tensors[name].detach().to("cpu").contiguous()
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file through :func:`atomic_output`."""
    with atomic_output(path) as f:
        write_safetensors(f, tensors, metadata)


def save_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file (JSON reports, manifests) through :func:`atomic_output`."""
    with atomic_output(path) as f:
        f.write(text.encode())


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
        seed=_header_int({"seed": header.get("seed", 0)}, "seed", where),
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
    header = make_header(op, has_bias=bias is not None, **header_extra)
    if dtype is not None:
        header["dtype"] = _FLOAT_DTYPES[dtype]
    tensors = operator_tensors(op, bias, dtype=dtype)
    metadata = {"sparsefit": json.dumps(header, sort_keys=True)}
    save_safetensors(path, tensors, metadata)
    return header


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the JSON header of a sparsefit file without loading tensors."""
    from safetensors import safe_open

    p = _existing_file(path)
    safetensors_header(p)
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
    except (ValueError, RecursionError):
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
