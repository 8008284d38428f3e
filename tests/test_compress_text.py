"""Calibration from text, the in-memory verb, evaluation, Conv1D and half-precision layers, old folders."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import sparsefit
from sparsefit.cli import app
from sparsefit.compress import (
    CompressConfig,
    LayerStats,
    Replacement,
    builtin_sentences,
    collect_stats,
    compress_,
    compress_checkpoint,
    fit_layer,
    load_compressed,
    read_text_samples,
    tokenizer_batches,
)
from sparsefit.compress.evaluate import encoder_metrics
from sparsefit.compress.structures import lowrank_svd, lowrank_whitened

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).parent / "data"
FIT = sparsefit.FitConfig(steps=30, batch=16)
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-sentence forward passes are far faster on one thread (and the machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.hf_tiny import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.hf_tiny import tiny_gpt2

    return tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture
def small_text(tmp_path):
    """40 calibration and 30 held-out sentences (the builtin corpus has 2,000 + 300)."""
    sents = builtin_sentences("calibration")
    (tmp_path / "calib.txt").write_text("\n".join(sents[:40]) + "\n")
    (tmp_path / "held.txt").write_text("\n".join(builtin_sentences("heldout")[:30]) + "\n")
    return tmp_path / "calib.txt", tmp_path / "held.txt"


# ---- corpus and text files ---------------------------------------------------------------------
def test_builtin_corpus_split_is_fixed_and_disjoint():
    calib, held = builtin_sentences("calibration"), builtin_sentences("heldout")
    assert len(calib) == 2000 and len(held) == 300
    assert not set(calib) & set(held) and len(set(calib)) == 2000
    assert all(s[0].isupper() and s[-1] in ".!?" for s in calib + held)
    extra = builtin_sentences("distill")  # distillation's extra text: other packages' docstrings
    assert len(extra) == len(set(extra)) == 10000 and not set(extra) & (set(calib) | set(held))
    assert all(s[0].isupper() and s[-1] in ".!?" for s in extra)
    from sparsefit.compress.calibrate import distillation_samples

    assert distillation_samples("builtin") == calib + extra  # the held-out part is never trained on
    data = Path(sparsefit.__file__).parent / "data"
    assert sum(f.stat().st_size for f in data.iterdir()) < 1_200_000  # the wheel stays small
    with pytest.raises(sparsefit.SparsefitError, match="must be one of calibration, heldout, distill"):
        builtin_sentences("test")


def test_text_files_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n second \n")
    (tmp_path / "b.jsonl").write_text('"plain string"\n{"text": "from an object", "id": 3}\n')
    assert read_text_samples(tmp_path / "a.txt") == ["first line", " second "]
    assert read_text_samples(tmp_path) == ["first line", " second ", "plain string", "from an object"]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(
        sparsefit.SparsefitError, match=r'bad.jsonl:1: expected a JSON string or an object with a "text"'
    ):
        read_text_samples(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(sparsefit.SparsefitError, match="calibration text is empty"):
        read_text_samples(tmp_path / "empty.txt")
    with pytest.raises(sparsefit.SparsefitError, match="no such calibration file or folder"):
        read_text_samples(tmp_path / "nope.txt")


# ---- statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[1], [17, 301, 5], [64] * 9])
def test_layer_stats_stream_exactly(chunks):
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 7, generator=gen, dtype=torch.float64) for n in chunks]
    s = LayerStats(7, max_rows=50, seed=3)
    for p in parts:
        s.update(p.to(torch.float32))
    x = torch.cat(parts).to(torch.float32).double()
    assert s.count == x.shape[0]
    assert torch.allclose(s.gram, x.t() @ x, rtol=1e-12, atol=1e-10)
    assert torch.allclose(s.mean, x.mean(0), atol=1e-12)
    assert s.rows.shape == (min(50, x.shape[0]), 7)
    rows = {tuple(r.tolist()) for r in x.float()}
    assert all(tuple(r.tolist()) in rows for r in s.rows)  # a sample of real rows, no duplicates made up
    assert len({tuple(r.tolist()) for r in s.rows}) == s.rows.shape[0]


def test_reservoir_is_roughly_uniform():
    s = LayerStats(1, max_rows=200, seed=1)
    for i in range(20):
        s.update(torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None])
    first_half = int((s.rows < 1000).sum())
    assert 70 < first_half < 130  # binomial(200, 0.5): mean 100, sd 7


@pytest.mark.parametrize("fixture", ["bert", "gpt2"])
def test_stats_of_a_model_see_no_padding(fixture, request):
    from sparsefit.compress.hf import load_model, resolve_module

    model, tok, task = load_model(request.getfixturevalue(fixture))
    assert task == ("encoder" if fixture == "bert" else "causal")
    sents = builtin_sentences()[:13]
    name = "encoder.layer.1.attention.self.query.weight" if fixture == "bert" else "transformer.h.1.attn.c_attn.weight"
    module = model.get_submodule(resolve_module(model, name))
    batched = collect_stats(model, tokenizer_batches(tok, sents, batch_size=5), {"m": module})["m"]
    single = collect_stats(model, tokenizer_batches(tok, sents, batch_size=1), {"m": module})["m"]
    tokens = sum(len(tok(s)["input_ids"]) for s in sents)
    assert batched.count == single.count == tokens
    assert torch.allclose(batched.gram, single.gram, rtol=1e-5, atol=1e-6)
    assert torch.allclose(batched.mean, single.mean, rtol=1e-5, atol=1e-6)
    recorded = sparsefit.record_activations(
        model, tokenizer_batches(tok, sents, batch_size=1), names=[resolve_module(model, name)]
    )
    x = next(iter(recorded.values())).double()
    assert torch.allclose(single.gram, x.t() @ x, rtol=1e-5, atol=1e-5)


# ---- closed forms --------------------------------------------------------------------------------
def test_whitened_svd_beats_plain_svd_on_the_data():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(9, 13, generator=gen, dtype=torch.float64)
    x = torch.randn(301, 13, generator=gen, dtype=torch.float64) * torch.linspace(0.05, 3, 13, dtype=torch.float64)
    s = LayerStats.from_rows(x)
    for r in (1, 4, 8):
        plain = torch.mm(*lowrank_svd(w, r))
        white = torch.mm(*lowrank_whitened(w, s.gram, r))
        assert torch.linalg.matrix_rank(white) == r
        assert s.data_relative_error(white, w) < s.data_relative_error(plain, w)
        # with an identity Gram matrix both are the Frobenius-optimal truncation
        iso = torch.mm(*lowrank_whitened(w, torch.eye(13, dtype=torch.float64), r))
        assert torch.allclose(iso, plain, atol=1e-8)


def test_encoder_metrics_of_identical_and_shuffled_embeddings():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    same = encoder_metrics(ref, 3 * ref)
    assert same == pytest.approx({"cosine_mean": 1, "cosine_min": 1, "spearman": 1, "neighbors_at10": 1})
    noisy = encoder_metrics(ref, ref + 0.5 * torch.randn(40, 8, generator=gen, dtype=torch.float64))
    assert (
        0 < noisy["spearman"] < 1 and 0 < noisy["neighbors_at10"] < 1 and noisy["cosine_min"] < noisy["cosine_mean"] < 1
    )


# ---- the in-memory verb, dtypes, Conv1D --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_in_memory_keeps_dtype(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 18), nn.ReLU(), nn.Linear(18, 12), nn.Linear(12, 5)).to(dtype)
    batches = [torch.randn(7, 12).to(dtype) for _ in range(3)]
    cfg = CompressConfig(keep=0.6, fit=FIT, structures=("lowrank", "gtilde"), candidate_steps=20)
    report = compress_(model, cfg, filter_fn=lambda m, name: name != "3", calibration=batches)
    assert [r.name for r in report.layers] == ["0.weight", "2.weight"]
    assert isinstance(model[3], nn.Linear)
    assert any(isinstance(model[i], sparsefit.SparseLinear) for i in (0, 2))
    for p in model.parameters():
        assert p.dtype == dtype
    assert model(batches[0]).dtype == dtype
    for r in report.layers:  # budget mode with calibration: the structure choice (see test_compress_method)
        assert r.structure in ("lowrank", "gtilde") and r.params_after < r.params_before
        assert r.data_relative_error is not None and r.data_relative_error > 0
    assert 0 < report.kept_fraction <= 0.6


def test_fit_layer_is_the_one_per_layer_path():
    torch.manual_seed(0)
    w = torch.randn(10, 14)
    stats = LayerStats.from_rows(torch.randn(64, 14))
    cfg = CompressConfig(keep=0.5, fit=FIT, structures=("gtilde",))
    rep, rec = fit_layer(w, stats, 10 * 14 // 2, cfg, name="w")
    assert isinstance(rep, Replacement) and rep.structure == "gtilde" == rec.structure
    assert rep.num_parameters == rec.params_after <= 70
    assert rec.data_relative_error == pytest.approx(stats.data_relative_error(rep.to_dense(), w))
    rep, rec = fit_layer(w, None, 10, CompressConfig(keep=0.5, fit=FIT), name="w")  # under one layer of G~
    assert rep is None and rec.status == "dense" == rec.structure


def test_sparse_linear_with_lowrank_part_matches_dense():
    gen = torch.Generator().manual_seed(0)
    op = sparsefit.GTilde(7, 5, depth=3, seed=1, dtype=torch.float64)
    u, v = torch.randn(5, 2, generator=gen, dtype=torch.float64), torch.randn(2, 7, generator=gen, dtype=torch.float64)
    rep = Replacement(op, u, v)
    assert rep.structure == "gtilde+lowrank" and rep.num_parameters == op.num_parameters + 2 * 12
    layer = rep.to_module(torch.ones(5))
    x = torch.randn(17, 7, generator=gen, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ rep.to_dense().t() + 1, atol=1e-12)
    only = Replacement(None, u, v).to_module(None, dtype=torch.float32)
    assert only.lowrank_u.dtype == torch.float32 and torch.allclose(
        only(x.float()), (x @ (u @ v).t()).float(), atol=1e-5
    )


def test_gpt2_conv1d_layers_compress_and_load(gpt2, tmp_path, small_text):
    import transformers

    calib, held = small_text
    cfg = CompressConfig(keep=0.6, fit=FIT, calibration=str(calib))
    report = compress_checkpoint(gpt2, tmp_path / "o", cfg)
    names = {r.name: r for r in report.layers}
    attn = names["transformer.h.0.attn.c_attn.weight"]
    assert attn.transposed and tuple(attn.shape) == (72, 24) and attn.status == "compressed"
    model = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2)).eval()
    expected = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2)).eval()
    load_compressed(model, tmp_path / "o", strict=True)
    assert isinstance(model.transformer.h[0].attn.c_attn, sparsefit.SparseLinear)
    from sparsefit.compress.format import load_layer

    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    with torch.no_grad():
        for rec in man["layers"]:
            rep, _ = load_layer(tmp_path / "o", rec)
            mod = expected.get_submodule(rec["name"].removesuffix(".weight"))
            if rep is not None:
                mod.weight.copy_(rep.to_dense(torch.float32).t())  # Conv1D stores (in, out)
        ids = torch.randint(2, 100, (2, 9))
        assert torch.allclose(model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-4)
    r = runner.invoke(app, ["eval", str(gpt2), str(tmp_path / "o"), "--heldout", str(held), "--json", "-"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["task"] == "causal" and set(ev["methods"]) == {
        "sparsefit",
        "svd",
        "svd_whitened",
        "svd_uniform",
        "svd_whitened_uniform",
    }
    assert all(m["perplexity"] > 1 for m in ev["methods"].values())


# ---- the checkpoint workflow with text calibration and --eval ---------------------------------
def test_compress_keep_builtin_eval_json(bert, tmp_path):
    out, js = tmp_path / "o", tmp_path / "r.json"
    args = ["compress", str(bert), "-o", str(out), "--keep", "0.5", "--calibration", "builtin", "--eval"]
    r = runner.invoke(app, [*args, "--json", str(js), "--steps", "30", "--batch", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert 0 < d["kept_fraction"] <= 0.5
    assert len(d["layers"]) == 12 and all(layer["structure"] in ("lowrank", "dense") for layer in d["layers"])
    assert all(layer["data_relative_error"] is not None for layer in d["layers"])
    methods = d["eval"]["methods"]
    assert {"sparsefit", "svd", "svd_whitened", "svd_uniform", "svd_whitened_uniform"} <= set(methods)
    for m in methods.values():
        assert {"cosine_mean", "cosine_min", "spearman", "neighbors_at10", "kept_fraction"} <= set(m)
        assert -1 <= m["cosine_min"] <= m["cosine_mean"] <= 1 and 0 <= m["neighbors_at10"] <= 1
    assert methods["svd"]["kept_fraction"] <= d["kept_fraction"]  # same per-layer budgets, rounded down to a rank
    # one uniform ratio at the same total budget, rounded down to a rank per layer
    assert d["kept_fraction"] - 0.1 < methods["svd_whitened_uniform"]["kept_fraction"] <= d["kept_fraction"]
    assert d["eval"]["sentences"] == 300
    stats = load_file(str(out / "calibration.safetensors"))
    q = stats["encoder.layer.0.attention.self.query.weight.gram"]
    assert q.shape == (24, 24) and q.dtype == torch.float64
    # a rerun reuses the statistics and every layer
    before = (out / "calibration.safetensors").stat().st_mtime_ns
    r = runner.invoke(app, [*args[:-1], "--json", str(js), "--steps", "30", "--batch", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "calibration.safetensors").stat().st_mtime_ns == before
    assert len(json.loads(js.read_text())["resumed_layers"]) == 12


def test_eval_command_plot_and_table(bert, tmp_path, small_text):
    pytest.importorskip("matplotlib")
    calib, held = small_text
    out = tmp_path / "o"
    cfg = CompressConfig(keep=0.5, fit=FIT, calibration=str(calib), include=(r".*\.query\.weight",))
    compress_checkpoint(bert, out, cfg)
    r = runner.invoke(app, ["eval", str(bert), str(out), "--heldout", str(held), "--plot", str(tmp_path / "q.png")])
    assert r.exit_code == 0, r.output
    assert "svd_whitened" in r.stderr and "spearman" in r.stderr
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(app, ["eval", str(bert), str(out), "--plot", str(tmp_path / "q.svg")])
    assert r.exit_code == 2 and "--plot writes a PNG" in r.stderr


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--calibration", "nope.txt"], "no such calibration file or folder"),
        (["--plot", "x.png"], "add --eval"),
    ],
)
def test_compress_text_calibration_bad_input(bert, tmp_path, extra, msg):
    r = runner.invoke(app, ["compress", str(bert), "-o", str(tmp_path / "o"), "--keep", "0.5", *extra, "--quiet"])
    assert r.exit_code == 2 and msg in r.stderr, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_text_calibration_needs_a_model_folder(tmp_path):
    save = {"a.weight": torch.randn(8, 8)}
    from safetensors.torch import save_file

    save_file(save, str(tmp_path / "m.safetensors"))
    r = runner.invoke(
        app,
        [
            "compress",
            str(tmp_path / "m.safetensors"),
            "-o",
            str(tmp_path / "o"),
            "--keep",
            "0.5",
            "--calibration",
            "builtin",
        ],
    )
    assert r.exit_code == 2 and "need a model folder with config.json" in r.stderr


# ---- folders written by earlier versions ---------------------------------------------------------
def test_format_version_1_folder_still_loads():
    folder = DATA / "compressed_v1"
    assert json.loads((folder / "manifest.json").read_text())["format_version"] == 1
    src = load_file(str(DATA / "compressed_v1_source.safetensors"))
    enc = nn.Module()
    enc.fc1, enc.fc2, enc.big = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(3, 3, bias=False)
    model = nn.Module()
    model.enc = enc
    rep = load_compressed(model, folder, strict=True)
    assert sorted(rep.replaced) == ["enc.fc1", "enc.fc2"]
    assert torch.equal(model.enc.big.weight, src["enc.big.weight"]) and torch.equal(
        model.enc.fc1.bias, src["enc.fc1.bias"]
    )
    man = json.loads((folder / "manifest.json").read_text())
    for rec in man["layers"]:
        if rec["status"] == "compressed":
            mod = model.get_submodule(rec["name"].removesuffix(".weight"))
            err = torch.linalg.norm(mod.to_dense().double() - src[rec["name"]].double()) / torch.linalg.norm(
                src[rec["name"]].double()
            )
            assert abs(float(err) - rec["relative_error"]) < 1e-4
