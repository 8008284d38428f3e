"""Targets: the matrix ``A`` to approximate, known densely, sparsely, or only through products.

Every target exposes ``shape = (out_features, in_features)`` and ``matmat(x)`` for row vectors
``x: (batch, in_features)`` returning ``x @ Aᵀ: (batch, out_features)`` on ``x``'s device and
dtype. Files are read with :func:`load_target`; Python objects are wrapped by :func:`as_target`.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SparsefitError
from .headers import (
    ZIP_ERRORS,
    mtx_header,
    read_npy_file,
    read_npz_member,
    safetensors_header,
    sparse_dim_limit,
    zip_members,
)

#: File suffixes :func:`load_target` understands.
SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth", ".bin", ".mtx")

#: Dense matrices at most this dense are applied as sparse matrices (faster products).
SPARSE_DENSITY = 0.05


def _to_csr(a: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return a.to_sparse_csr()


class Target:
    """Base class. Subclasses implement :meth:`matmat`; the rest is optional."""

    kind = "operator"

    def __init__(self, shape: tuple[int, int], name: str = "matrix") -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.name = name

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def matmat(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move whatever :meth:`matmat` needs to ``device``/``dtype`` once, before a fit."""

    def dense(self, max_elements: int) -> torch.Tensor | None:
        """``A`` as a float64 CPU tensor when it has at most ``max_elements`` entries, else None."""
        return None

    def frobenius_norm(self) -> float | None:
        """``||A||_F`` when known exactly, else None."""
        return None

    def scipy_operator(self) -> Any | None:
        """A scipy object with ``@``/``.T`` for singular values (sparse targets), else None."""
        return None


class DenseTarget(Target):
    """A dense matrix. Very sparse ones (density ≤ 5 %) are applied as sparse matrices."""

    kind = "dense"

    def __init__(self, a: np.ndarray | torch.Tensor, name: str = "matrix") -> None:
        t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a.detach().cpu()
        t = check_matrix(t, name)
        super().__init__(tuple(t.shape), name)
        self._a64 = t.to(torch.float64).contiguous()
        density = float((self._a64 != 0).sum()) / self._a64.numel()
        self.density = density
        self._dev: torch.Tensor | None = None

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        a = self._a64.to(dtype)
        # x @ Aᵀ is computed as (A @ xᵀ)ᵀ: for feature-major probes (xᵀ contiguous) the product
        # comes out feature-major as well, which the fused fit step reads as it is
        if self.density <= SPARSE_DENSITY and device.type == "cpu":
            self._dev = _to_csr(a)
        else:
            self._dev = a.to(device)

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        if self._dev is None or self._dev.dtype != x.dtype or self._dev.device != x.device:
            self.prepare(x.device, x.dtype)
        assert self._dev is not None
        return (self._dev @ x.t()).t()

    def dense(self, max_elements: int) -> torch.Tensor | None:
        return self._a64 if self._a64.numel() <= max_elements else None

    def frobenius_norm(self) -> float:
        return float(torch.linalg.norm(self._a64))

    def scipy_operator(self) -> Any:
        return self._a64.numpy()


class SparseTarget(Target):
    """A scipy.sparse matrix, applied without densifying."""

    kind = "sparse"

    def __init__(self, a: Any, name: str = "matrix") -> None:
        import scipy.sparse as sp

        a = sp.csr_matrix(a)
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise SparsefitError(f"{name}: sparse matrix has shape {a.shape}; give a non-empty 2-D matrix")
        if np.iscomplexobj(a.data):
            raise SparsefitError(f"{name}: complex entries are not supported; give a real matrix")
        if not np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_:
            raise SparsefitError(f"{name}: entries have dtype {a.dtype}; give a real numeric matrix")
        if not np.isfinite(a.data).all():
            raise SparsefitError(f"{name}: the matrix contains NaN or Inf; clean it first")
        super().__init__(a.shape, name)
        self._a = a.astype(np.float64)
        self._a.sum_duplicates()
        self._dev: torch.Tensor | None = None

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        a = self._a
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            t = torch.sparse_csr_tensor(
                torch.from_numpy(a.indptr.astype(np.int64)),
                torch.from_numpy(a.indices.astype(np.int64)),
                torch.from_numpy(a.data).to(dtype),
                size=a.shape,
                check_invariants=True,
            )
        self._dev = t.to(device)

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        if self._dev is None or self._dev.dtype != x.dtype or self._dev.device != x.device:
            self.prepare(x.device, x.dtype)
        assert self._dev is not None
        return (self._dev @ x.t()).t()

    def dense(self, max_elements: int) -> torch.Tensor | None:
        if self.shape[0] * self.shape[1] > max_elements:
            return None
        return torch.from_numpy(self._a.toarray())

    def frobenius_norm(self) -> float:
        return float(np.sqrt((self._a.data**2).sum()))

    def scipy_operator(self) -> Any:
        return self._a


class OperatorTarget(Target):
    """A matrix-free target: ``fn(X)`` with ``X: (in_features, batch)`` returns ``A @ X``.

    ``fn`` may be a function on torch tensors or a ``scipy.sparse.linalg.LinearOperator``
    (applied in float64 on the CPU).
    """

    kind = "operator"

    def __init__(
        self, fn: Callable[[torch.Tensor], torch.Tensor] | Any, shape: tuple[int, int], name: str = "operator"
    ):
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise SparsefitError(f"operator shape must be (out_features, in_features) >= 1, got {shape}")
        super().__init__(shape, name)
        self._fn = fn
        self._scipy = hasattr(fn, "matmat") and hasattr(fn, "shape")

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        if self._scipy:
            y = self._fn.matmat(x.t().detach().cpu().double().numpy())
            out = torch.as_tensor(np.asarray(y)).to(device=x.device, dtype=x.dtype)
        else:
            out = self._fn(x.t())
            if not isinstance(out, torch.Tensor):
                out = torch.as_tensor(np.asarray(out))
            out = out.to(device=x.device, dtype=x.dtype)
        if tuple(out.shape) != (self.shape[0], x.shape[0]):
            raise SparsefitError(
                f"{self.name}: the operator returned shape {tuple(out.shape)} for input {tuple(x.t().shape)}, "
                f"expected {(self.shape[0], x.shape[0])}"
            )
        return out.t()

    def scipy_operator(self) -> Any | None:
        return self._fn if (self._scipy and hasattr(self._fn, "rmatvec")) else None


# ----------------------------------------------------------------------------------------------
# Validation and wrapping
# ----------------------------------------------------------------------------------------------
def check_matrix(t: torch.Tensor | np.ndarray, name: str = "matrix") -> torch.Tensor:
    """Check that ``t`` is a non-empty, real, finite 2-D numeric matrix; return it as a tensor."""
    if isinstance(t, np.ndarray):
        if t.dtype == object:
            raise SparsefitError(f"{name}: array holds Python objects; save a numeric array")
        if np.iscomplexobj(t):
            raise SparsefitError(f"{name}: complex entries are not supported; give a real matrix")
        if t.dtype == np.bool_ or not np.issubdtype(t.dtype, np.number):
            raise SparsefitError(f"{name}: entries have dtype {t.dtype}; give a real numeric matrix")
        if not t.dtype.isnative:  # e.g. a big-endian .npy; torch reads native byte order only
            t = t.astype(t.dtype.newbyteorder("="))
        t = torch.from_numpy(np.ascontiguousarray(t))
    if t.is_complex():
        raise SparsefitError(f"{name}: complex entries are not supported; give a real matrix")
    if t.dtype == torch.bool:
        raise SparsefitError(f"{name}: entries are booleans; give a real numeric matrix")
    if t.dim() != 2:
        raise SparsefitError(f"{name}: expected a 2-D matrix, got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise SparsefitError(f"{name}: the matrix is empty (shape {tuple(t.shape)})")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise SparsefitError(f"{name}: the matrix contains NaN or Inf; clean it first")
    return t


def as_target(obj: Any, shape: tuple[int, int] | None = None, name: str = "matrix") -> Target:
    """Wrap an array, tensor, scipy sparse matrix, LinearOperator or callable as a :class:`Target`."""
    if isinstance(obj, Target):
        return obj
    try:
        import scipy.sparse as sp

        if sp.issparse(obj):
            return SparseTarget(obj, name)
    except ImportError:  # pragma: no cover - scipy is a dependency
        pass
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return DenseTarget(obj, name)
    if hasattr(obj, "matmat") and hasattr(obj, "shape"):
        return OperatorTarget(obj, tuple(obj.shape), name)
    if callable(obj):
        if shape is None:
            raise SparsefitError(
                "a matrix-free target needs its shape: as_target(fn, shape=(out_features, in_features))"
            )
        return OperatorTarget(obj, shape, name)
    raise SparsefitError(f"cannot use an object of type {type(obj).__name__} as a target matrix")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def load_target(path: str | os.PathLike[str], key: str | None = None) -> Target:
    """Read a matrix file (``.npy``, ``.npz`` dense or scipy.sparse, ``.safetensors``,
    ``.pt/.pth/.bin`` state dict loaded with ``weights_only=True``, Matrix Market ``.mtx``).

    ``key`` names the tensor inside a file that holds several.
    """
    p = Path(path)
    if not p.exists():
        raise SparsefitError(f"{p}: no such file")
    if p.is_dir():
        raise SparsefitError(f"{p} is a directory; give a matrix file ({', '.join(SUFFIXES)})")
    suffix = p.suffix.lower()
    name = str(p)
    if suffix == ".npy":
        arr = read_npy(p)
        _reject_key(key, p)
        return DenseTarget(check_matrix(arr, name), name)
    if suffix == ".npz":
        return _load_npz(p, key)
    if suffix == ".safetensors":
        return _load_safetensors(p, key)
    if suffix in (".pt", ".pth", ".bin"):
        return _load_torch(p, key)
    if suffix == ".mtx":
        return _load_mtx(p, key)
    raise SparsefitError(f"{p}: unknown file type {suffix or '(none)'}; supported: {', '.join(SUFFIXES)}")


def read_npy(p: Path) -> np.ndarray:
    """A ``.npy`` file without pickles; its header is checked against the file's length before
    anything is allocated (one-line errors for foreign, truncated, corrupt or object files)."""
    if not p.exists():
        raise SparsefitError(f"{p}: no such file")
    if p.is_dir():
        raise SparsefitError(f"{p} is a directory; give a .npy file")
    return read_npy_file(p)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _reject_key(key: str | None, p: Path) -> None:
    if key is not None:
        raise SparsefitError(f"{p}: --key applies to files holding several tensors, not to {p.suffix} files")


def _pick(items: dict[str, Any], key: str | None, p: Path) -> tuple[str, Any]:
    if key is not None:
        if key not in items:
            shown = ", ".join(sorted(items)[:20]) + (" …" if len(items) > 20 else "")
            raise SparsefitError(f"{p}: no tensor named {key!r}; available: {shown or '(none)'}")
        return key, items[key]
    if len(items) == 1:
        return next(iter(items.items()))
    if not items:
        raise SparsefitError(f"{p}: the file holds no tensors")
    shown = ", ".join(sorted(items)[:20]) + (" …" if len(items) > 20 else "")
    raise SparsefitError(f"{p}: holds {len(items)} tensors; choose one with --key (available: {shown})")


#: The members of a scipy.sparse ``.npz`` (``scipy.sparse.save_npz``) by format.
_SPARSE_NPZ = {
    "csr": ("data", "indices", "indptr"),
    "csc": ("data", "indices", "indptr"),
    "coo": ("data", "row", "col"),
}


def _load_npz(p: Path, key: str | None) -> Target:
    """A ``.npz``: one dense array (``key`` picks one of several) or a scipy.sparse matrix.

    Every member's claimed sizes are checked against the archive before it is read; never unpickles.
    """
    try:
        size = p.stat().st_size
        with zipfile.ZipFile(p) as zf:
            members = {n.removesuffix(".npy"): i for n, i in zip_members(zf, size, str(p)).items()}
            if {"format", "shape", "data"} <= set(members) and key is None:
                arrays = {n: read_npz_member(zf, i, f"{p}[{n}]") for n, i in members.items()}
                return SparseTarget(_sparse_from_arrays(arrays, size, p), str(p))
            k, info = _pick(members, key, p)
            arr = read_npz_member(zf, info, f"{p}[{k}]")
    except SparsefitError:
        raise
    except ZIP_ERRORS as e:
        raise SparsefitError(f"{p}: not a readable .npz file ({_first_line(e)}); is it truncated?") from None
    return DenseTarget(check_matrix(arr, f"{p}[{k}]"), f"{p}[{k}]")


def _sparse_from_arrays(arrays: dict[str, np.ndarray], size: int, p: Path) -> Any:
    """A scipy.sparse matrix from the arrays of a ``save_npz`` file, with every index checked."""
    import scipy.sparse as sp

    fmt = arrays["format"]
    fmt = fmt.item() if fmt.shape == () and fmt.dtype.kind in "SU" else None
    fmt = fmt.decode("latin1") if isinstance(fmt, bytes) else fmt
    if fmt not in _SPARSE_NPZ:
        raise SparsefitError(f"{p}: sparse format {fmt!r} is not supported; save a csr, csc or coo matrix")
    shape = arrays["shape"]
    limit = sparse_dim_limit(size)
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or shape.min() < 0 or shape.max() > limit:
        raise SparsefitError(f"{p}: the sparse shape {shape.tolist()} is not valid for a {size:,}-byte file")
    missing = [n for n in _SPARSE_NPZ[fmt] if n not in arrays]
    if missing:
        raise SparsefitError(f"{p}: the {fmt} matrix has no {missing[0]!r} array; the file is corrupt")
    data, i1, i2 = (arrays[n] for n in _SPARSE_NPZ[fmt])
    if any(a.ndim != 1 for a in (data, i1, i2)) or i1.dtype.kind not in "iu" or i2.dtype.kind not in "iu":
        raise SparsefitError(f"{p}: the {fmt} arrays have the wrong dimensions or dtypes; the file is corrupt")
    shape_t = (int(shape[0]), int(shape[1]))
    try:
        if fmt == "coo":
            if len(i1) != len(data) or len(i2) != len(data):
                raise ValueError("row, col and data have different lengths")
            return sp.coo_matrix((data, (i1, i2)), shape=shape_t)
        m = (sp.csr_matrix if fmt == "csr" else sp.csc_matrix)((data, i1, i2), shape=shape_t)
        m.check_format(full_check=True)
        return m
    except (ValueError, TypeError, IndexError, OverflowError) as e:
        raise SparsefitError(f"{p}: not a valid {fmt} matrix ({_first_line(e)}); the file is corrupt") from None


def _load_safetensors(p: Path, key: str | None) -> Target:
    from safetensors import safe_open

    safetensors_header(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            names = list(f.keys())
            k, _ = _pick({n: None for n in names}, key, p)
            t = f.get_tensor(k)
    except SparsefitError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SparsefitError(f"{p}: not a readable safetensors file ({_first_line(e)}); is it truncated?") from None
    return DenseTarget(check_matrix(t, f"{p}[{k}]"), f"{p}[{k}]")


def load_state_dict_file(p: Path, mmap: bool = False) -> Any:
    """``torch.load(p, weights_only=True)`` with refusals turned into one-line errors.

    Only zip-format files (PyTorch >= 1.6) are read, after every member's claimed size was checked
    against the file. ``mmap=True`` maps the tensors' storage instead of reading it.
    """
    import pickle

    try:
        size = p.stat().st_size
        if not zipfile.is_zipfile(p):
            raise SparsefitError(
                f"{p}: not a zip-format PyTorch file (PyTorch >= 1.6 writes zip files); the legacy format is "
                "not read because its headers cannot be checked before loading; re-save it with a current torch.save"
            )
        with zipfile.ZipFile(p) as zf:
            zip_members(zf, size, str(p))
    except SparsefitError:
        raise
    except ZIP_ERRORS as e:
        raise SparsefitError(f"{p}: not a readable PyTorch file ({_first_line(e)[:160]}); is it truncated?") from None
    try:
        with warnings.catch_warnings():
            # files pickled with protocol > 2 trigger an advisory warning before the safe unpickler runs
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if mmap:
                try:
                    return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SparsefitError(
            f"{p}: refused to load: the file contains Python objects other than tensors ({_first_line(e)[:120]}); "
            "only plain state dicts are read (weights_only=True)"
        ) from None
    except Exception as e:  # torch raises many types for corrupt archives; none is the user's bug
        raise SparsefitError(f"{p}: not a readable PyTorch file ({_first_line(e)[:160]}); is it truncated?") from None


def _load_torch(p: Path, key: str | None) -> Target:
    obj = load_state_dict_file(p)
    if isinstance(obj, torch.Tensor):
        _reject_key(key, p)
        return DenseTarget(check_matrix(obj, str(p)), str(p))
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        k, t = _pick(tensors, key, p)
        return DenseTarget(check_matrix(t, f"{p}[{k}]"), f"{p}[{k}]")
    raise SparsefitError(f"{p}: holds a {type(obj).__name__}, expected a tensor or a state dict of tensors")


def _load_mtx(p: Path, key: str | None) -> Target:
    _reject_key(key, p)
    m = read_mtx(p)
    return SparseTarget(m, str(p)) if not isinstance(m, np.ndarray) else DenseTarget(check_matrix(m, str(p)), str(p))


def read_mtx(p: Path) -> Any:
    """A real Matrix Market file: a scipy COO matrix (coordinate) or an ndarray (array).

    The header is checked against the file's size first. (``scipy.io.mmread`` is not used: its
    fast_matrix_market reader crashes the process on some truncated files, e.g. one ending in
    ``1.5E``.)
    """
    import scipy.sparse as sp

    h = mtx_header(p)
    if h.field not in ("real", "integer", "pattern", "double"):
        raise SparsefitError(f"{p}: Matrix Market field {h.field!r} is not supported; give a real matrix")
    if h.symmetry not in ("general", "symmetric", "skew-symmetric"):
        raise SparsefitError(f"{p}: Matrix Market symmetry {h.symmetry!r} is not supported")
    if h.symmetry != "general" and h.rows != h.cols:
        raise SparsefitError(f"{p}: a {h.symmetry} matrix must be square, the header says {h.rows} × {h.cols}")
    ncols = (2 if h.field == "pattern" else 3) if h.layout == "coordinate" else 1
    try:
        with open(p, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data" for an empty body
            f.seek(h.body)
            rows = np.loadtxt(f, dtype=np.float64, comments="%", ndmin=2, max_rows=h.stored)
            rest = f.read(1 << 16)
    except (ValueError, OSError) as e:
        raise SparsefitError(f"{p}: not a readable Matrix Market file ({_first_line(e)[:120]})") from None
    if rows.shape[0] != h.stored or (h.stored and rows.shape[1] != ncols) or rest.strip(b" \t\r\n"):
        raise SparsefitError(
            f"{p}: the header says {h.stored:,} entries of {ncols} numbers, the file holds {rows.shape[0]:,} "
            f"rows of {rows.shape[1] if rows.size else 0}; it is truncated or corrupt"
        )
    sign = -1.0 if h.symmetry == "skew-symmetric" else 1.0
    if h.layout == "array":
        if h.symmetry == "general":
            return rows[:, 0].reshape(h.cols, h.rows).T.copy()
        a = np.zeros((h.rows, h.cols))
        lo = np.tril_indices(h.rows, 0 if h.symmetry == "symmetric" else -1)
        order = np.lexsort((lo[0], lo[1]))  # the file lists the lower triangle column by column
        a[lo[0][order], lo[1][order]] = rows[:, 0]
        return a + sign * np.tril(a, -1).T
    i, j = rows[:, 0], rows[:, 1]
    if h.stored and (
        (i != np.round(i)).any()
        or (j != np.round(j)).any()
        or i.min() < 1
        or j.min() < 1
        or i.max() > h.rows
        or j.max() > h.cols
    ):
        raise SparsefitError(f"{p}: an entry's row or column is outside the {h.rows} × {h.cols} matrix")
    v = np.ones(h.stored) if h.field == "pattern" else rows[:, 2]
    i, j = i.astype(np.int64) - 1, j.astype(np.int64) - 1
    if h.symmetry != "general":
        off = i != j
        i, j, v = np.concatenate([i, j[off]]), np.concatenate([j, i[off]]), np.concatenate([v, sign * v[off]])
    return sp.coo_matrix((v, (i, j)), shape=(h.rows, h.cols))
