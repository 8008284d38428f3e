"""Distillation of a compressed folder (``sparsefit compress --distill``).

After :func:`~sparsefit.compress.compress_checkpoint` has written a folder, :func:`distill_folder`
loads the original model (teacher) and the compressed one (student), distils the student on the
folder's calibration text with :func:`sparsefit.distill.distill`, and writes the trained tensors
back: the replaced layers' files (G~ blocks, low-rank factors) and the dense files (biases,
LayerNorms). Each file is rewritten atomically; the distillation state file
``distill-state.pt`` in the folder makes an interrupted run resumable (rerun the same command), and
the manifest gains a ``distill`` record (settings, validation metric before and after).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..distill import DistillConfig, DistillReport, distill, tokenize
from ..errors import SparsefitError

STATE_FILE = "distill-state.pt"


def distill_folder(
    source: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    config: DistillConfig,
    callbacks: Sequence[Any] = (),
) -> DistillReport:
    """Distil the compressed folder ``folder`` of model folder ``source`` in place (see the module doc)."""
    from safetensors import safe_open

    from ..fileformat import save_safetensors, save_text
    from .calibrate import distillation_samples, is_activation_file
    from .format import read_layer_header, read_manifest, write_layer
    from .hf import empty_model, load_model
    from .load import _resolver, load_compressed
    from .replacement import Replacement

    out = Path(folder)
    man = read_manifest(out)
    spec = (man.get("config") or {}).get("calibration")
    if spec is None or is_activation_file(spec):
        raise SparsefitError("--distill trains on calibration text: add --calibration builtin (or a text file/folder)")
    teacher, tok, _ = load_model(source)
    student = empty_model(out)
    load_compressed(student, out)
    tokens = tokenize(tok, distillation_samples(spec), config)
    report = distill(teacher, student, tokens, config, state_path=out / STATE_FILE, spill_dir=out, callbacks=callbacks)

    # write back: replaced layers and the selected layers kept dense into their layer files, every
    # other trained tensor into the dense files
    state = student.state_dict()
    module_of = _resolver(student, {n for n, _ in student.named_modules()})
    written: set[str] = set()
    resolve_state = _resolver(student, set(state))
    for rec in man["layers"]:
        path = out / rec["file"] if rec.get("file") else None
        header = read_layer_header(path) if path is not None else None
        if header is None:
            raise SparsefitError(f"{out}: the layer file of {rec['name']} is missing; rerun the compression")
        if rec["status"] != "compressed":  # a selected layer kept dense: its weight trains too (train_dense)
            key = resolve_state(rec["name"])
            assert key is not None  # load_compressed loaded it
            with safe_open(str(path), framework="pt") as f:
                stored = f.get_tensor(rec["name"])
            if not torch.equal(state[key].to(stored.dtype), stored):
                trained = state[key].detach().to(stored.dtype)
                write_layer(
                    path,
                    rec["name"].removesuffix(".weight"),
                    header["record"],
                    None,
                    trained,
                    rec["name"],
                    header["key"],
                )
            written.add(key)
            continue
        module_name = rec["name"].removesuffix(".weight")
        mname = module_of(module_name)
        assert mname is not None  # load_compressed swapped it
        mod = student.get_submodule(mname)
        rep = Replacement(
            getattr(mod, "operator", None),
            None if mod.lowrank_u is None else mod.lowrank_u.detach(),
            None if mod.lowrank_v is None else mod.lowrank_v.detach(),
        )
        write_layer(path, module_name, header["record"], rep, torch.empty(0), rec["name"], header["key"])
        written.update(f"{mname}.{n}" for n in ("operator.blocks", "lowrank_u", "lowrank_v"))
    for fname in man.get("dense_files", []):
        fpath = out / fname
        with safe_open(str(fpath), framework="pt") as f:
            part = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        changed = False
        for name, t in part.items():
            key = resolve_state(name)
            if key is not None and key not in written and not torch.equal(state[key].to(t.dtype), t):
                part[name] = state[key].detach().to(t.dtype).contiguous()
                changed = True
        if changed:
            save_safetensors(fpath, part, metadata=meta)
    man["distill"] = report.to_dict()
    save_text(out / "manifest.json", json.dumps(man, indent=2) + "\n")
    return report
