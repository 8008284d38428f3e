import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsefit import GTilde, SparsefitError, fileformat
from sparsefit.fileformat import atomic_output, load, read_header, save


def _op(**kw):
    return GTilde(kw.pop("k", 12), kw.pop("m", 9), kw.pop("depth", 3), seed=4, **kw)


def test_round_trip_is_exact(tmp_path):
    op = _op(dtype=torch.float64)
    bias = torch.randn(9, dtype=torch.float64)
    path = tmp_path / "g.safetensors"
    save(path, op, bias=bias, config={"a": 1}, metrics={"relative_error": 0.5})
    op2, bias2, header = load(path)
    assert torch.equal(op2.blocks, op.blocks) and torch.equal(op2.perms, op.perms)
    assert torch.equal(bias2, bias)
    assert (op2.in_features, op2.out_features, op2.width, op2.depth) == (12, 9, 24, 3)
    assert header["format"] == "sparsefit.gtilde" and header["format_version"] == 1
    assert header["layer_order"] == "application" and header["permutation_convention"] == "gather"
    assert header["config"] == {"a": 1} and header["metrics"]["relative_error"] == 0.5
    assert read_header(path) == header
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(op2(x), op(x))


def test_stored_tensors_and_metadata(tmp_path):
    path = tmp_path / "g.safetensors"
    save(path, _op())
    t = load_file(str(path))
    assert set(t) == {"blocks", "permutations"}
    assert t["permutations"].dtype == torch.int32 and t["blocks"].shape == (3, 12, 2, 2)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {"sparsefit"}
    assert json.loads(meta["sparsefit"])["format"] == "sparsefit.gtilde"
    assert json.loads(meta["sparsefit"])["depth"] == 3


def test_save_in_other_dtype(tmp_path):
    path = tmp_path / "g.safetensors"
    save(path, _op(), dtype=torch.float16)
    op, _, header = load(path)
    assert op.blocks.dtype == torch.float16 and header["dtype"] == "float16"


def _write_raw(path, tensors, header):
    save_file(tensors, str(path), metadata={"sparsefit": json.dumps(header)})


def _good(tmp_path):
    path = tmp_path / "g.safetensors"
    header = save(path, _op())
    return load_file(str(path)), header


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda t, h: t["permutations"].__setitem__((0, 1), t["permutations"][0, 0]), "not a permutation"),
        (lambda t, h: t["permutations"].__setitem__((1, 0), 99), r"lie in \[0, 24\)"),
        (lambda t, h: h.__setitem__("depth", 4), "blocks have shape|permutation table has shape"),
        (lambda t, h: h.__setitem__("width", 25), "even"),
        (lambda t, h: t.pop("blocks"), "missing"),
        (lambda t, h: h.__setitem__("format_version", 99), "not supported"),
        (lambda t, h: t.__setitem__("blocks", t["blocks"] * float("nan")), "NaN"),
        (lambda t, h: h.__setitem__("in_features", "x"), "integer"),
        (lambda t, h: h.__setitem__("format", "other"), "not a G~ file"),
        (lambda t, h: t.__setitem__("permutations", t["permutations"].float()), "dtype"),
    ],
    ids=[
        "duplicate-index",
        "index-out-of-range",
        "depth-mismatch",
        "odd-width",
        "missing-tensor",
        "future-version",
        "nan-blocks",
        "bad-header-field",
        "other-format",
        "float-permutations",
    ],
)
def test_corrupt_files_are_refused(tmp_path, mutate, msg):
    tensors, header = _good(tmp_path)
    mutate(tensors, header)
    bad = tmp_path / "bad.safetensors"
    _write_raw(bad, tensors, header)
    with pytest.raises(SparsefitError, match=msg):
        load(bad)


def test_not_a_sparsefit_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(SparsefitError, match="not a sparsefit file"):
        load(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "g.safetensors"
    save(path, _op(k=100, m=100, depth=4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparsefitError, match="truncated|not a readable"):
        load(path)


def test_garbage_and_missing(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"hello world, not safetensors")
    with pytest.raises(SparsefitError, match="not a readable"):
        load(path)
    with pytest.raises(SparsefitError, match="no such file"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(SparsefitError, match="directory"):
        load(tmp_path)


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_replaces_existing(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_output_path_checks(tmp_path, monkeypatch):
    with pytest.raises(SparsefitError, match="is a directory"):
        fileformat.check_output_path(tmp_path)
    with pytest.raises(SparsefitError, match="does not exist"):
        fileformat.check_output_path(tmp_path / "nope" / "x.safetensors")
    monkeypatch.setattr(fileformat.os, "access", lambda *a, **k: False)
    with pytest.raises(SparsefitError, match="permission denied"):
        fileformat.check_output_path(tmp_path / "x.safetensors")
