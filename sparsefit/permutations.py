"""Permutation samplers and checks.

Convention (used everywhere, including the file format): a permutation is an integer vector
``perm`` of length ``n`` and acts on a vector by *gathering*: ``(P x)[i] = x[perm[i]]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import SparsefitError

Sampler = Callable[[int, int, torch.Generator], torch.Tensor]


def _uniform(depth: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Each permutation uniformly at random (the note's choice)."""
    if depth == 0:
        return torch.empty(0, width, dtype=torch.int64)
    return torch.stack([torch.randperm(width, generator=generator) for _ in range(depth)])


def riffle_permutation(width: int) -> torch.Tensor:
    """The perfect-shuffle gather ``perm[2b] = b, perm[2b + 1] = b + width/2`` (``width`` even).

    Block ``b`` of the following 2×2 layer then mixes entries ``b`` and ``b + width/2`` of the
    layer's input. For ``width = 2^L`` this is the rotation of the index bits by one place
    (``perm[i] = rotr(i)``), whose ``L``-th power is the identity.
    """
    if width < 2 or width % 2:
        raise SparsefitError(f"the butterfly sampler needs an even width >= 2, got {width}")
    half = width // 2
    b = torch.arange(half, dtype=torch.int64)
    return torch.stack([b, b + half], dim=1).reshape(width)


def _butterfly(depth: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Perfect shuffles (:func:`riffle_permutation`), the last one adjusted so that the product
    of all ``depth`` permutations is the identity; deterministic (the generator is not consumed).

    For ``width = 2^L`` and ``depth = L`` the operator is exactly the set of radix-2 butterfly
    products (the constant-geometry FFT graph): layer ``j`` mixes the pairs of indices that
    differ in bit ``L − 1 − j``, every bit once, and the output comes back in natural order.
    So the orthonormal Walsh–Hadamard matrix is ``L`` layers of the block
    ``[[1, 1], [1, −1]]/√2``, and depth ``q·L`` chains ``q`` butterflies (every permutation is
    then the shuffle itself). Other depths and even widths keep the shuffles and the natural
    output order (so any ``L`` consecutive layers can still hold a butterfly when the width is a
    power of two).
    """
    if depth == 0:
        return torch.empty(0, width, dtype=torch.int64)
    riffle = riffle_permutation(width)
    perms = riffle.expand(depth, width).clone()
    comp = torch.arange(width, dtype=torch.int64)  # gathers compose: z_j = x[comp]
    for _ in range(depth - 1):
        comp = comp[riffle]
    perms[-1] = inverse_permutations(comp[None])[0]  # comp[last] = identity
    return perms


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


#: Sampler name -> function ``(depth, width, generator) -> (depth, width) int64``.
#: Files record the sampler's name; ``uniform`` is the default.
SAMPLERS: dict[str, Sampler] = {"uniform": _uniform, "butterfly": _butterfly}


def sample_permutations(depth: int, width: int, generator: torch.Generator, sampler: str = "uniform") -> torch.Tensor:
    """Draw ``depth`` permutations of ``range(width)`` with the named sampler.

    Returns an int64 tensor of shape ``(depth, width)`` on the CPU. The draw depends only on
    the generator's state, so a seed reproduces it exactly.
    """
    fn = SAMPLERS.get(sampler)
    if fn is None:
        raise SparsefitError(f"unknown permutation sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return fn(depth, width, generator)


def inverse_permutations(perms: torch.Tensor) -> torch.Tensor:
    """Inverse of each row: ``inv[j][perm[j][i]] = i``. Shape and device as ``perms``."""
    inv = torch.empty_like(perms)
    ar = torch.arange(perms.shape[1], device=perms.device, dtype=perms.dtype).expand_as(perms)
    inv.scatter_(1, perms, ar)
    return inv


def check_permutations(perms: torch.Tensor, width: int, depth: int) -> None:
    """Raise :class:`SparsefitError` unless ``perms`` is ``(depth, width)`` and every row is a permutation."""
    if perms.dim() != 2 or tuple(perms.shape) != (depth, width):
        raise SparsefitError(
            f"permutation table has shape {tuple(perms.shape)}, expected ({depth}, {width}); the file is inconsistent"
        )
    if perms.dtype.is_floating_point or perms.dtype.is_complex or perms.dtype == torch.bool:
        raise SparsefitError(f"permutation indices must be integers, got {perms.dtype}")
    if depth == 0:
        return
    p = perms.to(torch.int64)
    if int(p.min()) < 0 or int(p.max()) >= width:
        raise SparsefitError(f"permutation indices must lie in [0, {width}); the file is corrupt")
    sorted_rows = torch.sort(p, dim=1).values
    if not torch.equal(sorted_rows, torch.arange(width, dtype=torch.int64).expand(depth, width)):
        bad = int((sorted_rows != torch.arange(width)).any(dim=1).nonzero()[0])
        raise SparsefitError(f"permutation {bad} repeats an index, so it is not a permutation; the file is corrupt")
