"""Flush-to-zero for the numba kernels: subnormal numbers are computed as zero inside them.

Why: near convergence a G~ fit drives many block entries towards zero, and the products of
several small entries across layers fall below float32's smallest normal number (1.2e-38).
Arithmetic on such subnormal values takes a microcode assist on x86 CPUs, about 100 times the
cost of a normal operation: with 30 % of the block entries subnormal a depth-24 step at width
2048 took 468 ms instead of 56 (``benchmarks/bench_cpu_step.py --subnormal 0.3``), and a full-size
permutation fit was unfinished after 45 minutes; with the flush it took 293 s
(``benchmarks/NOTES.md``, 2026-12-02). Values that small carry no information a fit or a
layer can use, so the kernels set the CPU's flush-to-zero and denormals-are-zero modes (MXCSR
bits FTZ and DAZ) while they run, as oneDNN and most BLAS kernels do, and put the caller's mode
back before returning. Python code and PyTorch operators outside the kernels are unaffected.

:func:`ftz_enter` and :func:`ftz_exit` are called from compiled code at the start and the end of
every kernel body (once per thread and row or chunk of work): the mode is a per-thread register, so each
worker thread sets and restores its own. On CPUs other than x86-64 they do nothing (the kernels
then run with the platform's default, which is correct, only slower on subnormal data).
"""

from __future__ import annotations

import platform

import numba
import numpy as np

#: MXCSR bits: FTZ (flush results to zero, bit 15) and DAZ (read subnormal inputs as zero, bit 6).
FTZ_DAZ = np.uint32(0x8040)

X86_64 = platform.machine().lower() in ("x86_64", "amd64")

if X86_64:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _mxcsr_op(builder, name, slot):
        # llvm.x86.sse.stmxcsr / ldmxcsr: store the register to / load it from a 32-bit slot
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [slot.type]), name)
        builder.call(fn, [slot])

    @intrinsic
    def _read_mxcsr(typingctx):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            _mxcsr_op(builder, "llvm.x86.sse.stmxcsr", slot)
            return builder.load(slot)

        return types.uint32(), codegen

    @intrinsic
    def _write_mxcsr(typingctx, value):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            _mxcsr_op(builder, "llvm.x86.sse.ldmxcsr", slot)
            return context.get_dummy_value()

        return types.void(types.uint32), codegen

    @numba.njit(inline="always", cache=True, nogil=True)
    def ftz_enter():  # pragma: no cover - compiled
        """Sets FTZ and DAZ on this thread; returns the previous mode for :func:`ftz_exit`."""
        old = _read_mxcsr()
        _write_mxcsr(old | FTZ_DAZ)
        return old

    @numba.njit(inline="always", cache=True, nogil=True)
    def ftz_exit(old):  # pragma: no cover - compiled
        """Restores the mode :func:`ftz_enter` returned."""
        _write_mxcsr(old)

else:  # pragma: no cover - other CPUs

    @numba.njit(inline="always", cache=True, nogil=True)
    def ftz_enter():
        return np.uint32(0)

    @numba.njit(inline="always", cache=True, nogil=True)
    def ftz_exit(old):
        pass
