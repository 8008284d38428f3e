"""Distillation after compression (sparsefit.distill) on a tiny random BERT built offline."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from sparsefit import SparsefitError, SparseLinear
from sparsefit.distill import (
    AUTO_ATTENTION_WEIGHT,
    BF16_WIDTH_MULTIPLE,
    DistillConfig,
    _Attention,
    _e2e_loss,
    _Float32Attention,
    _gather,
    _Map,
    _run_teacher,
    _student_precision,
    bfloat16_linear_weights,
    distill,
    find_attention,
    find_blocks,
    lr_factor,
    make_batches,
    pool,
    runs_in_bfloat16,
    split_samples,
)
from sparsefit.operator import GTilde

transformers = pytest.importorskip("transformers")

VOCAB = 120


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is 10x faster than two when the machine is busy (no spinning)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class LowRank(nn.Module):
    """``y = B (A x) + bias``: the test's stand-in for a low-rank structure."""

    def __init__(self, lin: nn.Linear, rank: int) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        self.a = nn.Parameter((s[:rank, None].sqrt() * vh[:rank]).float())
        self.b = nn.Parameter((u[:, :rank] * s[:rank].sqrt()).float())
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.t()) @ self.b.t() + self.bias


def tiny_bert(attn: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=40,
        attn_implementation=attn,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def compressed(teacher: nn.Module, sparse: bool = False) -> nn.Module:
    student = copy.deepcopy(teacher)
    for i in range(2):
        att = student.encoder.layer[i].attention.self
        att.query = LowRank(att.query, 4)
        ffn = student.encoder.layer[i].intermediate
        ffn.dense = LowRank(ffn.dense, 6)
    if sparse:
        out = student.encoder.layer[1].output
        lin = out.dense
        op = GTilde(lin.in_features, lin.out_features, depth=4, seed=0)
        out.dense = SparseLinear(op, lin.bias, backend="torch")
    return student


def calibration(n: int = 40, seed: int = 1) -> dict[str, torch.Tensor]:
    """Samples with distinct first tokens (sample i starts with token i + 2) and ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    width = 12
    ids = torch.randint(60, VOCAB, (n, width), generator=g)
    ids[:, 0] = torch.arange(n) + 2
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


# float32 everywhere but in the bfloat16 tests: "auto" would pick bfloat16 on some CPUs only
CFG = DistillConfig(
    steps=30,
    layer_steps=20,
    batch=8,
    lr=0.02,
    eval_every=10,
    checkpoint_every=10,
    val_fraction=0.2,
    teacher_dtype="float32",
    student_dtype="float32",
)


def state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


@torch.no_grad()
def hidden_loss(teacher: nn.Module, student: nn.Module, data: dict[str, torch.Tensor]) -> float:
    t = teacher(**data).last_hidden_state
    s = student(**data).last_hidden_state
    m = data["attention_mask"].unsqueeze(-1).float()
    return float(((s - t).square() * m).sum() / (t.square() * m).sum())


def test_distillation_reduces_hidden_state_loss_and_keeps_teacher():
    teacher = tiny_bert()
    student = compressed(teacher, sparse=True)
    data = calibration()
    teacher_bytes = state_bytes(teacher)
    before = hidden_loss(teacher, student, data)
    blocks_before = student.encoder.layer[1].output.dense.operator.blocks.detach().clone()
    frozen_before = student.embeddings.word_embeddings.weight.detach().clone()
    steps = []
    report = distill(
        teacher, student, data, CFG, callbacks=[type("CB", (), {"on_step": lambda s, x: steps.append(x)})()]
    )
    after = hidden_loss(teacher, student, data)
    assert after < 0.5 * before, (before, after)
    assert report.metric_after > report.metric_before
    # teacher inputs: one layer-wise stage trains both blocks together
    assert report.steps_done == report.steps_total == 20 + 30 == len(steps)
    assert [(s.stage, s.block) for s in steps] == [("layer", None)] * 20 + [("e2e", None)] * 30
    assert report.trained_modules == 5 and not report.interrupted
    # the G~ layer's blocks trained, the embeddings stayed frozen, the teacher is untouched
    assert not torch.equal(student.encoder.layer[1].output.dense.operator.blocks, blocks_before)
    assert torch.equal(student.embeddings.word_embeddings.weight, frozen_before)
    assert state_bytes(teacher) == teacher_bytes
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_same_seed_same_bytes_cache_or_not(tmp_path):
    teacher = tiny_bert()
    data = calibration()
    a, b, c, s = compressed(teacher), compressed(teacher), compressed(teacher), compressed(teacher)
    ra = distill(teacher, a, data, CFG)
    distill(teacher, b, data, CFG)
    rc = distill(teacher, c, data, dataclasses.replace(CFG, cache_mb=0, spill_mb=0))
    # every batch in the temporary file (nothing in memory): the targets come back as the same bytes
    rs = distill(teacher, s, data, dataclasses.replace(CFG, cache_mb=0), spill_dir=tmp_path)
    assert (ra.cached_batches, ra.spilled_batches) == (ra.batches, 0)
    assert (rc.cached_batches, rc.spilled_batches) == (0, 0)
    assert (rs.cached_batches, rs.spilled_batches) == (0, rs.batches)
    assert list(tmp_path.iterdir()) == []  # the spill file never shows and is gone
    assert state_bytes(a) == state_bytes(b) == state_bytes(c) == state_bytes(s)
    d = compressed(teacher)
    distill(teacher, d, data, dataclasses.replace(CFG, seed=5))
    assert state_bytes(d) != state_bytes(a)


class StopAt:
    def __init__(self, done: int) -> None:
        self.done = done

    def on_step(self, s) -> None:
        if s.done == self.done:
            raise KeyboardInterrupt


def test_resume_equals_uninterrupted(tmp_path):
    teacher = tiny_bert()
    data = calibration()
    ref = compressed(teacher)
    full = distill(teacher, ref, data, CFG, state_path=tmp_path / "a.pt")
    assert (tmp_path / "a.pt").is_file() and not full.resumed
    # stopped inside the end-to-end stage (after its step 17; last checkpoint at its step 10) ...
    student = compressed(teacher)
    cut = distill(teacher, student, data, CFG, state_path=tmp_path / "b.pt", callbacks=[StopAt(37)])
    assert cut.interrupted and cut.steps_done == 37
    # ... and resumed from the checkpoint (where the targets are kept does not matter to the
    # result, so a changed cache budget still resumes): the same bytes as the uninterrupted run
    again = distill(teacher, student, data, dataclasses.replace(CFG, cache_mb=0), state_path=tmp_path / "b.pt")
    assert again.resumed and not again.interrupted
    assert state_bytes(student) == state_bytes(ref)
    assert again.history == full.history and again.metric_after == full.metric_after
    # a finished state file resumes to the same result at once; other settings start afresh
    fresh = compressed(teacher)
    done = distill(teacher, fresh, data, CFG, state_path=tmp_path / "a.pt", callbacks=[StopAt(1)])
    assert done.resumed and not done.interrupted and state_bytes(fresh) == state_bytes(ref)
    other = distill(teacher, compressed(teacher), data, dataclasses.replace(CFG, seed=3), state_path=tmp_path / "a.pt")
    assert not other.resumed
    assert not list(tmp_path.glob("*.part"))


@torch.no_grad()
def validation_metric(teacher, student, data, cfg) -> float:
    n = data["attention_mask"].shape[0]
    _, val = split_samples(n, cfg)
    rows = torch.tensor(val)
    b = {k: v[rows] for k, v in data.items()}
    t = pool(teacher(**b).last_hidden_state, b["attention_mask"])
    s = pool(student(**b).last_hidden_state, b["attention_mask"])
    return float(nn.functional.cosine_similarity(s, t, dim=-1).double().mean())


def test_ctrl_c_keeps_the_best_state():
    teacher = tiny_bert()
    data = calibration()
    student = compressed(teacher)
    report = distill(teacher, student, data, CFG, callbacks=[StopAt(35)])
    assert report.interrupted and report.steps_done == 35
    metrics = [report.metric_before] + [h["metric"] for h in report.history]
    assert len(report.history) == 2  # after the layer-wise stage and e2e step 10
    assert report.metric_after == max(metrics) > report.metric_before
    assert validation_metric(teacher, student, data, CFG) == pytest.approx(report.metric_after, abs=1e-5)


def test_training_sees_only_the_training_split():
    teacher = tiny_bert()
    data = calibration()
    student = compressed(teacher)
    n = data["attention_mask"].shape[0]
    train, val = split_samples(n, CFG)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(n)) and len(val) == 8
    batches = make_batches(train, data["attention_mask"].sum(1), CFG.batch)
    assert sorted(i for b in batches for i in b) == train
    trained_on, scored_on = set(), set()

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        (trained_on if torch.is_grad_enabled() else scored_on).update((ids[:, 0] - 2).tolist())

    student.embeddings.register_forward_pre_hook(record, with_kwargs=True)
    distill(teacher, student, data, CFG)
    assert trained_on == set(train)  # every training sample, and nothing else, is trained on
    assert scored_on == set(val)  # the student is only scored (no gradients) on the validation split


def test_augment_replaces_inner_tokens_only_and_is_seeded():
    from sparsefit.distill import _augment, _inner_tokens

    data = calibration(n=200)
    pool_ids = _inner_tokens(data)
    mask = data["attention_mask"].bool()
    assert pool_ids.numel() == int(mask.sum()) - 2 * mask.shape[0]  # first and last real token left out
    a = _augment(data, pool_ids, 0.3, (0, 1, 7))
    b = _augment(data, pool_ids, 0.3, (0, 1, 7))
    c = _augment(data, pool_ids, 0.3, (0, 1, 8))
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    changed = a["input_ids"] != data["input_ids"]
    last = mask.sum(1) - 1
    assert not changed[:, 0].any() and not changed[torch.arange(200), last].any() and not changed[~mask].any()
    inner = mask.clone()
    inner[:, 0] = False
    inner[torch.arange(200), last] = False
    frac = float(changed.sum()) / float(inner.sum())
    assert 0.15 < frac < 0.35, frac  # about 0.3, less the draws that pick the same token
    assert set(a["input_ids"][changed].tolist()) <= set(pool_ids.tolist())
    assert torch.equal(a["attention_mask"], data["attention_mask"])


def test_augmented_distillation_resumes_to_the_same_bytes(tmp_path):
    cfg = dataclasses.replace(CFG, augment=0.25)
    teacher = tiny_bert()
    data = calibration()
    ref, plain = compressed(teacher), compressed(teacher)
    full = distill(teacher, ref, data, cfg)
    distill(teacher, plain, data, CFG)
    assert state_bytes(ref) != state_bytes(plain)  # the augmentation changed what was trained on
    student = compressed(teacher)
    cut = distill(teacher, student, data, cfg, state_path=tmp_path / "s.pt", callbacks=[StopAt(43)])
    assert cut.interrupted
    again = distill(teacher, student, data, cfg, state_path=tmp_path / "s.pt")
    assert again.resumed and state_bytes(student) == state_bytes(ref) and again.history == full.history


@pytest.mark.parametrize("layer_inputs", ["teacher", "student"])
def test_layer_stage_feeds_teacher_or_student_inputs(layer_inputs):
    teacher = tiny_bert()
    data = calibration()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # block 0 differs from the teacher's but does not train
        student.encoder.layer[0].output.dense.weight.mul_(0.5)
    att = student.encoder.layer[1].attention.self
    att.query = LowRank(att.query, 4)
    cfg = dataclasses.replace(
        CFG,
        steps=0,
        layer_steps=3,
        batch=64,
        train_biases=False,
        train_norms=False,
        train_dense=False,
        layer_inputs=layer_inputs,
    )
    fed = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # a training call (validation runs without gradients)
            fed.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    student.encoder.layer[1].register_forward_pre_hook(record, with_kwargs=True)
    report = distill(teacher, student, data, cfg)
    assert report.steps_done == 3 and len(fed) == 3
    train, _ = split_samples(data["attention_mask"].shape[0], cfg)
    (batch,) = make_batches(train, data["attention_mask"].sum(1), cfg.batch)
    sub = {k: v[batch] for k, v in data.items()}

    def block1_input(model):
        got = []
        h = model.encoder.layer[1].register_forward_pre_hook(
            lambda m, a, k: got.append((a[0] if a else k["hidden_states"]).detach()), with_kwargs=True
        )
        with torch.no_grad():
            model(**sub)
        h.remove()
        return got[0]

    want = block1_input(student if layer_inputs == "student" else teacher)
    other = block1_input(teacher if layer_inputs == "student" else student)
    assert not torch.allclose(want, other, atol=1e-3)  # the two modes really differ here
    for x in fed:
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-6)


def test_joint_layer_stage_trains_each_block_as_alone():
    """With the teacher's inputs one stage trains every block at once, and each block ends exactly
    where it would have alone (its loss does not depend on the other blocks); fed the student's
    own outputs the blocks get a stage each, in order."""
    teacher = tiny_bert()
    data = calibration()
    cfg = dataclasses.replace(CFG, steps=0, layer_steps=6, train_biases=False, train_norms=False, train_dense=False)
    both = compressed(teacher)
    only1 = compressed(teacher)
    only1.encoder.layer[0] = copy.deepcopy(teacher.encoder.layer[0])  # block 0: nothing to train
    stages = []
    cb = type("CB", (), {"on_step": lambda s, x: stages.append((x.stage, x.block))})()
    r_both = distill(teacher, both, data, cfg, callbacks=[cb])
    assert stages == [("layer", None)] * 6 and r_both.metric_after > r_both.metric_before
    r_one = distill(teacher, only1, data, cfg)
    assert r_one.metric_after > r_one.metric_before  # so both ended on their trained state
    for name, p in only1.encoder.layer[1].named_parameters():
        assert torch.equal(p, dict(both.encoder.layer[1].named_parameters())[name]), name
    assert not torch.equal(
        both.encoder.layer[0].attention.self.query.a, compressed(teacher).encoder.layer[0].attention.self.query.a
    )
    stages.clear()
    distill(teacher, compressed(teacher), data, dataclasses.replace(cfg, layer_inputs="student"), callbacks=[cb])
    assert stages == [("layer", 0)] * 6 + [("layer", 1)] * 6


def test_attention_maps_are_the_models_own():
    """The maps built from the query/key outputs are the attention probabilities the model uses
    (padding masked), and a model compared with itself has zero attention KL."""
    teacher = tiny_bert()
    data = calibration(n=6)
    _, blocks = find_blocks(teacher)
    attention = find_attention(teacher, blocks)
    assert attention.heads == 2 and attention.names[0] == ("attention.self.query", "attention.self.key")
    t = _run_teacher(teacher, blocks, data, attention)
    with torch.no_grad():
        probs = teacher(**data, output_attentions=True).attentions
    mask = data["attention_mask"]
    keys = mask.bool()[:, None, None, :].expand_as(probs[0])
    for mine, theirs in zip(t.attention, probs, strict=True):
        assert mine.probs.shape == theirs.shape == (6, 2, 12, 12)
        torch.testing.assert_close(mine.probs[keys], theirs[keys], rtol=1e-5, atol=1e-6)
        assert float(mine.probs[~keys].max()) == 0.0  # padded keys get no weight
    student = compressed(teacher)
    other = _run_teacher(student, student.encoder.layer, data, attention)  # a student's maps differ
    assert all(float(reference_kl(s, m, mask)) > 0.0 for s, m in zip(other.attention, t.attention, strict=True))


def reference_kl(s, t, mask):
    """KL(teacher ‖ student) of two blocks' maps, the plain way: from both log-probabilities."""
    ls, lt = s.probs.log(), t.probs.log()
    keys = mask.bool()[:, None, None, :]
    kl = torch.where(keys, t.probs * (lt - ls), torch.zeros((), dtype=ls.dtype)).sum(-1)
    q = mask.to(ls.dtype)[:, None, :]
    return (kl * q).sum() / (q.sum() * ls.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_kl_is_the_plain_kl_divergence(dtype):
    """The loss term (cross-entropy from the scores, minus the teacher's entropy) equals the KL
    divergence computed from both maps' log-probabilities, on ragged padding and odd widths; it is
    0 for identical maps, and its gradient is that of the plain formula."""
    torch.manual_seed(0)
    b, t, heads, dh = 5, 13, 3, 7
    mask = torch.ones(b, t, dtype=torch.long)
    for i, n in enumerate((13, 1, 6, 12, 9)):
        mask[i, n:] = 0
    att = _Attention([], heads, 2.5)
    qt, kt, qs, ks = (torch.randn(b, t, heads * dh, dtype=dtype) for _ in range(4))
    qs.requires_grad_(True)
    target, same = att.target(qt, kt, mask), att.target(qs.detach(), ks, mask)
    fast = att.kl((qs, ks), target, mask)
    (g_fast,) = torch.autograd.grad(fast, qs)
    ls = att.logprobs(qs, ks, mask)
    keys = mask.bool()[:, None, None, :]
    plain = 2.5 * reference_kl(_Map(ls.exp(), torch.zeros(())), target, mask)
    (g_plain,) = torch.autograd.grad(
        2.5
        * (
            torch.where(keys, target.probs * (target.probs.log() - ls), torch.zeros((), dtype=dtype)).sum(-1)
            * mask[:, None, :]
        ).sum()
        / (mask.sum() * heads),
        qs,
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    fast, plain = float(fast.detach()), float(plain.detach())
    assert abs(fast - plain) <= tol * max(1.0, abs(plain))
    torch.testing.assert_close(g_fast, g_plain, rtol=tol * 10, atol=tol)
    assert abs(float(att.kl((qs, ks), same, mask).detach())) <= tol
    assert fast > 0.0


def test_attention_weight_pulls_the_students_maps_to_the_teachers():
    teacher = tiny_bert()
    data = calibration()
    _, blocks = find_blocks(teacher)
    attention = find_attention(teacher, blocks)

    def kl(student):
        t = _run_teacher(teacher, blocks, data, attention)
        s = _run_teacher(student, student.encoder.layer, data, attention)
        return sum(
            float(reference_kl(a, b, data["attention_mask"])) for a, b in zip(s.attention, t.attention, strict=True)
        )

    cfg = dataclasses.replace(CFG, layer_steps=0, steps=40)
    plain, weighted = compressed(teacher), compressed(teacher)
    start = kl(plain)
    assert distill(teacher, plain, data, dataclasses.replace(cfg, attention_weight=0.0)).attention_weight == 0.0
    report = distill(teacher, weighted, data, dataclasses.replace(cfg, attention_weight=5.0))
    assert report.config["attention_weight"] == report.attention_weight == 5.0
    assert kl(weighted) < min(start, kl(plain)), (start, kl(plain), kl(weighted))
    again = compressed(teacher)
    distill(teacher, again, data, dataclasses.replace(cfg, attention_weight=5.0))
    assert state_bytes(again) == state_bytes(weighted)


def test_attention_weight_needs_query_and_key_projections(monkeypatch):
    """An explicit weight on a model without recognisable projections is an error; the default
    (``None``) then leaves the attention term out, and distillation runs without it."""
    teacher = tiny_bert()
    assert find_attention(teacher, teacher.encoder.layer, None).weight == AUTO_ATTENTION_WEIGHT
    assert find_attention(teacher, teacher.encoder.layer, 0.0) is None
    renamed = copy.deepcopy(teacher)
    for layer in renamed.encoder.layer:
        layer.attention.self.query_proj = layer.attention.self.query  # an unknown name only
        del layer.attention.self.query
    with pytest.raises(SparsefitError, match="query/key"):
        find_attention(renamed, renamed.encoder.layer, 1.0)
    assert find_attention(renamed, renamed.encoder.layer, None) is None
    no_heads = nn.Module()
    with pytest.raises(SparsefitError, match="num_attention_heads"):
        find_attention(no_heads, teacher.encoder.layer, 1.0)
    assert find_attention(no_heads, teacher.encoder.layer, None) is None
    # the default on a model whose attention it cannot read: distils, without the term
    student = compressed(teacher)
    monkeypatch.setattr("sparsefit.distill.attention._QK_NAMES", (("q_lin", "k_lin"),))
    report = distill(teacher, student, calibration(), dataclasses.replace(CFG, steps=5, layer_steps=2))
    assert report.attention_weight == 0.0 and report.config["attention_weight"] is None


def test_bfloat16_teacher_targets_are_float32_and_close(monkeypatch):
    teacher = tiny_bert()
    data = calibration()
    _, blocks = find_blocks(teacher)
    attention = find_attention(teacher, blocks)
    exact = _run_teacher(teacher, blocks, data, attention)
    low = _run_teacher(teacher, blocks, data, attention, bfloat16=True)
    torch.testing.assert_close(low.hidden[0], exact.hidden[0])  # the embeddings: no matrix product yet
    pairs = [*zip(exact.hidden[1:], low.hidden[1:], strict=True), (exact.final, low.final), (exact.pooled, low.pooled)]
    for a, b in pairs:
        assert b.dtype == torch.float32 and not torch.equal(a, b)  # really computed in bfloat16
        assert float((a - b).norm() / a.norm()) < 0.03
    for a, b in zip(exact.attention, low.attention, strict=True):
        assert b.probs.dtype == torch.float32 and float(reference_kl(b, a, data["attention_mask"])) < 1e-3
    # the teacher's linear weights cast once: the same bytes as autocast's cast on every call
    weights = bfloat16_linear_weights(teacher)
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())
    assert {n.rsplit(".", 1)[0] for n in weights} == {
        n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)
    }
    cast = _run_teacher(teacher, blocks, data, attention, bfloat16=True, weights=weights)
    for a, b in zip([*low.hidden, low.final, low.pooled], [*cast.hidden, cast.final, cast.pooled], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(low.attention, cast.attention, strict=True):
        assert torch.equal(a.probs, b.probs)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # the teacher keeps its own
    # distillation with bfloat16 targets still trains, and says which precision it used
    student = compressed(teacher, sparse=True)
    before = hidden_loss(teacher, student, data)
    report = distill(teacher, student, data, dataclasses.replace(CFG, teacher_dtype="bfloat16"))
    assert report.teacher_dtype == "bfloat16" and hidden_loss(teacher, student, data) < 0.5 * before
    # auto: bfloat16 only where the CPU multiplies it natively
    cpu = torch.device("cpu")
    auto = DistillConfig(teacher_dtype="auto")
    monkeypatch.setattr("sparsefit.distill.precision._cpu_flags", lambda: {"avx2", "avx512f"})
    assert not runs_in_bfloat16(auto.teacher_dtype, cpu) and runs_in_bfloat16("bfloat16", cpu)
    monkeypatch.setattr("sparsefit.distill.precision._cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert runs_in_bfloat16(auto.teacher_dtype, cpu) and not runs_in_bfloat16("float32", cpu)


@pytest.mark.parametrize("train_dense", [True, False])
def test_train_dense_trains_the_kept_dense_linears(train_dense):
    teacher = tiny_bert()
    student = compressed(teacher)  # query and intermediate replaced; key, value, output kept dense
    kept = student.encoder.layer[0].attention.self.key.weight
    before = kept.detach().clone()
    distill(teacher, student, calibration(), dataclasses.replace(CFG, train_dense=train_dense))
    assert torch.equal(kept, before) is not train_dense
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": -1},
        {"steps": "many"},
        {"steps": 2.5},
        {"layer_steps": -3},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"batch": 0},
        {"max_length": 1},
        {"seed": -1},
        {"cache_mb": -5},
        {"val_fraction": 0.0},
        {"val_fraction": 0.7},
        {"eval_every": 0},
        {"pooled_weight": -1.0},
        {"pooled_weight": -0.5},
        {"cache_mb": -0.5},
        {"spill_mb": -1},
        {"spill_mb": float("nan")},
        {"augment": 1.0},
        {"augment": -0.1},
        {"layer_inputs": "both"},
        {"attention_weight": -0.5},
        {"teacher_dtype": "float16"},
        {"student_dtype": "half"},
        {"decay": "step"},
        {"attention_weight": float("inf")},
    ],
    ids=lambda d: next(iter(d)),
)
def test_bad_config_values(bad):
    with pytest.raises(SparsefitError):
        DistillConfig(**bad)


def test_config_round_trip_and_auto():
    cfg = DistillConfig(steps="auto", lr=0.003)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    r = cfg.resolved()
    assert isinstance(r.steps, int) and r.steps > 0 and r.layer_steps > 0
    assert DistillConfig(steps="40").resolved().layer_steps == 10
    with pytest.raises(SparsefitError, match="unknown"):
        DistillConfig.from_dict({"stepz": 3})
    with pytest.raises(SparsefitError, match="version"):
        DistillConfig.from_dict({**cfg.to_dict(), "version": 99})
    # a version-1 config (before student_dtype) meant a float32 student
    # (and, like version 2, a cosine decay)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("student_dtype", "decay")}
    assert DistillConfig.from_dict(old | {"version": 1}) == dataclasses.replace(
        cfg, student_dtype="float32", decay="cosine"
    )
    assert DistillConfig.from_dict(old | {"version": 2, "student_dtype": "auto"}) == dataclasses.replace(
        cfg, decay="cosine"
    )
    assert cfg.decay == "linear"


def test_lr_factor_warms_up_then_decays_to_zero():
    for decay in ("linear", "cosine"):
        f = [lr_factor(i, 100, 10, decay) for i in range(100)]
        assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
        assert f[10] == 1.0 and all(a > b for a, b in zip(f[10:], f[11:], strict=False)) and 0 < f[-1] < 0.03
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(30, 100, 10, "cosine") > lr_factor(30, 100, 10, "linear")  # cosine stays high longer


def test_bad_inputs():
    teacher = tiny_bert()
    data = calibration()
    with pytest.raises(SparsefitError, match="no replaced layers"):
        distill(teacher, copy.deepcopy(teacher), data, CFG)
    with pytest.raises(SparsefitError, match="same module"):
        distill(teacher, teacher, data, CFG)
    with pytest.raises(SparsefitError, match="attention_mask"):
        distill(teacher, compressed(teacher), {"input_ids": data["input_ids"]}, CFG)
    with pytest.raises(SparsefitError, match="no module"):
        distill(teacher, compressed(teacher), data, dataclasses.replace(CFG, blocks="encoder.nope"))
    one = {k: v[:1] for k, v in data.items()}
    with pytest.raises(SparsefitError, match="at least 2"):
        distill(teacher, compressed(teacher), one, CFG)


# ---- integration: compress_(distill=) and sparsefit compress --distill --------------------------
@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from tests.hf_tiny import tiny_bert as tiny_bert_folder

    return tiny_bert_folder(tmp_path_factory.mktemp("bert") / "model")


def test_compress_in_memory_with_distill(bert_folder):
    from sparsefit.compress import CompressConfig, builtin_sentences, compress_, tokenizer_batches
    from sparsefit.compress.hf import load_model
    from sparsefit.config import FitConfig

    cfg = CompressConfig(keep=0.25, fit=FitConfig(steps=20, batch=16, seed=0))
    models = []
    for d in (None, DistillConfig(steps=20, layer_steps=10, batch=16, lr=0.03)):
        model, tok, _ = load_model(bert_folder)
        report = compress_(model, cfg, calibration=tokenizer_batches(tok, builtin_sentences()[:200]), distill=d)
        models.append((model, report))
    (plain, r0), (distilled, r1) = models
    assert r0.distill is None and "distill" not in r0.to_dict()
    assert r1.distill["steps_done"] == 10 + 20 and r1.distill["train_samples"] + r1.distill["val_samples"] == 200
    assert r1.distill["metric_after"] >= r1.distill["metric_before"]
    assert r1.to_dict()["distill"] == r1.distill
    assert len(r1.distill["history"]) == 2  # after the layer-wise stage (all blocks) and the end-to-end one
    # the tiny random model starts near cosine 1: the best state may be the start, and then nothing changed
    unchanged = r1.distill["metric_after"] == r1.distill["metric_before"]
    assert (state_bytes(plain) == state_bytes(distilled)) == unchanged
    with pytest.raises(SparsefitError, match="calibration"):
        compress_(load_model(bert_folder)[0], cfg, distill="auto")


def test_cli_compress_distill_writes_the_distilled_model(bert_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from sparsefit.cli import app
    from sparsefit.compress import builtin_sentences, load_compressed
    from sparsefit.compress.hf import empty_model, load_model

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(builtin_sentences()[:120]) + "\n")
    runner = CliRunner()
    base = ["compress", str(bert_folder), "--keep", "0.25", "--calibration", str(text), "--steps", "20"]
    base += ["--batch", "16", "--quiet"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "b"), "--json", str(tmp_path / "b.json"), "--distill", "40"])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "b.json").read_text())["distill"]
    assert d["steps_total"] == 40 + 10 and d["config"]["steps"] == 40 and d["metric_after"] > d["metric_before"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["distill"]["metric_after"] == d["metric_after"]
    assert (tmp_path / "b" / "distill-state.pt").is_file()
    assert d["cached_batches"] == d["batches"] and d["spilled_batches"] == 0  # a small text stays in memory
    # without --quiet the end of the distillation says where the teacher's targets were kept, and
    # the output folder holds no temporary file
    plain = [a for a in base if a != "--quiet"]
    out_c = tmp_path / "c"
    r = runner.invoke(app, [*plain, "-o", str(out_c), "--distill", "4"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "the teacher's targets were kept for 4 of 4 batches (4 in memory)" in r.output, r.output
    assert not [p.name for p in out_c.iterdir() if p.name.startswith("tmp")]
    # the folder reloads as the distilled model: closer to the original than the undistilled one
    teacher, tok, _ = load_model(bert_folder)
    data = dict(tok(builtin_sentences("heldout")[:40], padding=True, return_tensors="pt"))
    losses = []
    for name in "ab":
        model = empty_model(tmp_path / name)
        load_compressed(model, tmp_path / name)
        losses.append(hidden_loss(teacher.eval(), model.eval(), data))
    assert losses[1] < losses[0], losses
    # the selected layers kept dense trained too (train_dense) and their layer files hold the trained weights
    from safetensors.torch import load_file

    kept = [rec for rec in manifest["layers"] if rec["status"] == "dense"]
    assert kept, "the test wants a selected layer that the allocator kept dense"
    for rec in kept:
        before = load_file(str(tmp_path / "a" / rec["file"]))[rec["name"]]
        after = load_file(str(tmp_path / "b" / rec["file"]))[rec["name"]]
        assert not torch.equal(before, after), rec["name"]
        model = empty_model(tmp_path / "b")
        load_compressed(model, tmp_path / "b")
        assert torch.equal(model.state_dict()[rec["name"]], after)
    r = runner.invoke(app, ["compress", str(bert_folder), "-o", str(tmp_path / "d"), "--keep", "0.5", "--distill", "5"])
    assert r.exit_code == 2 and "calibration" in r.output
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "e"), "--distill", "lots"])
    assert r.exit_code == 2 and "auto" in r.output


def test_float32_attention_inside_bfloat16_autocast():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True
    sdpa = nn.functional.scaled_dot_product_attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = sdpa(q, k, v, attn_mask=mask)
        with _Float32Attention():
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            kept = sdpa(qb, kb, vb, attn_mask=mask)
            other = torch.mm(q[0, 0], k[0, 0].t())  # every other function: untouched, still autocast
    assert plain.dtype == torch.bfloat16 and other.dtype == torch.bfloat16
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, sdpa(qb.float(), kb.float(), vb.float(), attn_mask=mask), rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bfloat16_student_products_match_float32(attn, monkeypatch):
    teacher = tiny_bert(attn)
    student = compressed(teacher, sparse=True)
    data = calibration(17)
    _, t_blocks = find_blocks(teacher)
    attention = find_attention(teacher, t_blocks)
    t = _run_teacher(teacher, t_blocks, data, attention)
    cfg = CFG.resolved()
    params = [p for p in student.parameters()]
    calls: list[torch.dtype] = []
    if attn == "sdpa":  # the attention itself must run in float32
        sdpa = nn.functional.scaled_dot_product_attention

        def spy(q, *a, **kw):
            calls.append(q.dtype)
            return sdpa(q, *a, **kw)

        monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", spy)

    def loss_and_grads(low: bool):
        for p in params:
            p.grad = None
        loss = _e2e_loss(student, student.encoder.layer, data, t, cfg, attention, bfloat16=low)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    exact, g_exact = loss_and_grads(False)
    low, g_low = loss_and_grads(True)
    assert low.dtype == torch.float32 and g_low.dtype == torch.float32
    assert not torch.equal(low, exact)  # really computed with bfloat16 products
    assert abs(float(low / exact) - 1) < 0.02
    assert float(nn.functional.cosine_similarity(g_low, g_exact, dim=0)) > 0.99
    if attn == "sdpa":
        assert calls and all(d == torch.float32 for d in calls)
    with _student_precision(False, torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_bfloat16_student_distils_with_padded_widths_and_same_bytes(monkeypatch):
    teacher = tiny_bert("sdpa")
    data = calibration()
    cfg = dataclasses.replace(CFG, student_dtype="bfloat16")
    widths: list[int] = []
    real = _gather

    def spy(samples, idx, multiple=1):
        out = real(samples, idx, multiple)
        widths.append((multiple, out["input_ids"].shape[1], int(samples["attention_mask"][idx].sum(1).max())))
        return out

    monkeypatch.setattr("sparsefit.distill.loop._gather", spy)
    runs = []
    for _ in range(2):
        student = compressed(teacher, sparse=True)
        before = hidden_loss(teacher, student, data)
        report = distill(teacher, student, data, cfg)
        runs.append(state_bytes(student))
    assert report.student_dtype == "bfloat16" and report.teacher_dtype == "float32"
    assert hidden_loss(teacher, student, data) < 0.5 * before
    assert runs[0] == runs[1]
    full = data["input_ids"].shape[1]
    trained = [(w, n) for m, w, n in widths if m == BF16_WIDTH_MULTIPLE]
    assert trained and all(w == min(-(-n // BF16_WIDTH_MULTIPLE) * BF16_WIDTH_MULTIPLE, full) for w, n in trained)
    assert any(w > n for w, n in trained)  # some batch really was padded
    # auto: bfloat16 only where the CPU multiplies it natively, like the teacher
    cpu = torch.device("cpu")
    auto = DistillConfig()
    monkeypatch.setattr("sparsefit.distill.precision._cpu_flags", lambda: {"avx2", "avx512f"})
    assert not runs_in_bfloat16(auto.student_dtype, cpu) and runs_in_bfloat16("bfloat16", cpu)
    monkeypatch.setattr("sparsefit.distill.precision._cpu_flags", lambda: {"amx_bf16"})
    assert runs_in_bfloat16(auto.student_dtype, cpu) and not runs_in_bfloat16("float32", cpu)
