"""``--keep`` with calibration: the global allocation spends the budget and every layer takes the
structure with the smallest data error (tiny random BERT, built offline)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import sparsefit  # noqa: E402
from sparsefit.compress import CompressConfig, builtin_sentences, tokenizer_batches  # noqa: E402
from sparsefit.compress.budget import EffectMeter  # noqa: E402

from .hf_tiny import tiny_bert  # noqa: E402


def test_compress_inplace_keep_allocates_globally_and_chooses_structures(tmp_path):
    src = tiny_bert(tmp_path / "bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    model = transformers.AutoModel.from_pretrained(str(src)).eval()
    enc = tok(builtin_sentences("heldout")[:8], padding=True, return_tensors="pt")
    cfg = CompressConfig(keep=0.5, structures=("lowrank", "gtilde+lowrank", "dense"), candidate_steps=20)
    report = sparsefit.compress_(model, cfg, calibration=tokenizer_batches(tok, builtin_sentences()[:48]))
    t = report.totals()
    before = t["selected_params_before"]
    smallest_step = min(sum(r.shape) for r in report.layers)
    assert before // 2 - smallest_step < t["selected_params_after"] <= before // 2  # the budget, spent
    budgets = {r.params_after for r in report.layers}
    assert len(budgets) > 1  # not one uniform ratio
    for r in report.layers:
        assert r.structure in ("lowrank", "gtilde+lowrank", "dense")
        chosen = min(c["data_error"] for c in r.candidates)
        assert r.data_relative_error == pytest.approx(chosen) and "smallest data error" in r.reason
        assert r.params_after <= r.params_before
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert torch.isfinite(out).all()


def test_effect_meter_restores_the_model(tmp_path):
    src = tiny_bert(tmp_path / "bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    model = transformers.AutoModel.from_pretrained(str(src)).eval()
    batches = [dict(tok(builtin_sentences()[:4], padding=True, return_tensors="pt"))]
    meter = EffectMeter(model, batches)
    name = "encoder.layer.0.intermediate.dense"
    w = model.get_submodule(name).weight.detach().clone()
    assert meter(name, w) == 0.0
    assert meter(name, torch.zeros_like(w)) > 0
    assert torch.equal(model.get_submodule(name).weight, w)


def test_a_budget_below_every_structure_keeps_the_layer_dense():
    from sparsefit.compress.calibrate import LayerStats
    from sparsefit.compress.layer import fit_layer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 14, generator=g)
    stats = LayerStats.from_rows(torch.randn(64, 14, generator=g))
    rep, rec = fit_layer(w, stats, 23, CompressConfig(keep=0.1), name="w")  # rank 1 needs 24
    assert rep is None and rec.status == "dense" == rec.structure and "no structure fits 23" in rec.reason
    rep, rec = fit_layer(w, stats, 24, CompressConfig(keep=0.1), name="w")
    assert rep is not None and rep.rank == 1 and rec.params_after == 24 and rec.structure == "lowrank"
