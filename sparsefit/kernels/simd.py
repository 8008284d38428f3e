"""Explicit-vector building blocks for the chunked CPU kernels (numba intrinsics, LLVM IR).

The chunked kernels (:mod:`sparsefit.kernels.cpu_apply`, :mod:`sparsefit.kernels.cpu`) keep a
chunk of :data:`LANES` probes feature-major, one row of ``LANES`` values per feature, and work a
2×2 block at a time: two rows in, two rows out. The intrinsics here emit that work as LLVM vector
IR on whole rows (``<32 x float>`` or ``<32 x double>``), which the backend splits into the
target's registers (two AVX-512 registers per float32 row, four AVX2 ones, NEON elsewhere), so
nothing here is specific to one instruction set. What they gain over plain numba loops
(``benchmarks/NOTES.md``, 2026-12-05, fourth part):

* **the block gradient's lane sums are reduced together.** The reverse pass needs four sums over
  a chunk's lanes per block (``Σ e_r · u_c``); as plain loops LLVM reduced each on its own, a
  chain of shuffles and adds per sum. Here the products of four neighbouring blocks (sixteen rows)
  go through one shuffle tree (:func:`tree_sums`): each level adds two vectors, halving the lanes
  per sum and doubling the sums per vector. The reverse layer went from 62 to 20 µs per chunk.
* **whole 512-bit registers**: LLVM's loop vectoriser chose 256-bit ones on AVX-512 machines.
* **no alias checks** and no loop over lanes per block.

Their buffers must be cache-line aligned (:func:`aligned_empty`): rows 16 bytes off a line
straddle two lines on every access, which halved the speed of both passes at width 2048.

Contract (checked at compile time where numba's types allow): rows are C-contiguous with exactly
``LANES`` values; ``src``/``gout``/``gin``/``dst`` share one float dtype; ``perm`` is an integer
vector of length ``n``; ``w`` is ``(n/2, 2, 2)`` of that dtype; ``acc`` is ``(n/2, 2, 2)``
float64. Block indices are not bounds-checked: the callers loop over ``range(n // 2)``.

numba's on-disk cache keys a compiled function on its own source file only: after editing this
module, delete the ``__pycache__/*.nbi``/``*.nbc`` files of ``sparsefit/kernels`` (an installed
release has fresh files, so users are not affected), or the kernels keep the old code.

References: ``tests/test_kernels_simd.py`` compares every intrinsic with numpy layer by layer
(every tail of the four-block reduction, float32 and float64); the kernels built on them are
compared with PyTorch autograd through :func:`sparsefit.kernels.reference.gtilde_reference` in
``tests/test_kernels_cpu*.py``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

#: Probes per chunk, and the vector length of every intrinsic here. With these intrinsics 64 lanes
#: were slower than 32 (one thread, width 2048, depth 40: 90 against 57 ms a step's kernel: a
#: chunk's activations leave the L2 cache), and 16 no faster (47 against 45 ms, aligned buffers).
LANES = 32
#: Blocks whose lane sums are reduced together (4 sums each: sixteen rows, one shuffle tree).
QUAD = 4

#: Byte alignment of the buffers that hold lane rows (:func:`aligned_empty`): a cache line. With rows
#: 16 bytes off it, every vector access straddles two lines, and a layer at width 2048 took twice
#: as long (benchmarks/NOTES.md).
ALIGN = 64

_I32 = ir.IntType(32)
_IDX = ir.IntType(64)
# the kernels' fastmath set: reassociation and contraction, no 'nnan'/'ninf' (NaN must propagate)
_FLAGS = ("contract", "reassoc", "nsz", "arcp")


def aligned_empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on an :data:`ALIGN`-byte boundary (numpy only
    promises 16), so that every row of ``LANES`` values starts on a cache line."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _mask(indices):
    return ir.Constant(ir.VectorType(_I32, len(indices)), list(indices))


def _row_ptr(context, builder, aryty, ary, row):
    """``&ary[row, 0]`` as a pointer to a ``<LANES x T>`` vector."""
    arr = context.make_array(aryty)(context, builder, ary)
    ptr = cgutils.get_item_pointer(context, builder, aryty, arr, [row, ir.Constant(_IDX, 0)], wraparound=False)
    return builder.bitcast(ptr, ir.VectorType(ptr.type.pointee, LANES).as_pointer())


def _item_ptr(context, builder, aryty, ary, indices):
    arr = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, indices, wraparound=False)


def _splat(builder, value):
    vt = ir.VectorType(value.type, LANES)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined), _mask([0] * LANES))


def _cycle(indices):
    """``indices`` repeated to ``LANES`` entries (shuffle masks must be full length)."""
    return (indices * (LANES // len(indices) + 1))[:LANES]


def tree_sums(builder, vectors):
    """Sums of ``R`` vectors of ``LANES`` values (``R`` a power of two ≤ ``LANES``), as one
    ``<R x T>`` vector, element ``r`` the sum of ``vectors[r]``.

    Pairing: two vectors whose lanes are in ``G`` groups of ``S`` (each group a partial sum of
    one row) become one vector of ``2G`` groups of ``S/2``: the first halves of every group of
    both, plus the second halves. When one vector is left, its groups are folded in place down
    to one lane each, and a last shuffle puts the sums in row order."""
    group = LANES
    rows = [[r] for r in range(len(vectors))]  # the row of each group, per vector
    while len(vectors) > 1:
        half = group // 2
        paired, paired_rows = [], []
        for a, b, ra, rb in zip(vectors[::2], vectors[1::2], rows[::2], rows[1::2], strict=True):
            first, second, order = [], [], []
            for g in range(LANES // group):
                base = g * group
                first += [base + e for e in range(half)] + [LANES + base + e for e in range(half)]
                second += [base + half + e for e in range(half)] + [LANES + base + half + e for e in range(half)]
                order += [ra[g], rb[g]]
            lo = builder.shuffle_vector(a, b, _mask(first))
            hi = builder.shuffle_vector(a, b, _mask(second))
            paired.append(builder.fadd(lo, hi, flags=_FLAGS))
            paired_rows.append(order)
        vectors, rows, group = paired, paired_rows, half
    (v,), (order,) = vectors, rows
    groups = len(order)
    while group > 1:
        half = group // 2
        first = _cycle([g * group + e for g in range(groups) for e in range(half)])
        second = _cycle([g * group + half + e for g in range(groups) for e in range(half)])
        v = builder.fadd(
            builder.shuffle_vector(v, v, _mask(first)), builder.shuffle_vector(v, v, _mask(second)), flags=_FLAGS
        )
        group = half
    return builder.shuffle_vector(v, v, _mask([order.index(r) for r in range(groups)]))


def _check_rows(*rows):
    for a in rows:
        if not (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"):
            raise TypingError(f"lane rows must be 2-D C-contiguous arrays, got {a}")
        if a.dtype != rows[0].dtype or a.dtype not in (types.float32, types.float64):
            raise TypingError(f"lane rows must share one float dtype, got {a.dtype} and {rows[0].dtype}")


def _check_perm(perm):
    if not (isinstance(perm, types.Array) and perm.ndim == 1 and isinstance(perm.dtype, types.Integer)):
        raise TypingError(f"perm must be a 1-D integer array, got {perm}")


def _check_blocks(w, dtype):
    if not (isinstance(w, types.Array) and w.ndim == 3 and w.dtype == dtype):
        raise TypingError(f"blocks must be a 3-D array of {dtype}, got {w}")


def _check_acc(acc):
    if not (isinstance(acc, types.Array) and acc.ndim == 3 and acc.layout == "C" and acc.dtype == types.float64):
        raise TypingError(f"acc must be a 3-D C-contiguous float64 array, got {acc}")


def _pair(context, builder, permt, perm, blk):
    """Rows ``2·blk``, ``2·blk + 1`` of a layer's output and the input rows ``P`` maps them from."""
    row0 = builder.mul(blk, ir.Constant(_IDX, 2))
    row1 = builder.add(row0, ir.Constant(_IDX, 1))
    i0, i1 = (
        context.cast(builder, builder.load(_item_ptr(context, builder, permt, perm, [r])), permt.dtype, types.intp)
        for r in (row0, row1)
    )
    return row0, row1, i0, i1


def _weights(context, builder, wt, w, blk):
    """Block ``blk``'s four entries ``w00, w01, w10, w11``, each splat across the lanes."""
    zero = ir.Constant(_IDX, 0)
    wp = _item_ptr(context, builder, wt, w, [blk, zero, zero])
    return [_splat(builder, builder.load(builder.gep(wp, [ir.Constant(_I32, k)]))) for k in range(4)]


def _mix(builder, a00, a01, a10, a11, x0, x1):
    """``(a00·x0 + a01·x1, a10·x0 + a11·x1)``, lane by lane."""

    def dot(a, b):
        return builder.fadd(builder.fmul(a, x0, flags=_FLAGS), builder.fmul(b, x1, flags=_FLAGS), flags=_FLAGS)

    return dot(a00, a01), dot(a10, a11)


class _Rows:
    """Loads and stores of whole lane rows of the 2-D arrays of one intrinsic call."""

    def __init__(self, context, builder, sig, args):
        self.context, self.builder = context, builder
        self.arrays = dict(zip(args, sig.args, strict=True))
        first = next(t for t in sig.args if isinstance(t, types.Array) and t.ndim == 2)
        self.align = context.get_abi_sizeof(context.get_data_type(first.dtype))

    def load(self, ary, row):
        return self.builder.load(_row_ptr(self.context, self.builder, self.arrays[ary], ary, row), align=self.align)

    def store(self, value, ary, row):
        self.builder.store(value, _row_ptr(self.context, self.builder, self.arrays[ary], ary, row), align=self.align)


def _forward_codegen(context, builder, sig, args):
    """``dst[2b], dst[2b+1] = B_b · (src[P 2b], src[P 2b+1])``."""
    src, dst, perm, w, b = args
    rows = _Rows(context, builder, sig, args)
    b = context.cast(builder, b, sig.args[4], types.intp)
    row0, row1, i0, i1 = _pair(context, builder, sig.args[2], perm, b)
    w00, w01, w10, w11 = _weights(context, builder, sig.args[3], w, b)
    y0, y1 = _mix(builder, w00, w01, w10, w11, rows.load(src, i0), rows.load(src, i1))
    rows.store(y0, dst, row0)
    rows.store(y1, dst, row1)
    return context.get_dummy_value()


def _grad_codegen(nblocks, with_blocks, with_input):
    """Reverse pass over blocks ``b … b+nblocks−1`` of one layer: ``with_blocks``, ``acc[b'] +=
    Σ_lanes gout_pair ⊗ (P src)_pair``; ``with_input``, ``gin[P pair] = B_bᵀ gout_pair``."""

    def codegen(context, builder, sig, args):
        named = dict(zip(_GRAD_ARGS[with_blocks, with_input], zip(args, sig.args, strict=True), strict=True))
        rows = _Rows(context, builder, sig, args)
        b = context.cast(builder, *named["b"], types.intp)
        perm, permt = named["perm"]
        gout = named["gout"][0]
        products = []
        for q in range(nblocks):
            blk = builder.add(b, ir.Constant(_IDX, q))
            row0, row1, i0, i1 = _pair(context, builder, permt, perm, blk)
            e0, e1 = rows.load(gout, row0), rows.load(gout, row1)
            if with_blocks:
                src = named["src"][0]
                u0, u1 = rows.load(src, i0), rows.load(src, i1)
                products += [builder.fmul(e, u, flags=_FLAGS) for e in (e0, e1) for u in (u0, u1)]
            if with_input:
                w00, w01, w10, w11 = _weights(context, builder, named["w"][1], named["w"][0], blk)
                d0, d1 = _mix(builder, w00, w10, w01, w11, e0, e1)  # Bᵀ
                rows.store(d0, named["gin"][0], i0)
                rows.store(d1, named["gin"][0], i1)
        if with_blocks:
            sums = tree_sums(builder, products)
            acc, acct = named["acc"]
            zero = ir.Constant(_IDX, 0)
            avt = ir.VectorType(ir.DoubleType(), 4 * nblocks)  # acc[b … b+nblocks] is contiguous
            ap = builder.bitcast(_item_ptr(context, builder, acct, acc, [b, zero, zero]), avt.as_pointer())
            if sums.type.element != avt.element:
                sums = builder.fpext(sums, avt)
            builder.store(builder.fadd(builder.load(ap, align=8), sums, flags=_FLAGS), ap, align=8)
        return context.get_dummy_value()

    return codegen


# argument names of the reverse-pass intrinsics, by (with_blocks, with_input)
_GRAD_ARGS = {
    (True, True): ("src", "gout", "gin", "perm", "w", "acc", "b"),
    (True, False): ("src", "gout", "perm", "acc", "b"),
    (False, True): ("gout", "gin", "perm", "w", "b"),
}


def _grad_typer(nblocks, with_blocks, with_input, args):
    named = dict(zip(_GRAD_ARGS[with_blocks, with_input], args, strict=True))
    _check_rows(*(named[k] for k in ("src", "gout", "gin") if k in named))
    _check_perm(named["perm"])
    if "w" in named:
        _check_blocks(named["w"], named["gout"].dtype)
    if "acc" in named:
        _check_acc(named["acc"])
    return types.void(*args), _grad_codegen(nblocks, with_blocks, with_input)


# numba reads an intrinsic's parameters from its typer's signature, so one typer per argument list
def _grad_both(nblocks):
    def typer(typingctx, src, gout, gin, perm, w, acc, b):
        return _grad_typer(nblocks, True, True, (src, gout, gin, perm, w, acc, b))

    typer.__name__ = f"grad_both_{nblocks}"
    return intrinsic(typer)


def _grad_blocks(nblocks):
    def typer(typingctx, src, gout, perm, acc, b):
        return _grad_typer(nblocks, True, False, (src, gout, perm, acc, b))

    typer.__name__ = f"grad_blocks_{nblocks}"
    return intrinsic(typer)


@intrinsic
def grad_input_block(typingctx, gout, gin, perm, w, b):
    """``grad_input_block(gout, gin, perm, w, b)``: block ``b``'s input gradient only."""
    return _grad_typer(1, False, True, (gout, gin, perm, w, b))


@intrinsic
def layer_block(typingctx, src, dst, perm, w, b):
    """``layer_block(src, dst, perm, w, b)``: the forward of block ``b`` (rows ``2b``, ``2b+1`` of ``dst``)."""
    _check_rows(src, dst)
    _check_perm(perm)
    _check_blocks(w, src.dtype)
    return types.void(src, dst, perm, w, b), _forward_codegen


#: ``grad_both_quad(src, gout, gin, perm, w, acc, b)``: blocks ``b … b+3``, block and input gradients.
grad_both_quad = _grad_both(QUAD)
#: ``grad_both_one(src, gout, gin, perm, w, acc, b)``: block ``b`` alone (the tail of a layer).
grad_both_one = _grad_both(1)
#: ``grad_blocks_quad(src, gout, perm, acc, b)``: blocks ``b … b+3``, block gradient only.
grad_blocks_quad = _grad_blocks(QUAD)
#: ``grad_blocks_one(src, gout, perm, acc, b)``: block ``b`` alone, block gradient only.
grad_blocks_one = _grad_blocks(1)


# ----------------------------------------------------------------------------------------------
# Scalar bit casts (for float32 arithmetic on the exponent and mantissa, e.g. kernels/gaussian.py)
# ----------------------------------------------------------------------------------------------
@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32 as an int32 (a bit cast, not a conversion)."""
    if x != types.float32:
        raise TypingError(f"f32_bits takes a float32, got {x}")

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose IEEE bits are the low 32 bits of an integer (a bit cast)."""
    if not isinstance(x, types.Integer):
        raise TypingError(f"bits_f32 takes an integer, got {x}")

    def codegen(context, builder, sig, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, _I32)
        elif x.bitwidth < 32:
            v = builder.zext(v, _I32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen
