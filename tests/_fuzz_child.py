"""Child process of tests/test_fuzz_readers.py: run readers on (damaged) files under a memory cap.

Reads a JSON list of cases ``[reader, path]`` on stdin, prints one JSON line per case:
``{"i", "outcome": "ok" | "error" | "bug", "message", "traced", "touched"}``. Before the first
case the address space is capped (``RLIMIT_AS``) at the current size plus ``CAP`` bytes, so a
reader that tries to allocate for data the file does not hold fails (MemoryError, or the process
dies: the parent sees the missing lines). ``traced`` is the tracemalloc peak (numpy and Python
allocations), ``touched`` the growth of the peak resident set (``VmHWM``, reset per case), which
also sees torch's and safetensors' native allocations.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
import tracemalloc
import warnings
from pathlib import Path

CAP = 512 << 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    import numpy as np  # noqa: F401  (imported before the cap, as the readers need them)
    import scipy.io  # noqa: F401
    import scipy.sparse  # noqa: F401
    import torch

    from sparsefit import SparsefitError
    from sparsefit.calibration import Calibration
    from sparsefit.checkpoint import open_checkpoint
    from sparsefit.fileformat import load, read_header
    from sparsefit.targets import load_target, read_npy

    torch.set_num_threads(1)

    def checkpoint(p: Path) -> None:
        ck = open_checkpoint(p)
        for i in range(len(ck.shards)):
            with ck.shard(i) as r:
                for e in ck.shard_entries(i):
                    r.get(e.name)

    def calibration(p: Path) -> None:
        c = Calibration(p)
        for k, shape in c.shapes.items():
            c.check(k, shape[1] if len(shape) == 2 else -1)
            c.rows(k)

    def target(p: Path) -> None:
        t = load_target(p, key="w" if p.suffix in (".safetensors", ".pt") or "keyed" in p.name else None)
        t.prepare(torch.device("cpu"), torch.float64)

    def compressed(p: Path) -> None:
        from sparsefit.compress import load_compressed
        from tests.test_compress import Tiny

        load_compressed(Tiny(), p)

    readers = {
        "compressed": compressed,
        "target": target,
        "npy": read_npy,
        "sparsefit": load,
        "sparsefit-header": read_header,
        "checkpoint": checkpoint,
        "calibration": calibration,
    }
    cases = json.loads(sys.stdin.read())
    # one untimed pass over the first case of each reader loads every lazily imported module
    warm = {}
    for reader, path in cases:
        warm.setdefault(reader, path)
    for reader, path in warm.items():
        try:
            readers[reader](Path(path))
        except Exception:  # noqa: BLE001 - judged below, under the cap
            pass
    soft = _status("VmSize") + CAP
    resource.setrlimit(resource.RLIMIT_AS, (soft, resource.getrlimit(resource.RLIMIT_AS)[1]))
    can_reset = _reset_peak_rss()
    for i, (reader, path) in enumerate(cases):
        can_reset = can_reset and _reset_peak_rss()
        rss0 = _status("VmRSS")
        tracemalloc.start()
        outcome, message = "ok", ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                readers[reader](Path(path))
        except SparsefitError as e:
            outcome, message = "error", str(e)
        except BaseException as e:  # noqa: BLE001 - any other exception is what this hunts for
            outcome, message = "bug", "".join(traceback.format_exception(e))[-3000:]
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        touched = _status("VmHWM") - rss0 if can_reset else -1
        print(json.dumps({"i": i, "outcome": outcome, "message": message, "traced": traced, "touched": touched}))
        sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
