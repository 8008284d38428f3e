"""How long idle OpenMP workers spin before they sleep: set on ``import sparsefit``.

GNU OpenMP (numba's ``omp`` threading layer and PyTorch's CPU thread pool share one copy of it in
a process) keeps a worker spinning after a parallel region ends, for ``GOMP_SPINCOUNT``
iterations (300,000 by default: 5-15 ms on a current x86 core), so that the next region starts
without a wake-up. In a fit step the numba kernel is followed by a few milliseconds of work on
other threads (the probes, drawn on two threads; the target's product): a spinning worker holds
one of the cores through all of it. On a 2-core Xeon, a spin count of 20,000 (about a
millisecond) drew the probes 1.6 times faster and left the kernel's time unchanged
(``benchmarks/NOTES.md``, 2026-12-05, fifth part).

GNU OpenMP reads the setting once, when it is loaded, and PyTorch loads it: so the setting only
takes effect when ``sparsefit`` is imported before ``torch`` (as the ``sparsefit`` command does).
A value the user has set (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) is kept; to get the same
effect in a program that imports torch first, export ``GOMP_SPINCOUNT=20000`` before starting it.
"""

from __future__ import annotations

import os
import sys

#: Spin iterations of an idle worker before it sleeps (about a millisecond).
SPIN_COUNT = 20_000


def limit_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` when it can still take effect (torch not yet
    imported) and the user set no wait policy; True when it was set."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


limit_spin()
