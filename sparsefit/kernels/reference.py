"""Plain PyTorch references for G~ (the test oracles): ``y = G~ x`` and ``x = G~ᵀ y``.

Conventions are those of :mod:`sparsefit.operator` (layers in application order, ``perms[j]``
gathers, ``blocks[j, b]`` acts on positions ``(2b, 2b+1)``, inputs zero-padded to the width,
outputs sliced). Every fast path in :mod:`sparsefit.kernels` has the signature of
:func:`gtilde_reference` and is tested against it.
"""

from __future__ import annotations

import torch

from ..permutations import inverse_permutations


def gtilde_reference(x: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, out_features: int) -> torch.Tensor:
    """``y = G~ x`` row by row, in plain PyTorch with generic autograd.

    x: ``(batch, in_features)``; blocks: ``(depth, n/2, 2, 2)``; perms: ``(depth, n)`` integer;
    returns ``(batch, out_features)``.
    """
    batch, k = x.shape
    depth, h = blocks.shape[0], blocks.shape[1]
    n = 2 * h
    z = torch.nn.functional.pad(x, (0, n - k))
    for j in range(depth):
        z = z[:, perms[j].long()]
        z = torch.einsum("hrc,bhc->bhr", blocks[j], z.reshape(batch, h, 2)).reshape(batch, n)
    return z[:, :out_features]


def gtilde_transpose_reference(
    y: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, in_features: int
) -> torch.Tensor:
    """``x = G~ᵀ y`` in plain PyTorch. y: ``(batch, out_features)`` → ``(batch, in_features)``."""
    batch, m = y.shape
    depth, h = blocks.shape[0], blocks.shape[1]
    n = 2 * h
    z = torch.nn.functional.pad(y, (0, n - m))
    inv = inverse_permutations(perms.long())
    for j in reversed(range(depth)):
        z = torch.einsum("hcr,bhc->bhr", blocks[j], z.reshape(batch, h, 2)).reshape(batch, n)
        z = z[:, inv[j]]
    return z[:, :in_features]
