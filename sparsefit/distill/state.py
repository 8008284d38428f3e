"""The resume state: its format, the fingerprint of the settings, trained parameters and samples
that a state file must match to be resumed from, and its atomic saving and tolerant loading (a
foreign, damaged or mismatched file is ignored)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DistillConfig

STATE_FORMAT = "sparsefit.distill-state"
STATE_VERSION = 1


#: Settings that change where the work is kept, not its result: a state file resumes across them.
_RESULT_NEUTRAL = ("cache_mb", "spill_mb", "checkpoint_every")


def _fingerprint(config: DistillConfig, params: dict[str, nn.Parameter], samples: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(repr(sorted((k, v) for k, v in config.to_dict().items() if k not in _RESULT_NEUTRAL)).encode())
    for n, p in params.items():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype}".encode())
    for k in sorted(samples):
        h.update(k.encode())
        h.update(samples[k].numpy().tobytes())
    return h.hexdigest()


def _save_state(path: Path, state: dict[str, Any]) -> None:
    from ..fileformat import atomic_output

    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or damaged file: start afresh (it is overwritten atomically later)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
        return None
    return state
