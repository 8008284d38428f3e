"""Checking a compressed folder against its source: :func:`verify_compressed`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import open_checkpoint
from ..errors import SparsefitError
from .format import load_layer, read_manifest
from .load import load_compressed


@torch.no_grad()
def verify_compressed(
    output: str | os.PathLike[str], source: str | os.PathLike[str], *, seed: int = 0, use_transformers: bool = True
) -> dict[str, Any]:
    """Reload a compressed folder and check it against the source.

    Always: every compressed layer's G~ against its dense weight (exact relative error, which
    must agree with the manifest). For a model folder with ``config.json`` when ``transformers``
    is installed: the original and the compressed ``AutoModel`` on a few random token ids
    (relative error and cosine similarity of the last hidden states). Raises on a mismatch.
    """
    folder = Path(output)
    man = read_manifest(folder)
    ckpt = open_checkpoint(source)
    entries = ckpt.by_name()
    layer_checks = []
    for s in range(len(ckpt.shards)):
        recs = [r for r in man["layers"] if r["status"] == "compressed" and entries[r["name"]].shard == s]
        if not recs:
            continue
        with ckpt.shard(s) as reader:
            for rec in recs:
                rep, _ = load_layer(folder, rec)
                assert rep is not None
                a = reader.get(rec["name"]).double()
                if rec.get("transposed"):
                    a = a.t()
                g = rep.to_dense(torch.float64)
                err = float(torch.linalg.norm(g - a) / torch.linalg.norm(a))
                exact = rec["relative_error_method"] == "exact" and rec["relative_error"] is not None
                ok = not exact or abs(err - rec["relative_error"]) <= 1e-3 + 1e-2 * err
                layer_checks.append(
                    {"name": rec["name"], "relative_error": err, "recorded": rec["relative_error"], "ok": ok}
                )
    bad = [c for c in layer_checks if not c["ok"]]
    if bad:
        raise SparsefitError(
            f"verify: layer {bad[0]['name']} reloads with error {bad[0]['relative_error']:.4g}, manifest says {bad[0]['recorded']:.4g}"
        )
    result: dict[str, Any] = {"layers": layer_checks, "model": None}
    if use_transformers and ckpt.config_json is not None:
        try:
            import transformers
        except ImportError:
            result["model"] = {"skipped": "transformers is not installed"}
            return result
        result["model"] = _verify_hf(transformers, Path(source), folder, seed)
    return result


def _verify_hf(transformers: Any, source: Path, folder: Path, seed: int) -> dict[str, Any]:
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder))  # never trust_remote_code
    except (ValueError, OSError, KeyError) as e:
        return {"skipped": f"transformers cannot build this model ({str(e).splitlines()[0][:120]})"}
    original = transformers.AutoModel.from_pretrained(str(source)).eval()
    compressed = transformers.AutoModel.from_config(cfg).eval()
    rep = load_compressed(compressed, folder)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(cfg, "vocab_size", 1000))
    ids = torch.randint(min(vocab - 1, 1000), vocab, (2, 16), generator=gen)
    ref = original(input_ids=ids).last_hidden_state.double()
    got = compressed(input_ids=ids).last_hidden_state.double()
    if not torch.isfinite(got).all():
        raise SparsefitError("verify: the compressed model produced NaN or Inf")
    rel = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
    cos = float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean())
    return {
        "architecture": type(compressed).__name__,
        "replaced": len(rep.replaced),
        "missing": rep.missing,
        "hidden_relative_error": rel,
        "hidden_cosine": cos,
    }
