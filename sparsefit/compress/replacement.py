"""What replaces one weight ``W: (out, in)``: ``Ŵ = G~ + U V`` with either part optional.

Structures (the record's ``structure``): ``gtilde`` (G~ only), ``lowrank`` (``U: (out, r)``,
``V: (r, in)`` only), ``gtilde+lowrank`` (both, summed), and ``dense`` (no replacement: the
layer keeps its weight). In a layer file a replacement of module ``X`` is stored as ``X.blocks``,
``X.permutations`` (G~, see :mod:`sparsefit.fileformat`) and ``X.lowrank_u``, ``X.lowrank_v``;
the header says which parts are there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError
from ..operator import GTilde

STRUCTURES = ("gtilde", "lowrank", "gtilde+lowrank", "dense")


@dataclass
class Replacement:
    """``Ŵ = gtilde + u @ v`` (parts that are None are absent; at least one is present)."""

    gtilde: GTilde | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.u is None) != (self.v is None):
            raise SparsefitError("a low-rank part needs both U (out, r) and V (r, in)")
        if self.gtilde is None and self.u is None:
            raise SparsefitError("a replacement needs G~, a low-rank part, or both")
        if self.u is not None and self.v is not None:
            if self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[1] != self.v.shape[0]:
                raise SparsefitError(f"low-rank factors {tuple(self.u.shape)} and {tuple(self.v.shape)} do not chain")
            if self.gtilde is not None and (self.u.shape[0], self.v.shape[1]) != self.shape:
                raise SparsefitError(
                    f"low-rank part {self.u.shape[0]}x{self.v.shape[1]} does not match G~ {self.shape}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        if self.gtilde is not None:
            return (self.gtilde.out_features, self.gtilde.in_features)
        assert self.u is not None and self.v is not None
        return (self.u.shape[0], self.v.shape[1])

    @property
    def rank(self) -> int:
        return 0 if self.u is None else int(self.u.shape[1])

    @property
    def structure(self) -> str:
        if self.gtilde is None:
            return "lowrank"
        return "gtilde" if self.u is None else "gtilde+lowrank"

    @property
    def num_parameters(self) -> int:
        m, k = self.shape
        return (self.gtilde.num_parameters if self.gtilde is not None else 0) + self.rank * (m + k)

    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``Ŵ`` as a dense ``(out, in)`` tensor."""
        m, k = self.shape
        w = torch.zeros(m, k, dtype=dtype)
        if self.gtilde is not None:
            w += self.gtilde.to_dense(dtype).cpu()
        if self.u is not None and self.v is not None:
            w += self.u.detach().cpu().to(dtype) @ self.v.detach().cpu().to(dtype)
        return w

    def tensors(self, module: str) -> dict[str, torch.Tensor]:
        from ..fileformat import operator_tensors

        out = operator_tensors(self.gtilde, prefix=module + ".") if self.gtilde is not None else {}
        if self.u is not None and self.v is not None:
            out[f"{module}.lowrank_u"] = self.u.detach().cpu().contiguous()
            out[f"{module}.lowrank_v"] = self.v.detach().cpu().contiguous()
        return out

    def header(self) -> dict[str, Any]:
        from ..fileformat import make_header

        h: dict[str, Any] = {"structure": self.structure, "rank": self.rank}
        if self.gtilde is not None:
            h["operator"] = make_header(self.gtilde, has_bias=False)
        return h

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], module: str, where: str, device: Any = None
    ) -> Replacement:
        """Rebuild a stored replacement (validated); ``header`` as written by :meth:`header`."""
        from ..fileformat import operator_from_tensors

        op = None
        if "operator" in header:
            op, _ = operator_from_tensors(tensors, header["operator"], prefix=module + ".", where=where, device=device)
        u = tensors.get(f"{module}.lowrank_u")
        v = tensors.get(f"{module}.lowrank_v")
        if (u is None) != (header.get("rank", 0) == 0):
            raise SparsefitError(f"{where}: the low-rank factors do not match the header")
        if u is not None and v is None:
            raise SparsefitError(f"{where}: {module}.lowrank_v is missing")
        if u is not None and device is not None:
            u, v = u.to(device), v.to(device)  # type: ignore[union-attr]
        return cls(op, u, v)

    def to_module(
        self, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None, backend: str = "auto"
    ) -> nn.Module:
        """A :class:`~sparsefit.SparseLinear` computing ``Ŵ x + bias`` (in ``dtype``, default G~'s)."""
        from ..nn import SparseLinear

        lowrank = (self.u, self.v) if self.u is not None and self.v is not None else None
        return SparseLinear(self.gtilde, bias, backend=backend, lowrank=lowrank, dtype=dtype)
