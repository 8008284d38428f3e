"""The calibration samples: tokenising text (:func:`tokenize`), checking and joining the batches
given, the seeded train/validation split (:func:`split_samples`), batches of similar length
(:func:`make_batches`) cut to their width, the pure per-epoch batch order (:func:`batch_order`),
and the token augmentation of the end-to-end stage (inner tokens replaced by seeded draws)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError
from .config import DistillConfig


def tokenize(tokenizer: Any, texts: Sequence[str], config: DistillConfig) -> dict[str, torch.Tensor]:
    """``texts`` tokenised for :func:`distill`: ``{input_ids, attention_mask, …}: (N, T)`` with
    ``T <= config.max_length`` (right padding)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
    return {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}


def _as_samples(calibration: Any) -> dict[str, torch.Tensor]:
    """One ``(N, T)`` dict from a dict or a list of batch dicts (right-padded with zeros to a common T)."""
    parts = [calibration] if isinstance(calibration, Mapping) else list(calibration)
    if not parts:
        raise SparsefitError("no calibration samples to distil on")
    keys = list(parts[0].keys())
    if "attention_mask" not in keys:
        raise SparsefitError("calibration batches need an 'attention_mask' (tokenise with padding=True)")
    for p in parts:
        if list(p.keys()) != keys:
            raise SparsefitError("all calibration batches must have the same keys")
        for k in keys:
            if not isinstance(p[k], torch.Tensor) or p[k].dim() != 2 or p[k].shape != p["attention_mask"].shape:
                raise SparsefitError(f"calibration tensor {k!r} must be (samples, tokens) like the attention mask")
    width = max(int(p["attention_mask"].shape[1]) for p in parts)
    out = {}
    for k in keys:
        out[k] = torch.cat([nn.functional.pad(p[k], (0, width - p[k].shape[1])) for p in parts]).cpu()
    lengths = out["attention_mask"].sum(1)
    if int(lengths.min()) < 1:
        raise SparsefitError("a calibration sample has no tokens (its attention mask is all zero)")
    return out


def split_samples(n: int, config: DistillConfig) -> tuple[list[int], list[int]]:
    """``(train, validation)`` sample indices: a seeded shuffle, the validation part first."""
    n_val = min(config.val_max, max(1, round(n * config.val_fraction)))
    if n - n_val < 1:
        raise SparsefitError(f"need at least 2 calibration samples to distil (one is kept for validation), got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def make_batches(indices: Sequence[int], lengths: torch.Tensor, batch: int) -> list[list[int]]:
    """Consecutive chunks of ``indices`` sorted by token length (little padding per batch)."""
    order = sorted(indices, key=lambda i: (int(lengths[i]), i))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _gather(samples: dict[str, torch.Tensor], idx: list[int], multiple: int = 1) -> dict[str, torch.Tensor]:
    """The samples ``idx`` cut to their longest one, rounded up to ``multiple`` tokens."""
    rows = torch.tensor(idx)
    width = int(samples["attention_mask"][rows].sum(1).max())
    width = min(-(-width // multiple) * multiple, samples["attention_mask"].shape[1])
    return {k: v[rows, :width].contiguous() for k, v in samples.items()}


def batch_order(n_batches: int, seed: int, stage: int, epoch: int) -> list[int]:
    """The order of the training batches in one epoch of one stage (a pure function: resumable)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n_batches, generator=g).tolist()


def _inner_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Every real position but the first and last of each sample (no ``[CLS]``/``[SEP]``-like marker)."""
    mask = attention_mask.bool()
    inner = mask.clone()
    inner[:, 0] = False
    inner[torch.arange(mask.shape[0]), mask.sum(1) - 1] = False
    return inner


def _inner_tokens(samples: dict[str, torch.Tensor]) -> torch.Tensor:
    """The token ids at the inner positions (:func:`_inner_mask`), the pool :func:`_augment`
    draws replacements from."""
    pool = samples["input_ids"][_inner_mask(samples["attention_mask"])]
    return pool if pool.numel() else samples["input_ids"][samples["attention_mask"].bool()]


def _augment(
    batch: dict[str, torch.Tensor], pool: torch.Tensor, fraction: float, key: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    """``batch`` with about ``fraction`` of its inner tokens replaced by tokens drawn from ``pool``.

    Distillation matches the teacher on whatever input it gets, so perturbed sentences are as good
    a training signal as real ones and keep a few thousand calibration sentences from being learnt
    by heart. ``key`` seeds the draw.
    """
    seed = (key[0] * 1_000_003 + key[1]) * 1_000_003 + key[2]
    g = torch.Generator().manual_seed(seed % (2**63))
    ids = batch["input_ids"]
    hit = (torch.rand(ids.shape, generator=g) < fraction).to(ids.device) & _inner_mask(batch["attention_mask"])
    new = pool[torch.randint(pool.numel(), ids.shape, generator=g)].to(ids.device)
    return {**batch, "input_ids": torch.where(hit, new, ids)}
