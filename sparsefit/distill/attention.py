"""The attention-map term: finding each block's query and key projections
(:func:`find_attention`), hooking their outputs during a forward pass, and the maths of the maps
(scaled scores, the teacher's distributions and entropies, the KL divergence of the student's)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError
from .config import AUTO_ATTENTION_WEIGHT
from .models import _first


@dataclass(frozen=True)
class _Map:
    """The teacher's attention distributions in one block: ``probs: (B, heads, T, T)`` (0 at padded
    keys) and ``entropy``, their mean entropy over heads and real queries (the part of the KL
    divergence that does not depend on the student)."""

    probs: torch.Tensor
    entropy: torch.Tensor


def _query_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x: (B, heads, T)`` over heads and the queries the mask keeps."""
    q = mask.to(x.dtype)[:, None, :]
    return (x * q).sum() / (q.sum() * x.shape[1]).clamp(min=1.0)


@dataclass(frozen=True)
class _Attention:
    """Where each block's query and key projections are (names inside the block), the head count
    and the weight of the attention-map term."""

    names: list[tuple[str, str]]
    heads: int
    weight: float

    def kl(self, qk: Sequence[torch.Tensor | None], target: _Map, mask: torch.Tensor) -> torch.Tensor:
        """The weighted term for one block: KL(teacher ‖ student) of the maps, from the student's
        captured ``(q, k)``. Written as cross-entropy minus the teacher's entropy, with
        ``log p_s = s − logsumexp(s)``, so that the student's log-probabilities are never formed."""
        q, k = qk
        assert q is not None and k is not None
        s = self.scores(q.to(target.probs.dtype), k.to(target.probs.dtype), mask)
        cross = torch.logsumexp(s, dim=-1) - (target.probs * s).sum(-1)
        return self.weight * (_query_mean(cross, mask) - target.entropy)

    def scores(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` queries and keys -> ``(B, heads, T, T)`` scaled scores, padded keys at the
        dtype's lowest value (so their probability is exactly 0)."""
        b, t, d = q.shape
        dh = d // self.heads
        qh = (q * (1.0 / math.sqrt(dh))).reshape(b, t, self.heads, dh).transpose(1, 2)
        kh = k.reshape(b, k.shape[1], self.heads, dh).transpose(1, 2)
        s = qh @ kh.transpose(-1, -2)
        return s.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(s.dtype).min)

    def logprobs(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` queries and keys -> ``(B, heads, T, T)`` log attention probabilities."""
        return torch.log_softmax(self.scores(q, k, mask), dim=-1)

    def target(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> _Map:
        """The teacher's map of one block, ready for :meth:`kl`."""
        logp = self.logprobs(q, k, mask)
        p = logp.exp()
        return _Map(p, _query_mean(-(p * logp).sum(-1), mask))


@contextlib.contextmanager
def _captured(attention: _Attention | None, blocks: nn.ModuleList, only: int | None = None):
    """Within the block, ``store[i]`` receives block ``i``'s query and key outputs (every block, or
    block ``only``); nothing is hooked when ``attention`` is None."""
    store: list[list[torch.Tensor | None]] = [[None, None] for _ in blocks]

    def keep(i: int, j: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[i][j] = _first(output)

        return hook

    handles = []
    if attention is not None:
        for i, pair in enumerate(attention.names):
            if only is None or i == only:
                handles += [blocks[i].get_submodule(n).register_forward_hook(keep(i, j)) for j, n in enumerate(pair)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


#: Leaf names of the query and key projections, per model family.
_QK_NAMES = (("query", "key"), ("q_proj", "k_proj"))


def find_attention(
    teacher: nn.Module, blocks: nn.ModuleList, weight: float | None = AUTO_ATTENTION_WEIGHT
) -> _Attention | None:
    """The query/key projections of every block and the head count for ``attention_weight``
    (:attr:`DistillConfig.attention_weight`): ``None`` when the weight is 0, or when it is ``None``
    (auto) and the model lacks them; an error when an explicit weight > 0 cannot be applied."""
    if weight == 0:
        return None
    heads = getattr(getattr(teacher, "config", None), "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        if weight is None:
            return None
        raise SparsefitError("attention_weight needs a model whose config has num_attention_heads; set it to 0")
    names: list[tuple[str, str]] = []
    for i, block in enumerate(blocks):
        mods = dict(block.named_modules())
        pair = next(
            (
                (n, n[: len(n) - len(qn)] + kn)
                for qn, kn in _QK_NAMES
                for n in mods
                if n.rsplit(".", 1)[-1] == qn and n[: len(n) - len(qn)] + kn in mods
            ),
            None,
        )
        if pair is None:
            if weight is None:
                return None
            raise SparsefitError(
                f"attention_weight: block {i} has no query/key projections named query/key or q_proj/k_proj;"
                " set attention_weight to 0"
            )
        names.append(pair)
    return _Attention(names, heads, AUTO_ATTENTION_WEIGHT if weight is None else float(weight))
