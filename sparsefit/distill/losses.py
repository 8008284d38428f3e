"""The training losses: relative masked MSE of hidden states, 1 − cosine of pooled embeddings, and
the two stages' objectives built from them and the attention-map term (one block on its input
against the teacher's output of it; the whole student against every target of the teacher)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import _Attention, _captured
from .config import DistillConfig
from .models import _first
from .precision import _student_precision
from .teacher import _Teacher, pool


def _rel_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_valid ||s − t||² / sum_valid ||t||²`` over the tokens the mask keeps (``s`` is cast to
    ``t``'s dtype: a bfloat16-autocast student's outputs meet float32 targets)."""
    s = s.to(t.dtype)
    m = mask.to(s.dtype).unsqueeze(-1)
    return ((s - t).square() * m).sum() / (t.square() * m).sum().clamp(min=1e-12)


def _cosine_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1.0 - nn.functional.cosine_similarity(s, t, dim=-1).mean()


def _layer_loss(
    s_blocks: nn.ModuleList,
    block: int,
    hidden: torch.Tensor,
    t: _Teacher,
    mask: torch.Tensor,
    config: DistillConfig,
    attention: _Attention | None,
    bfloat16: bool = False,
) -> torch.Tensor:
    """Block ``block`` of the student on ``hidden`` against the teacher's output of that block (and
    its attention map when ``attention`` is set); ``bfloat16``: :func:`_student_precision`."""
    with _captured(attention, s_blocks, only=block) as qk, _student_precision(bfloat16, hidden.device):
        out = t.calls[block](s_blocks[block], hidden)
    loss = _rel_mse(out, t.hidden[block + 1], mask)
    if attention is not None:
        loss = loss + attention.kl(qk[block], t.attention[block], mask)
    return loss


def _e2e_loss(
    student: nn.Module,
    s_blocks: nn.ModuleList,
    batch: dict[str, torch.Tensor],
    t: _Teacher,
    config: DistillConfig,
    attention: _Attention | None = None,
    bfloat16: bool = False,
) -> torch.Tensor:
    """The end-to-end loss of ``student`` on ``batch``; ``bfloat16``: :func:`_student_precision`."""
    outs: list[torch.Tensor | None] = [None] * len(s_blocks)
    handles = []

    def post(i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outs[i] = _first(output)

        return hook

    for i, b in enumerate(s_blocks):
        handles.append(b.register_forward_hook(post(i)))
    try:
        with _captured(attention, s_blocks) as qk, _student_precision(bfloat16, batch["input_ids"].device):
            last = _first(student(**batch))
    finally:
        for h in handles:
            h.remove()
    mask = batch["attention_mask"]
    last = last.to(t.final.dtype)
    loss = _rel_mse(last, t.final, mask)
    if config.pooled_weight > 0:
        loss = loss + config.pooled_weight * _cosine_loss(pool(last, mask), t.pooled)
    if config.intermediate_weight > 0 and len(s_blocks) > 1:
        inter = [_rel_mse(o, t.hidden[i + 1], mask) for i, o in enumerate(outs[:-1]) if o is not None]
        loss = loss + config.intermediate_weight * torch.stack(inter).mean()
    if attention is not None:
        kl = [attention.kl(pair, tm, mask) for pair, tm in zip(qk, t.attention, strict=True)]
        loss = loss + torch.stack(kl).mean()
    return loss
