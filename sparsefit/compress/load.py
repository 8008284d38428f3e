"""Loading a compressed folder into a model: :func:`load_compressed`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SparsefitError
from ..headers import safetensors_header
from .format import load_layer, read_manifest
from .replacement import Replacement


@dataclass
class LoadReport:
    """What :func:`load_compressed` did."""

    replaced: list[str]
    loaded: int
    missing: list[str]
    unexpected: list[str]


def _resolver(model: nn.Module, keys: set[str]) -> Callable[[str], str | None]:
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(name: str) -> str | None:
        if name in keys:
            return name
        if prefix and f"{prefix}.{name}" in keys:
            return f"{prefix}.{name}"
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in keys:
            return name[len(prefix) + 1 :]
        return None

    return resolve


def linear_shape(module: nn.Module, name: str) -> tuple[int, int]:
    """``(out, in)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored ``(in, out)``)."""
    from .calibrate import is_conv1d

    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if is_conv1d(module):
        k, m = module.weight.shape
        return (int(m), int(k))
    raise SparsefitError(f"{name} is a {type(module).__name__}, not nn.Linear or Conv1D; it cannot be swapped")


def swap_module(model: nn.Module, module_name: str, replacement: Replacement, backend: str = "auto") -> nn.Module:
    """Put ``replacement`` (as a :class:`~sparsefit.SparseLinear` in the old layer's dtype and device,
    bias kept) where the linear layer ``module_name`` of ``model`` is; returns the new module."""
    module = model.get_submodule(module_name)
    new = replacement.to_module(module.bias, dtype=module.weight.dtype, backend=backend).to(module.weight.device)
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def load_compressed(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = False, backend: str = "auto"
) -> LoadReport:
    """Swap the compressed ``nn.Linear`` (or GPT-2 ``Conv1D``) modules of ``model`` for :class:`~sparsefit.SparseLinear`
    (biases kept) and load every other tensor from the compressed folder ``path``.

    Names are matched as stored, or with/without the model's ``base_model_prefix`` (so a
    ``BertModel`` checkpoint loads into ``BertForSequenceClassification``). ``strict=True``
    raises when a model tensor was not in the folder or a folder tensor has no place in the model.

    Example
    -------
    >>> model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(out))  # doctest: +SKIP
    >>> load_compressed(model, out)                                                               # doctest: +SKIP
    """
    from safetensors import safe_open

    folder = Path(path)
    man = read_manifest(folder)
    keys = set(model.state_dict().keys())
    resolve = _resolver(model, keys)
    replaced: list[str] = []
    dense_parts: list[dict[str, torch.Tensor]] = []
    for rec in man["layers"]:
        key = resolve(rec["name"])
        if key is None:
            raise SparsefitError(f"the model has no parameter {rec['name']!r}; is this the right model for {folder}?")
        module_name = re.sub(r"\.weight$", "", key)
        module = model.get_submodule(module_name)
        if rec["status"] != "compressed":
            _, tensors = load_layer(folder, rec)
            dense_parts.append({key: tensors[rec["name"]]})
            continue
        shape = linear_shape(module, module_name)
        if shape != tuple(rec["shape"]):
            raise SparsefitError(
                f"{module_name}: the model's layer is {shape[0]}x{shape[1]}, the compressed one {tuple(rec['shape'])}"
            )
        replacement, _ = load_layer(folder, rec, device=module.weight.device)
        assert replacement is not None
        swap_module(model, module_name, replacement, backend)
        replaced.append(module_name)
    new_keys = set(model.state_dict().keys())
    resolve = _resolver(model, new_keys)
    loaded: set[str] = set()
    unexpected: list[str] = []

    state = model.state_dict()

    def load_part(part: dict[str, torch.Tensor]) -> None:
        mapped = {}
        for name, t in part.items():
            key = resolve(name)
            if key is None:
                unexpected.append(name)
            elif tuple(t.shape) != tuple(state[key].shape):
                raise SparsefitError(
                    f"{folder}: tensor {name!r} has shape {tuple(t.shape)}, the model's {key} {tuple(state[key].shape)}"
                )
            else:
                mapped[key] = t
        model.load_state_dict(mapped, strict=False)
        loaded.update(mapped)

    for part in dense_parts:
        load_part(part)
    for fname in man.get("dense_files", []):
        fpath = folder / fname
        if fpath.is_file():
            safetensors_header(fpath)
        try:
            with safe_open(str(fpath), framework="pt") as f:
                part = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise SparsefitError(f"{fpath}: cannot read ({e}); the folder is incomplete") from None
        load_part(part)
        del part
    sparse_params = {
        f"{r}.{n}" for r in replaced for n in ("operator.blocks", "operator.perms", "lowrank_u", "lowrank_v")
    }
    state = model.state_dict(keep_vars=True)
    loaded_ptrs = {state[k].data_ptr() for k in loaded if k in state}  # tied weights (GPT-2's lm_head) count
    missing = sorted(
        k for k in new_keys if k not in loaded and k not in sparse_params and state[k].data_ptr() not in loaded_ptrs
    )
    if strict and (missing or unexpected):
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SparsefitError(f"{folder} does not match the model: {what}")
    return LoadReport(replaced, len(loaded), missing, unexpected)


# ----------------------------------------------------------------------------------------------
