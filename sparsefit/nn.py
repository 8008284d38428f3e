"""``SparseLinear``: a drop-in ``torch.nn.Module`` replacement for ``nn.Linear`` built on G~."""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import SparsefitError
from .operator import GTilde


class SparseLinear(nn.Module):
    """``y = G~ x + bias`` for ``x: (..., in_features)`` → ``(..., out_features)``.

    ``backend``: one of :data:`sparsefit.kernels.BACKENDS` (``auto``, ``reference``, ``torch``,
    ``cpu``, ``cuda``); ``auto`` picks the fused kernel of the input's device where it can run.

    Example
    -------
    >>> layer = SparseLinear.from_file("P.safetensors")          # doctest: +SKIP
    >>> y = layer(torch.randn(8, layer.in_features))              # doctest: +SKIP
    """

    def __init__(self, operator: GTilde, bias: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.operator = operator
        self.in_features = operator.in_features
        self.out_features = operator.out_features
        self.backend = backend
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise SparsefitError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().to(operator.blocks.dtype).clone())
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], device: torch.device | str | None = None, backend: str = "auto"
    ) -> SparseLinear:
        """Load an exported sparsefit file (validated) as a module."""
        from .fileformat import load

        op, bias, _ = load(path, device=device)
        return cls(op, bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.operator(x, backend=self.backend)
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        """The weight matrix ``(out_features, in_features)`` this module applies."""
        return self.operator.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
