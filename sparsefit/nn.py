"""``SparseLinear``: a drop-in ``torch.nn.Module`` replacement for ``nn.Linear`` built on G~."""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import SparsefitError
from .operator import GTilde


class SparseLinear(nn.Module):
    """``y = G~ x + U (V x) + bias`` for ``x: (..., in_features)`` → ``(..., out_features)``.

    operator: the G~ part (None for a purely low-rank layer); lowrank: optional ``(U: (out, r),
    V: (r, in))``; dtype: the dtype of every parameter (default G~'s blocks' or ``U``'s), so a
    float16/bfloat16 model stays in its dtype. ``backend``: one of
    :data:`sparsefit.kernels.BACKENDS` (``auto``, ``reference``, ``torch``, ``cpu``, ``cuda``);
    ``auto`` picks the fused kernel of the input's device where it can run.

    Example
    -------
    >>> layer = SparseLinear.from_file("P.safetensors")          # doctest: +SKIP
    >>> y = layer(torch.randn(8, layer.in_features))              # doctest: +SKIP
    """

    def __init__(
        self,
        operator: GTilde | None,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        *,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if operator is None and lowrank is None:
            raise SparsefitError("SparseLinear needs a G~ operator, a low-rank part, or both")
        if lowrank is not None:
            u, v = lowrank
            if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
                raise SparsefitError(f"low-rank factors {tuple(u.shape)} and {tuple(v.shape)} do not chain")
            shape = (int(u.shape[0]), int(v.shape[1]))
            if operator is not None and shape != (operator.out_features, operator.in_features):
                raise SparsefitError(
                    f"low-rank part {shape} does not match G~ {operator.out_features}x{operator.in_features}"
                )
        else:
            shape = (operator.out_features, operator.in_features)  # type: ignore[union-attr]
        dtype = dtype or (operator.blocks.dtype if operator is not None else lowrank[0].dtype)  # type: ignore[index]
        if operator is not None and operator.blocks.dtype != dtype:
            operator = operator.to(dtype)
        self.operator = operator
        self.out_features, self.in_features = shape
        self.backend = backend
        if lowrank is not None:
            self.lowrank_u = nn.Parameter(lowrank[0].detach().to(dtype).clone())
            self.lowrank_v = nn.Parameter(lowrank[1].detach().to(dtype).clone())
        else:
            self.register_parameter("lowrank_u", None)
            self.register_parameter("lowrank_v", None)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise SparsefitError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().to(dtype).clone())
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
        y = self.operator(x, backend=self.backend) if self.operator is not None else None
        if self.lowrank_u is not None:
            # F.linear, not x @ V.t(): the same products, and the fast bfloat16 kernels under autocast;
            # a purely low-rank layer adds its bias in the second product
            bias = self.bias if y is None else None
            low = nn.functional.linear(nn.functional.linear(x, self.lowrank_v), self.lowrank_u, bias)
            if y is None:
                return low
            y = y + low
        assert y is not None
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        """The weight matrix ``(out_features, in_features)`` this module applies."""
        w = self.operator.to_dense() if self.operator is not None else None
        if self.lowrank_u is not None:
            low = (self.lowrank_u @ self.lowrank_v).detach()
            w = low if w is None else w + low.to(w.dtype)
        assert w is not None
        return w

    def extra_repr(self) -> str:
        rank = 0 if self.lowrank_u is None else self.lowrank_u.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + (
            f", rank={rank}" if rank else ""
        )
