"""The G~ operator: parameters, permutations, apply, transpose-apply, ``to_dense``, regulariser.

Mathematics and conventions (the file format uses the same ones):

* Width ``n`` (even), depth ``N``, ``h = n / 2`` blocks per layer.
* Layers are stored in **application order**: layer 0 touches the input first. With
  ``L_j = B_j P_j`` the operator is ``G~ = L_{N-1} ··· L_1 L_0``; the note's
  ``B(θ1)P1 ··· B(θN)PN`` is the same product with ``θN`` stored as layer 0.
* ``perms[j]`` gathers: ``(P_j z)[i] = z[perms[j][i]]``.
* ``blocks[j, b]`` is a 2×2 matrix acting on positions ``(2b, 2b+1)``:
  ``y[2b + r] = sum_c blocks[j, b, r, c] · z[2b + c]``.
* Rectangular targets (``out_features × in_features``): the input is zero-padded to ``n``, the
  output is the first ``out_features`` entries.

The implementations of ``G~ x`` live in :mod:`sparsefit.kernels` and share one signature
``f(x, blocks, perms, out_features) -> y`` with ``x: (batch, in_features)`` and
``y: (batch, out_features)``: the plain PyTorch reference (the test oracle), the PyTorch path
(hand-written backward), the fused CPU and GPU kernels. :func:`gtilde_reference`,
:func:`gtilde_torch` and the transposes are re-exported here. This module imports
:mod:`sparsefit.kernels`, never the reverse.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .errors import SparsefitError
from .kernels import dispatch
from .kernels.reference import gtilde_reference, gtilde_transpose_reference
from .kernels.torch_path import gtilde_torch, gtilde_transpose_torch
from .permutations import SAMPLERS, inverse_permutations, sample_permutations

__all__ = [
    "GTilde",
    "check_shape",
    "default_width",
    "extend_operator",
    "gtilde_flops_per_matvec",
    "gtilde_num_parameters",
    "gtilde_reference",
    "gtilde_torch",
    "gtilde_transpose_reference",
    "gtilde_transpose_torch",
    "orthogonality_penalty",
    "orthogonality_penalty_grad",
    "random_orthogonal_blocks",
]


# ----------------------------------------------------------------------------------------------
# Shapes and counts
# ----------------------------------------------------------------------------------------------
def default_width(out_features: int, in_features: int) -> int:
    """The note's choice: ``2 · max(out, in)`` (always even)."""
    return 2 * max(out_features, in_features)


def check_shape(out_features: int, in_features: int, depth: int, width: int) -> None:
    """Raise :class:`SparsefitError` unless the operator dimensions are usable."""
    if out_features < 1 or in_features < 1:
        raise SparsefitError(f"matrix shape {out_features}x{in_features} is empty; give a non-empty 2-D matrix")
    if depth < 1:
        raise SparsefitError(f"depth must be at least 1, got {depth}")
    if width % 2:
        raise SparsefitError(f"width must be even (2x2 blocks), got {width}; try --width {width + 1}")
    if width < max(out_features, in_features):
        raise SparsefitError(
            f"width {width} is smaller than the matrix ({out_features}x{in_features}); "
            f"use --width {max(out_features, in_features) + max(out_features, in_features) % 2} or more"
        )


def gtilde_num_parameters(depth: int, width: int) -> int:
    """Trainable parameters: 4 per 2×2 block, ``width/2`` blocks per layer."""
    return 2 * width * depth


def gtilde_flops_per_matvec(depth: int, width: int) -> int:
    """Floating-point operations of one ``G~ x``: 2 multiply-adds per output entry per layer."""
    return 4 * width * depth


def random_orthogonal_blocks(
    depth: int, width: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Haar-random 2×2 orthogonal blocks, shape ``(depth, width // 2, 2, 2)``.

    A rotation by a uniform angle, times a reflection with probability 1/2.
    """
    h = width // 2
    theta = torch.rand(depth, h, generator=generator, dtype=torch.float64) * (2 * math.pi)
    sign = torch.where(torch.rand(depth, h, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    c, s = torch.cos(theta), torch.sin(theta)
    # [[c, -s·sign], [s, c·sign]] = rotation · diag(1, sign)
    blocks = torch.stack([torch.stack([c, -s * sign], -1), torch.stack([s, c * sign], -1)], -2)
    return blocks.to(dtype)


def orthogonality_penalty(blocks: torch.Tensor) -> torch.Tensor:
    """Mean over all blocks of ``2 · ||I − BᵀB||²_F`` (a scalar, differentiable)."""
    btb = blocks.transpose(-1, -2) @ blocks
    eye = torch.eye(2, dtype=blocks.dtype, device=blocks.device)
    return 2.0 * ((eye - btb) ** 2).sum(dim=(-1, -2)).mean()


def orthogonality_penalty_grad(blocks: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`orthogonality_penalty` with respect to ``blocks``, in closed form.

    With ``M = I − BᵀB`` (symmetric), ``d||M||²_F / dB = −4·B·M``; the mean over
    ``count`` blocks and the factor 2 give ``−8·B·M / count``. Used by the fused CPU step,
    which would otherwise pay for an autograd graph every step.
    """
    eye = torch.eye(2, dtype=blocks.dtype, device=blocks.device)
    count = blocks.numel() // 4
    return (-8.0 / count) * (blocks @ (eye - blocks.transpose(-1, -2) @ blocks))


# ----------------------------------------------------------------------------------------------
# The operator as a module
# ----------------------------------------------------------------------------------------------
class GTilde(nn.Module):
    """A structured-sparse linear map ``G~ : R^in_features → R^out_features``.

    Parameters
    ----------
    in_features, out_features:
        Shape of the approximated matrix (``out × in``).
    depth:
        Number of layers ``N`` (each ``B_j P_j``).
    width:
        Internal width ``n`` (even, ``≥ max(out, in)``); default ``2 · max(out, in)``.
    seed:
        Seeds the permutations and the orthogonal initialisation.
    sampler:
        Permutation sampler name (see :mod:`sparsefit.permutations`).

    ``forward(x)`` takes ``x: (..., in_features)`` and returns ``(..., out_features)``.

    Example
    -------
    >>> g = GTilde(300, 200, depth=8, seed=0)
    >>> g(torch.randn(5, 300)).shape
    torch.Size([5, 200])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        width: int | None = None,
        *,
        seed: int = 0,
        sampler: str = "uniform",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        perms: torch.Tensor | None = None,
        blocks: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        width = default_width(out_features, in_features) if width is None else int(width)
        check_shape(out_features, in_features, depth, width)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.depth = int(depth)
        self.width = width
        self.sampler = sampler
        self.seed = int(seed)
        if perms is None or blocks is None:
            gen = torch.Generator().manual_seed(self.seed)
            if perms is None:
                perms = sample_permutations(depth, width, gen, sampler)
            if blocks is None:
                blocks = random_orthogonal_blocks(depth, width, gen, dtype)
        self.blocks = nn.Parameter(blocks.to(device=device, dtype=dtype).contiguous())
        perms = perms.to(device=device, dtype=torch.int64).contiguous()
        self.register_buffer("perms", perms)
        self.register_buffer("inv_perms", inverse_permutations(perms), persistent=False)

    # -- counts -----------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return gtilde_num_parameters(self.depth, self.width)

    @property
    def flops_per_matvec(self) -> int:
        return gtilde_flops_per_matvec(self.depth, self.width)

    # -- application ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """``G~ x`` for ``x: (..., in_features)`` → ``(..., out_features)``.

        ``backend``: see :class:`sparsefit.kernels.Backend` (``auto``, ``reference``, ``torch``,
        ``cpu``, ``cuda``; a fused backend that cannot run on ``x``'s device is an error).
        """
        if x.shape[-1] != self.in_features:
            raise SparsefitError(f"input has {x.shape[-1]} features, the operator expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        autocast = torch.is_autocast_enabled(x2.device.type)
        if autocast:  # no low-precision kernels: G~ runs in its blocks' dtype, like autocast's float32 ops
            x2 = x2.to(self.blocks.dtype)
        with torch.autocast(x2.device.type, enabled=False) if autocast else contextlib.nullcontext():
            y = dispatch(backend, x2, self.blocks, self.perms, self.out_features, self.inv_perms)
        return y.reshape(*lead, self.out_features)

    def transpose_apply(self, y: torch.Tensor) -> torch.Tensor:
        """``G~ᵀ y`` for ``y: (..., out_features)`` → ``(..., in_features)`` (no autograd)."""
        if y.shape[-1] != self.out_features:
            raise SparsefitError(f"input has {y.shape[-1]} features, the transpose expects {self.out_features}")
        lead = y.shape[:-1]
        y2 = y.reshape(-1, self.out_features).to(self.blocks.dtype)
        x = gtilde_transpose_torch(y2, self.blocks.detach(), self.perms, self.in_features, self.inv_perms)
        return x.reshape(*lead, self.in_features)

    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype | None = None, chunk: int = 4096) -> torch.Tensor:
        """The matrix ``G~`` as a dense ``(out_features, in_features)`` tensor (in ``dtype``,
        default the blocks' dtype)."""
        cols = []
        b = self.blocks.detach().to(dtype or self.blocks.dtype)
        for start in range(0, self.in_features, chunk):
            stop = min(self.in_features, start + chunk)
            eye = torch.zeros(stop - start, self.in_features, dtype=b.dtype, device=b.device)
            eye[:, start:stop] = torch.eye(stop - start, dtype=b.dtype, device=b.device)
            cols.append(gtilde_torch(eye, b, self.perms, self.out_features, self.inv_perms).t())
        return torch.cat(cols, dim=1)

    def orthogonality_penalty(self) -> torch.Tensor:
        """The regulariser: mean over blocks of ``2 · ||I − BᵀB||²_F``."""
        return orthogonality_penalty(self.blocks)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
            f"width={self.width}, sampler={self.sampler!r}"
        )


# ----------------------------------------------------------------------------------------------
# Deeper copies (warm starts of a depth search, depth doublings of a fit)
# ----------------------------------------------------------------------------------------------
def extend_operator(op: GTilde, depth: int, *, seed: int = 0) -> GTilde:
    """A deeper copy of ``op`` that computes the same matrix.

    ``depth − op.depth`` identity layers (blocks ``I``, permutations from ``op``'s sampler) are
    spread evenly before the trained layers; the permutation of the trained layer that follows
    each inserted group is composed with the inverse of the group's permutations, so the product
    is unchanged while the new layers add fresh pairings to train. The last layer stays last, so
    the output order is kept.
    """
    extra = depth - op.depth
    if extra < 0:
        raise SparsefitError(f"cannot extend a depth-{op.depth} operator to depth {depth}")
    old_blocks = op.blocks.detach().cpu()
    old_perms = op.perms.cpu()
    if extra == 0:
        perms_out, blocks_out = old_perms.clone(), old_blocks.clone()
        return _like(op, depth, perms_out, blocks_out)
    sampler = op.sampler if op.sampler in SAMPLERS else "uniform"
    gen = torch.Generator().manual_seed(seed)
    new_perms = sample_permutations(extra, op.width, gen, sampler)
    eye = torch.eye(2, dtype=old_blocks.dtype).expand(op.width // 2, 2, 2)
    before = [(i * op.depth) // extra for i in range(extra)]  # old layer each new one precedes
    perms, blocks, used = [], [], 0
    for j in range(op.depth):
        comp = torch.arange(op.width, dtype=torch.int64)
        while used < extra and before[used] == j:
            perms.append(new_perms[used])
            blocks.append(eye)
            comp = comp[new_perms[used]]
            used += 1
        perms.append(inverse_permutations(comp[None])[0][old_perms[j]])
        blocks.append(old_blocks[j])
    return _like(op, depth, torch.stack(perms), torch.stack(blocks).contiguous())


def _like(op: GTilde, depth: int, perms: torch.Tensor, blocks: torch.Tensor) -> GTilde:
    """A CPU operator with ``op``'s shape, seed and sampler name, and these layers."""
    return GTilde(
        op.in_features,
        op.out_features,
        depth,
        op.width,
        seed=op.seed,
        sampler=op.sampler,
        dtype=blocks.dtype,
        perms=perms,
        blocks=blocks,
    )
