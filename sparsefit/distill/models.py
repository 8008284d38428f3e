"""The models' structure: where the transformer blocks are (:func:`find_blocks`), which linears the
student replaced (:func:`replaced_modules`), the parameters that train
(:func:`trainable_parameters`, :func:`train_only`), and the hidden state inside a model's or
block's output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError
from .config import DistillConfig


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The module list of transformer blocks: ``path`` or the largest ``nn.ModuleList`` of one module type."""
    if path is not None:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise SparsefitError(f"the model has no module {path!r} (blocks=)") from None
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            raise SparsefitError(f"{path!r} is not a non-empty nn.ModuleList of blocks")
        return path, mod
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise SparsefitError(
            "cannot find the model's transformer blocks; name them with blocks= (e.g. 'encoder.layer')"
        )
    return best[1], best[2]


def replaced_modules(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Names of the teacher's ``nn.Linear`` modules that the student holds as another module type."""
    out = []
    smods = dict(student.named_modules())
    for name, mod in teacher.named_modules():
        if isinstance(mod, nn.Linear) and name in smods and type(smods[name]) is not type(mod):
            out.append(name)
    return out


def trainable_parameters(
    teacher: nn.Module, student: nn.Module, config: DistillConfig, blocks_path: str
) -> dict[str, nn.Parameter]:
    """The student's parameters :func:`distill` trains, by name (see :class:`DistillConfig`)."""
    replaced = replaced_modules(teacher, student)
    if not replaced:
        raise SparsefitError(
            "the student has no replaced layers to train (every teacher nn.Linear is still an nn.Linear)"
        )
    chosen: dict[str, nn.Parameter] = {}
    for name in replaced:
        for pname, p in student.get_submodule(name).named_parameters():
            if pname.rsplit(".", 1)[-1] != "bias" or config.train_biases:
                chosen[f"{name}.{pname}"] = p
    prefix = blocks_path + "." if blocks_path else ""
    for mname, mod in student.named_modules():
        if not mname.startswith(prefix):
            continue
        is_norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(mod).__name__.lower()
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}"
            if (
                (is_norm and config.train_norms)
                or (not is_norm and pname == "bias" and config.train_biases)
                or (isinstance(mod, nn.Linear) and pname == "weight" and config.train_dense)
            ):
                chosen.setdefault(full, p)
    for n, p in chosen.items():
        if not p.is_floating_point():
            raise SparsefitError(f"parameter {n!r} is not floating point and cannot be trained")
    return dict(sorted(chosen.items()))


def train_only(teacher: nn.Module, student: nn.Module, params: Mapping[str, nn.Parameter]) -> None:
    """Both models in eval mode (no dropout), gradients for ``params`` only."""
    teacher.eval()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]
