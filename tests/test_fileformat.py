import errno
import json
import os
import stat
import threading

import numpy as np
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
        with atomic_output(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_replaces_existing_and_keeps_its_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_output(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_new_output_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save(tmp_path / "g.safetensors", _op(k=8, m=8, depth=2))
        fileformat.save_text(tmp_path / "r.json", "{}\n")
        os.umask(0o027)
        fileformat.save_text(tmp_path / "s.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "g.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o640


def test_output_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fileformat.save_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "g.safetensors"
    save(target, _op(k=8, m=8, depth=2))
    before = target.read_bytes()

    def half_then_full(f, tensors, metadata=None):
        f.write(b"x" * 100)
        _disk_full()

    monkeypatch.setattr(fileformat, "write_safetensors", half_then_full)
    with pytest.raises(SparsefitError, match=r"No space left on device.*left as it was") as e:
        save(target, _op(k=8, m=8, depth=3))
    assert "\n" not in str(e.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]


def test_disk_full_on_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np.lib.format, "write_array", _disk_full)
    with pytest.raises(SparsefitError, match="No space left on device.*nothing was written"):
        with atomic_output(tmp_path / "a.npy") as f:
            np.save(f, np.zeros(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_character_devices_are_written_into_not_replaced(tmp_path):
    null = tmp_path / "null"
    full = tmp_path / "full"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    save(null, _op(k=8, m=8, depth=2))
    assert stat.S_ISCHR(null.stat().st_mode)
    with pytest.raises(SparsefitError, match="No space left on device.*incomplete"):
        save(full, _op(k=8, m=8, depth=2))
    assert stat.S_ISCHR(full.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "null"]


def test_fifo_is_streamed(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    fileformat.save_text(fifo, "hello\n")
    reader.join(10)
    assert got == [b"hello\n"] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_written_safetensors_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "d": torch.tensor(True),
        "e": torch.zeros(0, 4),
        "f": torch.randn(4, 4, generator=g).t(),  # not contiguous
    }
    fileformat.save_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    first = (tmp_path / "t.safetensors").read_bytes()
    fileformat.save_safetensors(tmp_path / "t.safetensors", dict(reversed(tensors.items())), {"k": "v"})
    assert (tmp_path / "t.safetensors").read_bytes() == first


def test_output_path_checks(tmp_path, monkeypatch):
    with pytest.raises(SparsefitError, match="is a directory"):
        fileformat.check_output_path(tmp_path)
    with pytest.raises(SparsefitError, match="does not exist"):
        fileformat.check_output_path(tmp_path / "nope" / "x.safetensors")
    monkeypatch.setattr(fileformat.os, "access", lambda *a, **k: False)
    with pytest.raises(SparsefitError, match="permission denied"):
        fileformat.check_output_path(tmp_path / "x.safetensors")
