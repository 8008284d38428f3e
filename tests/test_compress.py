"""``sparsefit compress``: selection, per-layer fits, output folder, resume, loading, bad input, torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import sparsefit
from sparsefit.checkpoint import TensorEntry, open_checkpoint
from sparsefit.cli import app
from sparsefit.compress import (
    CompressConfig,
    Interrupted,
    compress_checkpoint,
    compress_matrix,
    load_compressed,
    select_layers,
)

runner = CliRunner()
FAST = ["--depth", "4", "--steps", "30", "--batch", "16", "--max-params-ratio", "1", "--quiet"]
FAST_CFG = dict(depth=4, max_params_ratio=1.0, fit=sparsefit.FitConfig(steps=30, batch=16))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Tiny(nn.Module):
    """Embedding, two residual MLP blocks (odd sizes), a head: 4 linears selected by default."""

    def __init__(self, d: int = 10, h: int = 14) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(30, d)
        self.blocks = nn.ModuleList([Block(d, h), Block(d, h)])
        self.head = nn.Linear(d, 5)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


LINEARS = ["blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.1.fc1.weight", "blocks.1.fc2.weight"]


def tiny_state(seed: int = 0) -> tuple[Tiny, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = Tiny()
    return model, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_sharded(d: Path, state: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """A Hugging Face-style folder: config.json, tokenizer.json, shards and their index."""
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 10}))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def sharded(tmp_path):
    model, state = tiny_state()
    return write_sharded(tmp_path / "model", state), model, state


def files_under(p: Path) -> set[str]:
    return {str(q.relative_to(p)) for q in p.rglob("*")}


# ---- selection ---------------------------------------------------------------------------------
def test_default_selection_skips_embeddings_norms_heads_and_non_matrices():
    names = {
        "embeddings.word_embeddings.weight": (100, 8),
        "encoder.layer.0.attention.self.query.weight": (8, 8),
        "encoder.layer.0.attention.self.query.bias": (8,),
        "encoder.layer.0.attention.output.dense.weight": (8, 8),
        "encoder.layer.0.attention.output.LayerNorm.weight": (8,),
        "h.0.ln_1.weight": (8,),
        "h.0.mlp.c_fc.weight": (8, 32),
        "model.norm.weight": (8,),
        "layers.0.post_attention_layernorm.weight": (8,),
        "lm_head.weight": (100, 8),
        "classifier.weight": (2, 8),
        "pooler.dense.weight": (8, 8),
        "conv.weight": (4, 4, 3),
    }
    entries = [TensorEntry(n, s, "float32", 0) for n, s in names.items()]
    picked = [p.name for p in select_layers(entries, CompressConfig())]
    assert picked == [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.output.dense.weight",
        "h.0.mlp.c_fc.weight",
    ]
    picked = [p.name for p in select_layers(entries, CompressConfig(include=(r".*query\.weight", "pooler.*weight")))]
    assert picked == ["encoder.layer.0.attention.self.query.weight", "pooler.dense.weight"]


def test_width_modes_and_cap():
    cfg = CompressConfig(max_params_ratio=0.5)
    assert cfg.layer_width(384, 1536) == 1536 and cfg.max_depth(384, 1536) == 96
    assert CompressConfig(width="double").layer_width(384, 1536) == 3072
    assert CompressConfig(width="double").max_depth(384, 1536) == 48
    assert CompressConfig().layer_width(7, 5) == 8
    assert CompressConfig(min_depth=3).ladder(64, 64) == [3, 6, 12, 16]
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CompressConfig.from_dict(d).to_dict() == d


@pytest.mark.parametrize(
    "change, msg",
    [
        ({"version": 99}, "version 99 is not supported"),
        ({"colour": 1}, "unknown compress config keys: colour"),
        ({"fit": {"steps": 5, "version": 7}}, "fit config version 7"),
        ({"fit": {"steps": 5, "depth": 3}}, "not on its fit config"),
    ],
)
def test_config_dicts_are_strict_and_versioned(change, msg):
    d = {**CompressConfig(depth=2).to_dict(), **change}
    with pytest.raises(sparsefit.SparsefitError, match=msg):
        CompressConfig.from_dict(d)


def test_version_1_config_dict_still_reads():
    old = {"include": [], "exclude": [], "depth": 3, "target_error": None, "max_params_ratio": 0.5, "width": "tight"}
    old.update(min_depth=None, growth=2.0, calibration=None, version=1)
    old["fit"] = {**sparsefit.FitConfig(steps=10).to_dict(), "depth": None, "width": None}
    assert CompressConfig.from_dict(old).depth == 3


# ---- one layer ---------------------------------------------------------------------------------
def test_target_error_climbs_the_ladder_and_rescales():
    torch.manual_seed(0)
    a = 7.0 * torch.randn(12, 12)
    cfg = CompressConfig(
        target_error=0.05, max_params_ratio=1.0, min_depth=2, fit=sparsefit.FitConfig(steps=150, batch=32)
    )
    rec, op = compress_matrix(a, cfg, name="w")
    assert rec.depths_tried == cfg.ladder(12, 12)[: len(rec.depths_tried)] and len(rec.depths_tried) >= 2
    assert rec.errors_tried[-1] < rec.errors_tried[0]
    if op is not None:  # met: the stored operator reproduces the unscaled weight
        err = float(torch.linalg.norm(op.to_dense(torch.float64) - a.double()) / torch.linalg.norm(a.double()))
        assert abs(err - rec.relative_error) < 1e-3
    else:
        assert rec.status == "dense" and "not met" in rec.reason and rec.params_after == rec.params_before


def test_layer_over_cap_stays_dense():
    rec, op = compress_matrix(torch.randn(6, 6), CompressConfig(depth=4, max_params_ratio=0.2))
    assert op is None and rec.status == "dense" and "exceeds the cap" in rec.reason


# ---- whole checkpoints --------------------------------------------------------------------------
def test_compress_sharded_folder_and_load(sharded, tmp_path):
    src, model, state = sharded
    out = tmp_path / "out"
    r = run("compress", src, "-o", out, *FAST, "--json", "-", "--verify")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert sorted(lay["name"] for lay in report["layers"]) == LINEARS
    assert all(lay["status"] == "compressed" and lay["depth"] == 4 for lay in report["layers"])
    assert report["totals"]["selected_params_after"] == sum(2 * 14 * 4 for _ in LINEARS)
    assert len(report["verify"]["layers"]) == 4 and all(c["ok"] for c in report["verify"]["layers"])
    names = files_under(out)
    assert {"manifest.json", "config.json", "tokenizer.json"} <= names
    assert {"dense-00001-of-00002.safetensors", "dense-00002-of-00002.safetensors"} <= names
    assert not [n for n in names if n.endswith(".part")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "sparsefit.compressed" and manifest["complete"] is True

    fresh = Tiny()
    rep = load_compressed(fresh, out, strict=True)
    assert sorted(rep.replaced) == sorted(n.removesuffix(".weight") for n in LINEARS)
    assert isinstance(fresh.blocks[0].fc1, sparsefit.SparseLinear) and fresh.blocks[0].fc2.bias is None
    assert torch.equal(fresh.blocks[0].fc1.bias.detach(), state["blocks.0.fc1.bias"])
    assert torch.equal(fresh.head.weight.detach(), state["head.weight"])
    # the loaded model computes exactly what the original does with each weight replaced by G~
    expect = Tiny()
    expect.load_state_dict(state)
    with torch.no_grad():
        for n in LINEARS:
            mod = n.removesuffix(".weight")
            expect.get_submodule(mod).weight.copy_(fresh.get_submodule(mod).to_dense())
    ids = torch.randint(0, 30, (3, 7))
    with torch.no_grad():
        assert torch.allclose(fresh(ids), expect(ids), atol=1e-5)


def test_same_command_same_layer_bytes(sharded, tmp_path):
    src, _, _ = sharded
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("compress", src, "-o", a, *FAST).exit_code == 0
    assert run("compress", src, "-o", b, *FAST).exit_code == 0
    from safetensors.torch import load_file

    for f in sorted((a / "layers").iterdir()):  # same tensors (the header also holds the fit's seconds)
        ta, tb = load_file(str(f)), load_file(str(b / "layers" / f.name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class CountLayers:
    def __init__(self, stop_after: int | None = None) -> None:
        self.fitted, self.resumed, self.stop_after = [], [], stop_after

    def on_layer_start(self, plan):
        self.current = plan.name

    def on_layer_end(self, plan, rec, resumed):
        (self.resumed if resumed else self.fitted).append(plan.name)

    def on_step(self, s):
        if self.stop_after is not None and len(self.fitted) >= self.stop_after and s.step >= 10:
            raise KeyboardInterrupt


def test_interrupted_run_resumes(sharded, tmp_path):
    src, _, _ = sharded
    out = tmp_path / "out"
    cfg = CompressConfig(**FAST_CFG)
    first = CountLayers(stop_after=2)
    with pytest.raises(Interrupted):
        compress_checkpoint(src, out, cfg, [first])
    assert len(first.fitted) == 2 and not (out / "manifest.json").exists()
    with pytest.raises(sparsefit.SparsefitError, match="unfinished"):
        load_compressed(Tiny(), out)
    second = CountLayers()
    report = compress_checkpoint(src, out, cfg, [second])
    assert sorted(second.resumed) == sorted(first.fitted) and len(second.fitted) == 2
    assert len(report.layers) == 4 and (out / "manifest.json").exists()
    # different settings: every layer is fitted again
    third = CountLayers()
    compress_checkpoint(src, out, CompressConfig(**{**FAST_CFG, "depth": 3}), [third])
    assert len(third.fitted) == 4 and not third.resumed


def test_single_file_inputs(tmp_path):
    _, state = tiny_state()
    torch.save(state, tmp_path / "m.pt")
    save_file(state, str(tmp_path / "m.safetensors"))
    for name in ("m.pt", "m.safetensors"):
        r = run("compress", tmp_path / name, "-o", tmp_path / f"out-{name}", *FAST, "--json", "-", "--verify")
        assert r.exit_code == 0, r.output
        rep = json.loads(r.stdout)
        assert rep["totals"]["compressed_layers"] == 4 and rep["verify"]["model"] is None
        fresh = Tiny()
        assert not load_compressed(fresh, tmp_path / f"out-{name}").missing


def test_dry_run_writes_nothing(sharded, tmp_path):
    src, _, _ = sharded
    before = files_under(tmp_path)
    r = run("compress", src, "--dry-run", "--json", "-")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert sorted(lay["name"] for lay in plan["layers"]) == LINEARS
    fc1 = next(lay for lay in plan["layers"] if lay["name"] == "blocks.0.fc1.weight")
    assert fc1["shape"] == [14, 10] and fc1["width"] == 14
    r = run("compress", src, "--dry-run")
    assert r.exit_code == 0 and "fc1" in r.output and "4 tensors, 560 parameters selected" in r.output
    assert files_under(tmp_path) == before


def test_calibration_fits_over_recorded_inputs(sharded, tmp_path):
    src, model, _ = sharded
    from sparsefit.calibration import ActivationProbes, save_activations

    batches = [torch.randint(0, 30, (4, 6)) for _ in range(3)]
    acts = sparsefit.record_activations(model, batches, max_rows=50)
    assert set(acts) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"}
    assert acts["blocks.0.fc2"].shape == (50, 14)
    save_activations(tmp_path / "calib.safetensors", acts)
    probes = ActivationProbes(acts["blocks.0.fc1"], seed=0)
    x = probes(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 10) and probes.holdout.shape == (5, 10)
    r = run(
        "compress", src, "-o", tmp_path / "out", *FAST, "--calibration", tmp_path / "calib.safetensors", "--json", "-"
    )
    assert r.exit_code == 0, r.output
    layers = json.loads(r.stdout)["layers"]
    assert all(lay["data_relative_error"] is not None for lay in layers)
    # sweeps on the data loss over the same calibration rows: never worse on them, better somewhere
    swept = run(
        "compress", src, "-o", tmp_path / "out2", *FAST, "--sweeps", "3", "--calibration", tmp_path / "calib.safetensors",
        "--json", "-",
    )  # fmt: skip
    assert swept.exit_code == 0, swept.output
    after = {lay["name"]: lay for lay in json.loads(swept.stdout)["layers"]}
    assert after.keys() == {lay["name"] for lay in layers}
    assert any(after[lay["name"]]["relative_error"] != lay["relative_error"] for lay in layers)


# ---- bad input: one line, exit code 2, nothing written ---------------------------------------
def _bad_inputs(tmp_path: Path) -> None:
    _, state = tiny_state()
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty-dir" / "notes.txt").write_text("hello")
    write_sharded(tmp_path / "model", state)
    save_file(state, str(tmp_path / "good.safetensors"))
    full = (tmp_path / "good.safetensors").read_bytes()
    trunc = write_sharded(tmp_path / "trunc", state)
    shard = trunc / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "cut.safetensors").write_bytes(full[: len(full) // 2])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    save_file({"blocks.0.fc1": torch.zeros(4, 10)}, str(tmp_path / "calib.safetensors"))


BAD = [
    (["compress", "empty-dir", "-o", "o"], "not a model folder"),
    (["compress", "missing", "-o", "o"], "no such file"),
    (["compress", "model", "-o", "o", "--include", "nothing.*"], "matches no tensor"),
    (["compress", "model", "-o", "o", "--exclude", "zzz"], "matches no tensor"),
    (["compress", "model", "-o", "o", "--include", r"blocks\.0\..*"], "1-D"),
    (["compress", "model", "-o", "o", "--include", "("], "bad regular expression"),
    (["compress", "evil.pt", "-o", "o"], "refused to load"),
    (["compress", "trunc", "-o", "o"], "truncated"),
    (["compress", "cut.safetensors", "-o", "o"], "truncated"),
    (["compress", "model", "-o", "busy"], "not empty"),
    (["compress", "model", "-o", "good.safetensors"], "is a file"),
    (["compress", "model", "-o", "nodir/o"], "does not exist"),
    (["compress", "model"], "--output"),
    (["compress", "model", "-o", "o", "--depth", "0"], "depth must be at least 1"),
    (["compress", "model", "-o", "o", "--target-error", "0.1", "--depth", "3"], "not several"),
    (["compress", "model", "-o", "o", "--width", "odd"], "width"),
    (["compress", "model", "-o", "o", "--calibration", "calib.safetensors"], "no activations"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[f"{i}-{m.split()[0]}" for i, (_, m) in enumerate(BAD)])
def test_bad_input(tmp_path, monkeypatch, args, msg):
    _bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    extra = [] if "--depth" in args or "--target-error" in args else ["--depth", "2"]
    r = runner.invoke(app, [*args, *extra, "--steps", "5", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert files_under(tmp_path) == before


def test_missing_depth_rule(sharded, tmp_path):
    src, _, _ = sharded
    r = run("compress", src, "-o", tmp_path / "o", "--quiet")
    assert r.exit_code == 2 and "--depth, --target-error or --keep" in r.stderr
    assert not (tmp_path / "o").exists()


def test_load_into_wrong_model(sharded, tmp_path):
    src, _, _ = sharded
    assert run("compress", src, "-o", tmp_path / "o", *FAST).exit_code == 0
    with pytest.raises(sparsefit.SparsefitError, match="has no parameter"):
        load_compressed(nn.Sequential(nn.Linear(10, 14)), tmp_path / "o")


def test_open_checkpoint_lists_without_loading(sharded):
    src, _, state = sharded
    ck = open_checkpoint(src)
    assert ck.kind == "hf-dir" and len(ck.shards) == 2
    assert {e.name for e in ck.entries} == set(state)
    assert [p.name for p in ck.passthrough_files()] == ["config.json", "tokenizer.json"]


# ---- torchrun ------------------------------------------------------------------------------------
def test_torchrun_two_ranks(sharded, tmp_path):
    src, _, _ = sharded
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "sparsefit", "compress", str(src), "-o", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [lay["rank"] for lay in manifest["layers"]] == [0, 1, 0, 1]
    assert not load_compressed(Tiny(), out).missing


# ---- transformers (extra coverage; the core tests above do not need it) ------------------------------
def test_transformers_bert_roundtrip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    r = run("compress", tmp_path / "bert", "-o", tmp_path / "o", *FAST, "--verify", "--json", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["totals"]["compressed_layers"] == 6
    assert rep["verify"]["model"]["replaced"] == 6 and rep["verify"]["model"]["hidden_cosine"] > 0
    fresh = transformers.BertForSequenceClassification(cfg)
    assert len(load_compressed(fresh, tmp_path / "o").replaced) == 6  # BertModel names under the "bert." prefix
