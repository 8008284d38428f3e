"""Synthetic target matrices: the note's four classes plus structured transforms.

All are square ``size × size`` float64 arrays drawn from ``numpy.random.default_rng(seed)``.
The note's width is ``n = 2·size``, which fixes the low-rank scaling below.

* ``lowrank`` — ``U Vᵀ / sqrt(n·k/2)`` with ``U, V`` of shape ``(size, k)``, entries N(0, 1);
* ``band`` — each row ``i`` holds ``k`` consecutive N(0, 1/k) entries in columns
  ``i − ⌊k/2⌋ … i − ⌊k/2⌋ + k − 1`` (wrapping around), a 1-D convolution without weight sharing;
* ``sparse`` — ``k·size`` N(0, 1/k) entries at distinct uniformly random positions;
* ``perm`` — a uniformly random permutation matrix, ``A[i, p(i)] = 1``;
* ``dct`` — the orthonormal DCT-II matrix;
* ``hadamard`` — the Walsh–Hadamard matrix scaled to be orthonormal (size a power of two);
* ``gaussian`` — N(0, 1/size) entries (a dense reference with no structure).
"""

from __future__ import annotations

import numpy as np

from .errors import SparsefitError

KINDS = ("lowrank", "band", "sparse", "perm", "dct", "hadamard", "gaussian")


def synth(kind: str, size: int, k: int = 3, seed: int = 0) -> np.ndarray:
    """Make a ``size × size`` target of the named kind (see the module docstring)."""
    if kind not in KINDS:
        raise SparsefitError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if size < 1:
        raise SparsefitError(f"--size must be at least 1, got {size}")
    if k < 1 and kind in ("lowrank", "band", "sparse"):
        raise SparsefitError(f"--k must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    m = size
    if kind == "lowrank":
        u = rng.standard_normal((m, k))
        v = rng.standard_normal((m, k))
        return u @ v.T / np.sqrt(2 * m * k / 2)
    if kind == "band":
        if k > m:
            raise SparsefitError(f"band width k={k} exceeds the size {m}")
        a = np.zeros((m, m))
        rows = np.repeat(np.arange(m), k)
        cols = (rows - k // 2 + np.tile(np.arange(k), m)) % m
        a[rows, cols] = rng.standard_normal(m * k) / np.sqrt(k)
        return a
    if kind == "sparse":
        if k > m:
            raise SparsefitError(f"k={k} entries per row on average exceeds the size {m}")
        a = np.zeros((m, m))
        pos = rng.choice(m * m, size=k * m, replace=False)
        a.flat[pos] = rng.standard_normal(k * m) / np.sqrt(k)
        return a
    if kind == "perm":
        a = np.zeros((m, m))
        a[np.arange(m), rng.permutation(m)] = 1.0
        return a
    if kind == "dct":
        import scipy.fft

        return scipy.fft.dct(np.eye(m), type=2, norm="ortho", axis=0)
    if kind == "hadamard":
        if m & (m - 1):
            raise SparsefitError(f"hadamard needs a power-of-two size, got {m}")
        import scipy.linalg

        return scipy.linalg.hadamard(m).astype(np.float64) / np.sqrt(m)
    return rng.standard_normal((m, m)) / np.sqrt(m)
