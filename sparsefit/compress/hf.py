"""Hugging Face models for calibration and evaluation (``transformers``, local folders, offline).

Only model folders (``config.json`` beside the weights) are opened, never with remote code.
A model is a causal LM when its ``architectures`` name one (``…ForCausalLM``, ``…LMHeadModel``);
it is then loaded with its LM head (for perplexity), else as the bare encoder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SparsefitError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SparsefitError("text calibration and --eval need transformers: pip install transformers") from None
    return transformers


def model_folder(source: str | os.PathLike[str]) -> Path:
    """``source`` when it is a model folder with ``config.json``, else a clear error."""
    p = Path(source)
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise SparsefitError(
            f"{p}: text calibration and --eval need a model folder with config.json and a tokenizer "
            "(or give --calibration a recorded-activations .safetensors file)"
        )
    return p


def task_of(config: Any) -> str:
    """``"causal"`` for a causal language model, else ``"encoder"``."""
    archs = getattr(config, "architectures", None) or []
    return "causal" if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) else "encoder"


def load_config(folder: str | os.PathLike[str]) -> Any:
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(str(folder))  # never trust_remote_code
    except (ValueError, OSError, KeyError) as e:
        raise SparsefitError(
            f"{folder}: transformers cannot read this model ({str(e).splitlines()[0][:160]})"
        ) from None


def model_class(config: Any) -> Any:
    tf = _transformers()
    return tf.AutoModelForCausalLM if task_of(config) == "causal" else tf.AutoModel


def load_model(source: str | os.PathLike[str]) -> tuple[nn.Module, Any, str]:
    """``(model in eval mode, tokenizer, task)`` of a model folder."""
    folder = model_folder(source)
    tf = _transformers()
    cfg = load_config(folder)
    try:
        model = model_class(cfg).from_pretrained(str(folder)).eval()
        tok = tf.AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError) as e:
        raise SparsefitError(
            f"{folder}: cannot load the model or its tokenizer ({str(e).splitlines()[0][:160]})"
        ) from None
    return model, tok, task_of(cfg)


def empty_model(config_folder: str | os.PathLike[str]) -> nn.Module:
    """The architecture of a model folder, randomly initialised (weights are loaded afterwards)."""
    cfg = load_config(config_folder)
    return model_class(cfg).from_config(cfg).eval()


def resolve_module(model: nn.Module, weight_name: str) -> str:
    """The module of ``model`` that owns checkpoint tensor ``weight_name`` (with or without the
    model's ``base_model_prefix``, or inside it)."""
    names = dict(model.named_modules())
    module = weight_name.removesuffix(".weight")
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [module]
    if prefix:
        candidates += [f"{prefix}.{module}", module.removeprefix(prefix + ".")]
    for c in candidates:
        if c in names and getattr(names[c], "weight", None) is not None:
            return c
    raise SparsefitError(f"the model has no module for {weight_name!r}; is this the right model?")


def linear_weights(folder: str | os.PathLike[str], names: list[str]) -> tuple[frozenset[str], frozenset[str]] | None:
    """Which checkpoint tensors ``names`` are weights of linear layers: ``(nn.Linear or Conv1D,
    Conv1D only)`` (GPT-2-style ``Conv1D`` stores its weight ``(in, out)``).

    The architecture is built on the meta device (no memory, no weights read). None without
    ``transformers`` or a ``config.json`` that it understands (then names alone decide).
    """
    from .calibrate import is_conv1d

    p = Path(folder)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return None
    try:
        tf = _transformers()
        cfg = tf.AutoConfig.from_pretrained(str(p))
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = model_class(cfg).from_config(cfg)
    except (SparsefitError, ValueError, OSError, KeyError):
        return None
    linear, conv = set(), set()
    modules = dict(model.named_modules())
    for n in names:
        try:
            m = modules[resolve_module(model, n)]
        except SparsefitError:
            continue
        if n.endswith(".weight") and (isinstance(m, nn.Linear) or is_conv1d(m)):
            linear.add(n)
            if is_conv1d(m):
                conv.add(n)
    return frozenset(linear), frozenset(conv)
