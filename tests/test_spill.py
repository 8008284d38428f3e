"""SpillStore: memory first, then one temporary file, then nothing; the same bytes back."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from sparsefit.errors import SparsefitError
from sparsefit.spill import FREE_MARGIN, SpillStore, nbytes


def entry(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 7, generator=g)
    return [
        x,
        torch.randn(17, generator=g).to(torch.bfloat16),
        torch.randint(-9, 9, (2, 3), generator=g),
        torch.tensor(1.5, dtype=torch.float64),  # 0-dim
        torch.empty(0, 4),
        x,  # the same tensor twice: stored once, given back twice
        x[1],  # a view of part of it: a tensor of its own
    ]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(raw(x), raw(y)) for x, y in zip(a, b, strict=True)
    )


def test_nbytes_counts_shared_tensors_once():
    # float32 3x5x7, bfloat16 17, int64 2x3, float64 scalar, empty, (x again), float32 5x7
    assert nbytes(entry(0)) == 4 * 105 + 2 * 17 + 8 * 6 + 8 + 0 + 4 * 35


def test_memory_then_disk_then_none(tmp_path):
    size = nbytes(entry(0))
    with SpillStore(memory_bytes=size, disk_bytes=2 * size, directory=tmp_path) as store:
        assert [store.put(k, entry(k)) for k in range(5)] == ["memory", "disk", "disk", "none", "none"]
        assert (store.in_memory, store.on_disk, len(store)) == (1, 2, 3)
        assert (store.memory_used, store.disk_used) == (size, 2 * size)
        for k in range(3):
            got = store.get(k)
            assert got is not None and same(got, entry(k))
        back = store.get(2)
        assert back is not None
        assert back[0] is back[5] and back[0].data_ptr() != back[6].data_ptr()  # aliasing kept
        assert store.get(3) is None and store.get("other") is None
        assert 1 in store and 3 not in store
        assert list(tmp_path.iterdir()) == []  # unlinked from the start
    assert len(store) == 0 and store.get(1) is None


def test_disk_entries_are_copies_memory_entries_are_not(tmp_path):
    e0, e1 = entry(0), entry(1)
    store = SpillStore(memory_bytes=nbytes(e0), disk_bytes=10 * nbytes(e0), directory=tmp_path)
    store.put("a", e0)
    store.put("b", e1)
    a, b = store.get("a"), store.get("b")
    assert a is not None and b is not None
    assert a[0] is e0[0]
    assert b[0].data_ptr() != e1[0].data_ptr()
    b[0].zero_()  # changing what came back does not change what is stored
    again = store.get("b")
    assert again is not None and same(again, entry(1))
    store.close()


def test_a_key_is_stored_once(tmp_path):
    store = SpillStore(0, 1 << 20, tmp_path)
    store.put(1, entry(1))
    with pytest.raises(KeyError):
        store.put(1, entry(2))
    store.close()


def test_clear_frees_both_budgets(tmp_path):
    size = nbytes(entry(0))
    store = SpillStore(size, size, tmp_path)
    assert [store.put(k, entry(k)) for k in range(3)] == ["memory", "disk", "none"]
    store.clear()
    assert (store.memory_used, store.disk_used, len(store)) == (0, 0, 0)
    assert [store.put(k, entry(k)) for k in range(3)] == ["memory", "disk", "none"]
    got = store.get(1)
    assert got is not None and same(got, entry(1))
    store.close()


def test_disk_budget_leaves_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * FREE_MARGIN, 0, FREE_MARGIN + 1000))
    store = SpillStore(0, 1e12, tmp_path)
    assert store.disk_budget == 1000
    assert store.put(0, [torch.zeros(250)]) == "disk"  # 1,000 bytes
    assert store.put(1, [torch.zeros(1)]) == "none"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * FREE_MARGIN, 0, FREE_MARGIN // 2))
    assert SpillStore(0, 1e12, tmp_path).disk_budget == 0
    store.close()


def test_no_disk_budget_makes_no_file(tmp_path):
    store = SpillStore(0, 0, tmp_path)
    assert store.put(0, entry(0)) == "none" and store._file is None


def test_a_failed_write_refuses_that_entry_and_the_rest(tmp_path, monkeypatch):
    import tempfile

    import sparsefit.spill as spill

    real = tempfile.TemporaryFile

    class Full:
        """A file that takes 1,000 bytes and then reports a full disk."""

        def __init__(self, **kw):
            self.f = real(**kw)

        def write(self, data):
            if self.f.tell() + len(data) > 1000:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(spill.tempfile, "TemporaryFile", Full)
    store = SpillStore(0, 1 << 20, tmp_path)
    assert store.put(0, [torch.arange(200, dtype=torch.float32)]) == "disk"  # 800 bytes
    assert store.put(1, [torch.arange(100, dtype=torch.float32)]) == "none"  # would pass 1,000
    assert store.put(2, [torch.zeros(1)]) == "none"  # it stopped spilling
    assert store.disk_used == 800 and store.on_disk == 1
    got = store.get(0)
    assert got is not None and torch.equal(got[0], torch.arange(200, dtype=torch.float32))
    store.close()


def test_a_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(SparsefitError, match="is not a folder"):
        SpillStore(0, 1 << 20, tmp_path / "nowhere")
    assert SpillStore(1 << 20, 0, tmp_path / "nowhere").put(0, [torch.zeros(2)]) == "memory"  # no disk: no check
