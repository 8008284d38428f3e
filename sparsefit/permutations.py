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


#: Sampler name -> function ``(depth, width, generator) -> (depth, width) int64``.
#: Files record the sampler's name; ``uniform`` is the default.
SAMPLERS: dict[str, Sampler] = {"uniform": _uniform}


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
