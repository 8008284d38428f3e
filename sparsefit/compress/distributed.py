"""``torchrun`` support: start and end the process group, rank/world, failure-aware barriers.

Layers are split round-robin over the ranks; rank 0 writes the untouched tensors and the
manifest. The CLI wraps a run in :func:`torchrun_session`; library users who start their own
process group call :func:`~sparsefit.compress.compress_checkpoint` inside it directly.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import SparsefitError


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Start a gloo process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); True if started.

    Also divides the CPU threads between the ranks.
    """
    import datetime

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    return True


@contextmanager
def torchrun_session() -> Iterator[tuple[int, int]]:
    """Start the process group when launched by ``torchrun`` and end it afterwards; yields ``(rank, world)``.

    Without ``torchrun`` (or with a group already started by the caller) it does nothing.
    """
    started = init_distributed_from_env()
    try:
        yield dist_info()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


#: Seconds a rank may show no sign of life before the others stop; ``SPARSEFIT_RANK_TIMEOUT`` overrides.
RANK_TIMEOUT = 120.0
_BEAT = 0.5  # heartbeat period (s)
_POLL = 0.05  # barrier polling period (s)
_runs = itertools.count()


class RankGroup:
    """The ranks of one compress run, failure-aware (does nothing without ``torch.distributed``).

    Use as a context manager around a rank's work. Each rank's background thread counts
    heartbeats in the process group's key-value store and watches for a failure posted by another
    rank; a rank that raises posts its error line on the way out. When a failure is posted, every
    other rank's work is interrupted (within a second, at the next Python instruction) and it
    raises :class:`PeerFailed`; a rank waiting at :meth:`barrier` also stops when another has shown
    no sign of life for ``SPARSEFIT_RANK_TIMEOUT`` seconds (default 120: killed, crashed, out of
    memory) or the store is gone. So no rank waits forever, and each says why in one line.
    """

    def __init__(self) -> None:
        self.rank, self.world = dist_info()
        self.store: Any = None
        self.timeout = _rank_timeout()
        self._barriers = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peer_failure: str | None = None
        self._lock = threading.Lock()  # held by the heartbeat thread for each store call
        self._quiet = False  # after the last barrier: no more store calls (the store may leave with rank 0)
        if self.world > 1:
            from torch.distributed import distributed_c10d

            self.store = distributed_c10d._get_default_store()
            self.prefix = f"sparsefit/compress/{next(_runs)}/"  # every rank makes the same calls in order

    def __enter__(self) -> RankGroup:
        if self.store is not None:
            self._thread = threading.Thread(target=self._beat, name="sparsefit-heartbeat", daemon=True)
            try:
                self._thread.start()
            except KeyboardInterrupt as e:  # another rank failed already and the new thread said so
                self.__exit__(type(e), e, e.__traceback__)
                raise
        return self

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> None:
        self._stop.set()
        while True:  # stop the heartbeat; the interrupt it may have sent lands here, not later
            try:
                if self._thread is not None:
                    self._thread.join()
                if self._peer_failure is not None:
                    time.sleep(2 * _POLL)
                break
            except KeyboardInterrupt:
                if self._peer_failure is None:
                    raise
        if self.store is None or e is None:
            return
        if isinstance(e, PeerFailed) or (self._peer_failure is not None and isinstance(e, KeyboardInterrupt)):
            with contextlib.suppress(Exception):
                self.store.add(self.prefix + "stopped", 1)
            if not isinstance(e, PeerFailed):
                raise PeerFailed(self._stopping(self._peer_failure or "another rank failed")) from None
            return
        what = "was interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {_one_line(e)}"
        with contextlib.suppress(Exception):  # the store may be gone with rank 0; the others time out then
            self.store.set(self.prefix + "failed", f"rank {self.rank} {what}")
            if self.rank == 0:  # rank 0 holds the store (torchrun or env:// start): stay until the others stopped
                deadline = time.monotonic() + self.timeout
                while self.store.add(self.prefix + "stopped", 0) < self.world - 1 and time.monotonic() < deadline:
                    time.sleep(_POLL)

    def _beat(self) -> None:
        alive, failed = self.prefix + f"alive/{self.rank}", self.prefix + "failed"
        while True:
            with self._lock:
                if self._quiet:
                    return
                try:
                    self.store.add(alive, 1)
                    if self.store.check([failed]):
                        self._peer_failure = self.store.get(failed).decode()
                        _thread.interrupt_main()  # stop this rank's work: __exit__ turns it into PeerFailed
                        return
                except Exception:  # noqa: BLE001 - the store is gone: the next barrier says so
                    return
            if self._stop.wait(_BEAT):
                return

    def _stopping(self, why: str) -> str:
        return f"stopping rank {self.rank} because {why}; finished layers are kept, rerun to resume"

    def check(self) -> None:
        """Raise :class:`PeerFailed` if another rank has failed (between layers: stop early)."""
        if self.store is not None:
            self._guarded(self._raise_if_failed)

    def barrier(self, last: bool = False) -> None:
        """Wait for every rank; raise :class:`PeerFailed` when one failed or went silent.

        ``last``: the run's final barrier, after which this rank makes no more store calls (rank 0
        may leave at once, taking the store with it).
        """
        if self.store is None:
            return
        import torch.distributed as dist

        self._barriers += 1
        keys = [self.prefix + f"barrier{self._barriers}/{r}" for r in range(self.world)]
        self._guarded(lambda: self._wait(keys))
        with self._lock:  # no heartbeat while a rank may be leaving
            self._quiet = last
            try:
                dist.barrier()  # all have arrived, so this returns at once; no rank leaves while another polls
            except RuntimeError as e:  # a rank died right after arriving
                raise PeerFailed(
                    f"stopping rank {self.rank}: another rank stopped at a barrier ({_one_line(e)[:100]}); rerun to resume"
                ) from None

    def _wait(self, keys: list[str]) -> None:
        self.store.set(keys[self.rank], "1")
        heard = {r: (-1, time.monotonic()) for r in range(self.world)}
        while not self.store.check(keys):
            self._raise_if_failed()
            now = time.monotonic()
            for r in range(self.world):
                if r == self.rank or self.store.check([keys[r]]):
                    continue
                beats = self.store.add(self.prefix + f"alive/{r}", 0)
                if beats != heard[r][0]:
                    heard[r] = (beats, now)
                elif now - heard[r][1] > self.timeout:
                    raise PeerFailed(
                        self._stopping(
                            f"rank {r} has shown no sign of life for {self.timeout:g} s (killed or crashed?)"
                        )
                    )
            time.sleep(_POLL)

    def _raise_if_failed(self) -> None:
        if self.store.check([self.prefix + "failed"]):
            why = self.store.get(self.prefix + "failed").decode()
            raise PeerFailed(self._stopping(why))

    def _guarded(self, fn: Any) -> None:
        try:
            fn()
        except SparsefitError:
            raise
        except Exception as e:  # noqa: BLE001 - a store error means rank 0 (which hosts it) is gone
            raise PeerFailed(
                f"stopping rank {self.rank}: lost contact with rank 0 ({_one_line(e)[:100]}); rerun to resume"
            ) from None


class PeerFailed(SparsefitError):
    """Another rank failed or went silent, so this rank stops too."""


def _rank_timeout() -> float:
    raw = os.environ.get("SPARSEFIT_RANK_TIMEOUT", "")
    try:
        value = float(raw) if raw else RANK_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SparsefitError(f"SPARSEFIT_RANK_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
