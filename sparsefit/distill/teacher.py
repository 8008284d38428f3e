"""The teacher's targets: one forward pass recording every block's input, output and call
(the extra arguments, to replay a block on another input), the final hidden state, its masked
mean pool (:func:`pool`) and the attention maps; and the per-batch cache of these records in a
:class:`~sparsefit.spill.SpillStore`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError
from ..spill import SpillStore
from .attention import _Attention, _captured, _Map
from .models import _first


@dataclass
class _Call:
    """How a block was called: everything but the hidden state, and where the hidden state goes."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_kw: bool

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_kw:
            out = block(*self.args, **{**self.kwargs, "hidden_states": hidden})
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return _first(out)


def _detach(x: Any, dtype: torch.dtype | None = None) -> Any:
    """``x`` (tensors inside tuples, lists, dicts too) detached; floating tensors cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, tuple):
        return tuple(_detach(v, dtype) for v in x)
    if isinstance(x, list):
        return [_detach(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v, dtype) for k, v in x.items()}
    return x


@dataclass
class _Teacher:
    """The teacher's activations on one batch: block inputs/outputs ``hidden[0..L]``, the calls, the
    model's output (``final``; the last block's output unless a final norm follows) and its pool."""

    hidden: list[torch.Tensor]
    calls: list[_Call]
    final: torch.Tensor
    pooled: torch.Tensor
    attention: list[_Map] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        """Every activation (not the calls), in the order :meth:`from_tensors` reads them back."""
        maps = [x for m in self.attention for x in (m.probs, m.entropy)]
        return [*self.hidden, self.final, self.pooled, *maps]

    @staticmethod
    def from_tensors(calls: list[_Call], tensors: Sequence[torch.Tensor]) -> _Teacher:
        """The record of a batch with these ``calls`` whose :meth:`tensors` were ``tensors``."""
        n = len(calls) + 1
        maps = tensors[n + 2 :]
        return _Teacher(
            list(tensors[:n]),
            calls,
            tensors[n],
            tensors[n + 1],
            [_Map(maps[2 * i], maps[2 * i + 1]) for i in range(len(maps) // 2)],
        )


class _TeacherCache:
    """The teacher's activations per training batch in a :class:`~sparsefit.spill.SpillStore`
    (memory, then a temporary file); a batch's calls (the blocks' extra arguments: masks, a few kB)
    stay in memory wherever its activations are."""

    def __init__(self, store: SpillStore) -> None:
        self.store = store
        self.calls: dict[int, list[_Call]] = {}
        self.kept = {"memory": 0, "disk": 0, "none": 0}  # batches put, by where they went (ever)

    def get(self, bi: int) -> _Teacher | None:
        tensors = self.store.get(bi)
        return None if tensors is None else _Teacher.from_tensors(self.calls[bi], tensors)

    def put(self, bi: int, t: _Teacher) -> None:
        where = self.store.put(bi, t.tensors())
        self.kept[where] += 1
        if where != "none":
            self.calls[bi] = t.calls

    def clear(self) -> None:
        self.store.clear()
        self.calls.clear()


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens: ``(B, T, H), (B, T) -> (B, H)``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def _run_teacher(
    teacher: nn.Module,
    blocks: nn.ModuleList,
    batch: dict[str, torch.Tensor],
    attention: _Attention | None = None,
    bfloat16: bool = False,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> _Teacher:
    """The teacher's activations on ``batch``; with ``bfloat16`` its forward pass runs under bfloat16
    autocast and every stored activation is cast back to the teacher's own dtype; ``weights``
    (:func:`bfloat16_linear_weights`, with ``bfloat16`` only) replace the teacher's own for the pass."""
    dtype = next(teacher.parameters()).dtype if bfloat16 else None
    calls: list[_Call | None] = [None] * len(blocks)
    hidden: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
    handles = []

    def pre(i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                calls[i] = _Call(_detach(tuple(args[1:]), dtype), _detach(dict(kwargs), dtype), False)
                hidden[i] = _detach(args[0], dtype)
            else:
                kw = dict(kwargs)
                hidden[i] = _detach(kw.pop("hidden_states"), dtype)
                calls[i] = _Call((), _detach(kw, dtype), True)

        return hook

    def post(i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden[i + 1] = _detach(_first(output), dtype)

        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post(i)))
    try:
        with (
            _captured(attention, blocks) as qk,
            torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bfloat16),
        ):
            if weights is not None and bfloat16:
                out = torch.func.functional_call(teacher, dict(weights), (), batch, strict=False)
            else:
                out = teacher(**batch)
            out = _detach(_first(out), dtype)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        raise SparsefitError(
            "not every transformer block ran in the teacher's forward pass; name the blocks with blocks="
        )
    mask = batch["attention_mask"]
    maps = [] if attention is None else [attention.target(*_detach(pair, dtype), mask) for pair in qk]
    return _Teacher(
        [h for h in hidden if h is not None],
        [c for c in calls if c is not None],
        out,
        pool(out, mask),
        maps,
    )
