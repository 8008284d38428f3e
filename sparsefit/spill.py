"""A bounded store of tensors by key: in memory first, then in one temporary file, then nowhere.

Distillation reuses the teacher's activations on every calibration batch once per epoch; kept,
they spare a teacher pass per step, but on a few thousand sentences they outgrow any sensible
memory budget. :class:`SpillStore` keeps entries in memory up to ``memory_bytes``, writes the next
ones to an anonymous temporary file up to ``disk_bytes`` (capped by the free space of its folder,
less a margin), and refuses the rest (the caller recomputes them); a write that fails (a full disk)
refuses that entry and every later one. Entries read back are the same
bytes that were stored. The file is unlinked from the start (``tempfile.TemporaryFile``), so it
vanishes when the store is closed or the process ends, however it ends.

Example
-------
>>> store = SpillStore(memory_bytes=0, disk_bytes=2**20)
>>> store.put(3, [torch.arange(4.0)])
'disk'
>>> store.get(3)[0].tolist()
[0.0, 1.0, 2.0, 3.0]
>>> store.close()
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import IO

import torch

from .errors import SparsefitError

#: Free space left untouched on the spill folder's file system.
FREE_MARGIN = 1 << 30


@dataclass(frozen=True)
class _Entry:
    """Where one entry's unique tensors lie in the file, and how to rebuild the entry's list."""

    offset: int
    layout: tuple[tuple[torch.dtype, tuple[int, ...], torch.device], ...]
    order: tuple[int, ...]  # for each tensor of the entry, its index among the unique ones


def _unique(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct tensors of ``tensors`` (views of the same memory with the same shape count once)
    and, for each input, the index of its distinct tensor."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], int] = {}
    out: list[torch.Tensor] = []
    order: list[int] = []
    for t in tensors:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen[key] = len(out)
            out.append(t)
        order.append(seen[key])
    return out, order


def _size(unique: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in unique)


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct tensors of ``tensors``."""
    return _size(_unique(tensors)[0])


class SpillStore:
    """Lists of tensors by key, in memory within ``memory_bytes``, then on disk within ``disk_bytes``.

    directory: where the temporary file goes (``None``: the system's temporary folder). The disk
    budget is capped at the folder's free space minus :data:`FREE_MARGIN` when the store is made.
    """

    def __init__(self, memory_bytes: float, disk_bytes: float, directory: str | os.PathLike[str] | None = None):
        self.directory = os.fspath(directory) if directory is not None else tempfile.gettempdir()
        self.memory_budget = max(0, int(memory_bytes))
        if disk_bytes > 0 and not os.path.isdir(self.directory):
            raise SparsefitError(
                f"the spill folder {self.directory} is not a folder; name an existing one or set no disk budget"
            )
        free = shutil.disk_usage(self.directory).free if disk_bytes > 0 else 0
        self.disk_budget = max(0, min(int(disk_bytes), free - FREE_MARGIN))
        self.memory_used = 0
        self.disk_used = 0
        self._memory: dict[Hashable, list[torch.Tensor]] = {}
        self._disk: dict[Hashable, _Entry] = {}
        self._file: IO[bytes] | None = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    @property
    def on_disk(self) -> int:
        return len(self._disk)

    def put(self, key: Hashable, tensors: Sequence[torch.Tensor]) -> str:
        """Keep ``tensors`` under ``key`` (a new key); returns where: ``"memory"``, ``"disk"`` or ``"none"``."""
        if key in self:
            raise KeyError(f"{key!r} is stored already")
        unique, order = _unique(tensors)
        size = _size(unique)
        if self.memory_used + size <= self.memory_budget:
            self._memory[key] = list(tensors)
            self.memory_used += size
            return "memory"
        if self.disk_used + size > self.disk_budget:
            return "none"
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self.directory)
            f = self._file
            f.seek(self.disk_used)
            for t in unique:
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
        except OSError:  # the disk filled up or went away: keep what is stored, store no more
            self.disk_budget = self.disk_used
            return "none"
        self._disk[key] = _Entry(
            self.disk_used, tuple((t.dtype, tuple(t.shape), t.device) for t in unique), tuple(order)
        )
        self.disk_used += size
        return "disk"

    def get(self, key: Hashable) -> list[torch.Tensor] | None:
        """The tensors stored under ``key`` (new tensors when they come from disk), or None."""
        if key in self._memory:
            return list(self._memory[key])
        e = self._disk.get(key)
        if e is None:
            return None
        assert self._file is not None
        self._file.seek(e.offset)
        unique: list[torch.Tensor] = []
        for dtype, shape, device in e.layout:
            t = torch.empty(shape, dtype=dtype)
            raw = t.reshape(-1).view(torch.uint8).numpy()
            if self._file.readinto(raw.data) != raw.nbytes:
                raise OSError(f"the spill file in {self.directory} came back short (was it truncated?)")
            unique.append(t.to(device))
        return [unique[i] for i in e.order]

    def clear(self) -> None:
        """Drop every entry and the file."""
        self._memory.clear()
        self._disk.clear()
        self.memory_used = self.disk_used = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    close = clear

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
