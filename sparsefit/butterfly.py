"""Closed-form initialisation of G~ with butterfly permutations (hierarchical factorisation).

With the ``butterfly`` sampler (:mod:`sparsefit.permutations`), width ``n = 2^L`` and depth
``d ≥ L``, a window of ``L`` consecutive layers of G~ is, in the *logical* index frame (where
the permutations are undone), a product of butterfly factors: each layer mixes the pairs of
indices that differ in one bit, every bit once. Such a product
has a known fast exact factorisation (Zheng, Riccietti & Gribonval, "Efficient identification of
butterfly sparse matrix factorizations", SIAM J. Math. Data Sci. 2023): split the factors into a
left and a right group; every entry ``A[i, i']`` is then the product of exactly one left entry
and one right entry, and the entries sharing the same middle index ``k`` form a rank-one block.
A truncated SVD of each block gives both groups, and the same split recurses into each group.

* For a matrix that *is* such a product (Walsh–Hadamard, random butterflies) this recovers it to
  rounding error, in ``O(n² · L)`` time.
* For any other matrix it gives a good, not optimal, approximation (each split is the best
  rank-one fit of its blocks) — a starting point for the Adam fit.

Layers outside that window start as the identity. Conventions as in :mod:`sparsefit.operator`
(layers in application order, gather permutations, ``blocks[j, b]`` on positions ``(2b, 2b+1)``).
"""

from __future__ import annotations

import torch

from .errors import SparsefitError
from .metrics import DENSE_BUDGET
from .operator import GTilde
from .permutations import is_power_of_two, sample_permutations
from .targets import Target


def dense_target(target: Target, max_elements: int = DENSE_BUDGET) -> torch.Tensor:
    """The target as a float64 CPU ``(out, in)`` tensor (matrix-free targets are probed with the
    identity); raise :class:`SparsefitError` when it is larger than ``max_elements``."""
    m, k = target.shape
    if m * k > max_elements:
        raise SparsefitError(
            f"the butterfly initialisation needs the dense matrix, and {m}x{k} exceeds {max_elements} entries; "
            "use --init random"
        )
    a = target.dense(max_elements)
    if a is not None:
        return a.to(torch.float64).cpu()
    target.prepare(torch.device("cpu"), torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    return target.matmat(eye).to(torch.float64).cpu().t().contiguous()


def _layer_frames(perms: torch.Tensor) -> list[torch.Tensor]:
    """``frames[j][p]``: the logical index held at position ``p`` when layer ``j``'s blocks act."""
    comp = torch.arange(perms.shape[1], dtype=torch.int64)
    frames = []
    for j in range(perms.shape[0]):
        comp = comp[perms[j]]
        frames.append(comp.clone())
    return frames


def _subset_offsets(mask: int) -> torch.Tensor:
    """All integers whose set bits are a subset of ``mask`` (ascending)."""
    offs = [0]
    bit = 1
    while bit <= mask:
        if mask & bit:
            offs = offs + [o | bit for o in offs]
        bit <<= 1
    return torch.tensor(sorted(offs), dtype=torch.int64)


def _factor(m: torch.Tensor, bits: list[int], out: list[torch.Tensor | None], first: int) -> None:
    """Factor ``m`` (``n × n``, support on index pairs that differ only in ``bits``) into one
    single-bit factor per entry of ``bits`` (application order); ``out[first + i]`` receives the
    dense factor for ``bits[i]``."""
    if len(bits) == 1:
        out[first] = m
        return
    n = m.shape[0]
    h = len(bits) // 2
    mask_r = sum(1 << b for b in bits[:h])  # applied first (right factor)
    mask_l = sum(1 << b for b in bits[h:])
    ks = torch.arange(n, dtype=torch.int64)
    rows = (ks[:, None] & ~mask_l) | _subset_offsets(mask_l)[None, :]  # (n, 2^|L|)
    cols = (ks[:, None] & ~mask_r) | _subset_offsets(mask_r)[None, :]  # (n, 2^|R|)
    sub = m[rows[:, :, None], cols[:, None, :]]  # (n, 2^|L|, 2^|R|): rank one per middle index k
    u, s, vh = torch.linalg.svd(sub, full_matrices=False)
    root = s[:, 0].sqrt()
    left = torch.zeros_like(m)
    right = torch.zeros_like(m)
    left[rows, ks[:, None].expand_as(rows)] = u[:, :, 0] * root[:, None]
    right[ks[:, None].expand_as(cols), cols] = vh[:, 0, :] * root[:, None]
    _factor(right, bits[:h], out, first)
    _factor(left, bits[h:], out, first + h)


def butterfly_blocks(a: torch.Tensor, depth: int, width: int) -> torch.Tensor:
    """Blocks ``(depth, width/2, 2, 2)`` (float64) of a butterfly-permutation G~ approximating ``a``.

    a: ``(out, in)`` with ``out, in ≤ width``; ``width`` a power of two; ``depth ≥ log2(width)``.
    Exact (to rounding) when ``a`` zero-padded to ``width × width`` is a product of butterfly
    factors, e.g. the orthonormal Walsh–Hadamard matrix with ``width = size``, ``depth = log2 size``.

    Example
    -------
    >>> import math, scipy.linalg
    >>> h = torch.tensor(scipy.linalg.hadamard(8) / math.sqrt(8))
    >>> b = butterfly_blocks(h, depth=3, width=8)
    >>> bool(torch.allclose(b.abs(), torch.full_like(b, 2 ** -0.5)))
    True
    """
    if not is_power_of_two(width) or width < 2:
        raise SparsefitError(
            f"the butterfly initialisation needs a power-of-two width, got {width}; "
            f"use --width {1 << max(1, (width - 1).bit_length())}"
        )
    levels = width.bit_length() - 1
    if depth < levels:
        raise SparsefitError(
            f"the butterfly initialisation needs depth >= log2(width) = {levels}, got {depth}; use --depth {levels}"
        )
    m, k = a.shape
    perms = sample_permutations(depth, width, torch.Generator(), "butterfly")
    frames = _layer_frames(perms)
    # position p of the output holds logical index frames[-1][p]: bring A into the logical frame
    padded = torch.zeros(width, width, dtype=torch.float64)
    padded[:m, :k] = a.to(torch.float64)
    logical = torch.empty_like(padded)
    logical[frames[-1]] = padded
    layer_bits = []
    for j in range(depth):
        diff = frames[j][0::2] ^ frames[j][1::2]
        bit = int(diff[0]).bit_length() - 1
        if not bool((diff == (1 << bit)).all()):  # pragma: no cover - guaranteed by the sampler
            raise SparsefitError("internal error: butterfly layers do not pair single bits")
        layer_bits.append(bit)
    # the last window of log2(width) consecutive layers that mixes every bit holds the butterfly
    start = next(
        (s for s in range(depth - levels, -1, -1) if sorted(layer_bits[s : s + levels]) == list(range(levels))), None
    )
    if start is None:  # pragma: no cover - guaranteed by the sampler
        raise SparsefitError("internal error: no window of butterfly layers covers every bit")
    active = list(range(start, start + levels))
    bits = [layer_bits[j] for j in active]
    factors: list[torch.Tensor | None] = [None] * levels
    _factor(logical, bits, factors, 0)
    h = width // 2
    blocks = torch.eye(2, dtype=torch.float64).expand(depth, h, 2, 2).clone()
    for i, j in enumerate(active):
        f = factors[i]
        assert f is not None
        lo, hi = frames[j][0::2], frames[j][1::2]
        blocks[j, :, 0, 0] = f[lo, lo]
        blocks[j, :, 0, 1] = f[lo, hi]
        blocks[j, :, 1, 0] = f[hi, lo]
        blocks[j, :, 1, 1] = f[hi, hi]
    return blocks


def butterfly_init(
    target: Target,
    depth: int,
    width: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> GTilde:
    """A :class:`GTilde` with butterfly permutations, initialised by :func:`butterfly_blocks`."""
    m, k = target.shape
    a = dense_target(target)
    blocks = butterfly_blocks(a, depth, width)
    perms = sample_permutations(depth, width, torch.Generator(), "butterfly")
    return GTilde(
        k, m, depth, width, seed=seed, sampler="butterfly", dtype=dtype, device=device, perms=perms, blocks=blocks
    )
