"""Counter-based N(0, 1) samples for the fit's probes: Philox4x32-10 and Box–Muller in float32.

Why: torch's CPU sampler runs on one thread (a Mersenne Twister state), and drawing the
1024 × 1024 probes of a full-size fit step took 3.8–7 ms of a 27–37 ms step on 2 cores
(``benchmarks/NOTES.md``, 2026-12-05, fourth and fifth parts). Here every sample is a pure
function of ``(seed, draw, index)``, so the work splits over threads and vector lanes freely,
and every thread count, the compiled kernel and the plain-PyTorch reference give the same bytes.

Definition (``n`` samples of draw ``draw``; ``Q = ceil(n / 4)``):

* counter ``i`` in ``[0, Q)`` is encrypted by Philox4x32-10 (Salmon, Moraes, Dror and Shaw,
  "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the generator behind ``torch.cuda``'s and
  JAX's samplers) with counter words ``(i mod 2³², i div 2³², draw mod 2³², draw div 2³²)`` and key
  ``(seed mod 2³², seed div 2³² mod 2³²)``, giving four 32-bit words ``w0..w3``;
* ``(w0, w1)`` and ``(w2, w3)`` each give two samples by Box–Muller: ``u = ((w0 >> 8) + 1)·2⁻²⁴``
  in ``(0, 1]``, ``r = sqrt(−2 ln u)``, angle ``2π·(w1 >> 8)·2⁻²⁴``; ``z0 = r·cos``, ``z1 = r·sin``;
* sample ``j·Q + i`` is word pair ``j // 2``'s ``z_{j mod 2}`` of counter ``i`` (four contiguous
  streams, so that the compiled loop stores with unit stride); a tail past ``n`` is dropped.

``ln`` and ``sin``/``cos`` are float32 polynomials (numba vectorises ``math.log``/``math.cos``
only with Intel's SVML runtime): ``ln`` of the mantissa in ``[1/√2, √2)`` by a degree-10
polynomial, the angle reduced to the nearest quarter turn and ``|x| ≤ π/4`` by degree-7 and
degree-8 polynomials. Their coefficients are least-squares fits on Chebyshev points (rounded to
float32 and frozen here, so that no LAPACK build can change the bytes; ``tests/test_gaussian.py``
re-derives them). Errors: ``ln u`` 1.1e-7 relative, ``sin``/``cos`` 6.3e-8 absolute. ``u ≥ 2⁻²⁴``
bounds the samples at 5.77 in absolute value (a tail probability of 8e-9), as for any float32
Box–Muller.

All arithmetic is float32 with one rounding per operation (no fused multiply-add: numba emits
none without fastmath, and torch runs each operation as its own kernel), so the bytes agree
across x86 vector widths and between :func:`gaussian_reference` and the numba kernel.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import fused_cpu_available

#: Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10

# ln(1 + f) = f + f²·Σ LOG_C[k]·f^k for f in [1/√2 − 1, √2 − 1]
LOG_C = tuple(
    np.float32(v)
    for v in (
        -0.4999999701976776,
        0.33333322405815125,
        -0.2500077188014984,
        0.2000197023153305,
        -0.16627594828605652,
        0.1418898105621338,
        -0.13101670145988464,
        0.12821908295154572,
        -0.07866766303777695,
    )
)
# sin x = x + x³·Σ SIN_C[k]·x^(2k), cos x = 1 + x²·Σ COS_C[k]·x^(2k), for |x| ≤ π/4
SIN_C = tuple(np.float32(v) for v in (-0.166666641831398, 0.008332748897373676, -0.0001958794891834259))
COS_C = tuple(np.float32(v) for v in (-0.5, 0.04166664928197861, -0.001388759003020823, 2.4463864974677563e-05))
LN2 = np.float32(math.log(2.0))
#: 2π / 2²⁴: a 24-bit angle count to radians.
ANGLE = np.float32(2 * math.pi / 2**24)
SQRT2 = np.float32(math.sqrt(2.0))

_MASK32 = 0xFFFFFFFF


def _padded(n: int) -> int:
    return 4 * ((n + 3) // 4)


# ----------------------------------------------------------------------------------------------
# Reference: plain PyTorch, any device
# ----------------------------------------------------------------------------------------------
def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a·m) div 2³², (a·m) mod 2³²`` for 32-bit ``a`` in int64, from 16-bit halves (no overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    lo_lo = a_lo * m_lo
    mid = a_hi * m_lo + a_lo * m_hi + (lo_lo >> 16)  # < 2^34
    hi = a_hi * m_hi + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    return hi & _MASK32, lo


def philox_rounds(c: list[torch.Tensor], k0: int, k1: int) -> list[torch.Tensor]:
    """Philox4x32-10 of the counter words ``c`` (four int64 tensors holding 32-bit values) under
    the key ``(k0, k1)``: the four output words."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(c[0], PHILOX_M[0])
        hi1, lo1 = _mulhilo(c[2], PHILOX_M[1])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def _philox_reference(count: int, seed: int, draw: int, device: torch.device) -> list[torch.Tensor]:
    i = torch.arange(count, dtype=torch.int64, device=device)
    c = [i & _MASK32, i >> 32, torch.full_like(i, draw & _MASK32), torch.full_like(i, (draw >> 32) & _MASK32)]
    return philox_rounds(c, seed & _MASK32, (seed >> 32) & _MASK32)


@functools.lru_cache(maxsize=256)
def _const(v: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def _f32(v: np.float32, like: torch.Tensor) -> torch.Tensor:
    """``v`` as a float32 0-d tensor on ``like``'s device (kept: no host-to-device copy per call),
    so that every operation rounds to float32 as the kernel does."""
    return _const(float(v), like.device)


def _log_u_reference(w: torch.Tensor) -> torch.Tensor:
    kf = ((w >> 8) + 1).to(torch.float32)  # exact: at most 2^24
    bits = kf.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)
    big = m > _f32(SQRT2, m)
    m = torch.where(big, m * _f32(np.float32(0.5), m), m)
    e = torch.where(big, e + 1, e)
    f = m - _f32(np.float32(1.0), m)
    q = _f32(LOG_C[-1], f).expand_as(f)
    for cf in LOG_C[-2::-1]:
        q = q * f + _f32(cf, f)
    return (e - 24).to(torch.float32) * _f32(LN2, f) + (f + f * f * q)


def _sincos_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = w >> 8  # 24-bit angle count
    j = (a + (1 << 21)) >> 22  # nearest quarter turn, 0..4
    x = (a - (j << 22)).to(torch.float32) * _f32(ANGLE, a.to(torch.float32))
    z = x * x
    ps = _f32(SIN_C[-1], x).expand_as(x)
    for cf in SIN_C[-2::-1]:
        ps = ps * z + _f32(cf, x)
    pc = _f32(COS_C[-1], x).expand_as(x)
    for cf in COS_C[-2::-1]:
        pc = pc * z + _f32(cf, x)
    s = x + x * z * ps
    c = _f32(np.float32(1.0), x) + z * pc
    q = j & 3
    swap = (q & 1) == 1
    cos_t = torch.where(swap, s, c)
    sin_t = torch.where(swap, c, s)
    cos_t = torch.where((q == 1) | (q == 2), -cos_t, cos_t)
    sin_t = torch.where(q >= 2, -sin_t, sin_t)
    return cos_t, sin_t


def gaussian_reference(n: int, seed: int, draw: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` float32 samples of draw ``draw`` under ``seed`` (the module's definition), in plain
    PyTorch on ``device``."""
    device = torch.device(device)
    q = _padded(n) // 4
    words = _philox_reference(q, int(seed), int(draw), device)
    out = []
    for wu, wa in ((words[0], words[1]), (words[2], words[3])):
        # the square root in float64, then rounded: correctly rounded, like the kernel's (torch's
        # float32 sqrt on the CPU was 1 ulp off in 0.6 % of the samples)
        v = _f32(np.float32(-2.0), wu.to(torch.float32)) * _log_u_reference(wu)
        r = torch.sqrt(v.to(torch.float64)).to(torch.float32)
        cos_t, sin_t = _sincos_reference(wa)
        out += [r * cos_t, r * sin_t]
    return torch.cat(out)[:n]


# ----------------------------------------------------------------------------------------------
# Compiled: numba, CPU
# ----------------------------------------------------------------------------------------------
#: Counters per parallel work item.
CHUNK = 2048

if fused_cpu_available():
    import numba

    from .simd import bits_f32, f32_bits

    _M0, _M1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    _W0, _W1 = np.uint64(PHILOX_W[0]), np.uint64(PHILOX_W[1])
    _MU = np.uint64(_MASK32)
    _S32 = np.uint64(32)
    _L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = LOG_C
    _S0, _S1, _S2 = SIN_C
    _C0, _C1, _C2, _C3 = COS_C
    _ONE, _HALF, _M2 = np.float32(1.0), np.float32(0.5), np.float32(-2.0)

    @numba.njit(inline="always", cache=True)
    def _round(c0, c1, c2, c3, k0, k1):  # pragma: no cover - compiled
        p0 = _M0 * c0
        p1 = _M1 * c2
        return (p1 >> _S32) ^ c1 ^ k0, p1 & _MU, (p0 >> _S32) ^ c3 ^ k1, p0 & _MU

    @numba.njit(inline="always", cache=True)
    def _philox(c0, c1, c2, c3, k0, k1):  # pragma: no cover - compiled
        for _ in range(PHILOX_ROUNDS - 1):  # a constant trip count: LLVM unrolls it before vectorising
            c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
            k0, k1 = (k0 + _W0) & _MU, (k1 + _W1) & _MU
        return _round(c0, c1, c2, c3, k0, k1)

    @numba.njit(inline="always", cache=True)
    def _radius(w):  # pragma: no cover - compiled
        bits = f32_bits(np.float32((w >> np.uint64(8)) + np.uint64(1)))
        e = (bits >> 23) - 127
        m = bits_f32((bits & 0x7FFFFF) | 0x3F800000)
        big = m > SQRT2
        m = m * _HALF if big else m
        e = e + 1 if big else e
        f = m - _ONE
        q = _L8 * f + _L7
        q = q * f + _L6
        q = q * f + _L5
        q = q * f + _L4
        q = q * f + _L3
        q = q * f + _L2
        q = q * f + _L1
        q = q * f + _L0
        return np.sqrt(_M2 * (np.float32(e - 24) * LN2 + (f + f * f * q)))

    @numba.njit(inline="always", cache=True)
    def _pair(wu, wa):  # pragma: no cover - compiled
        r = _radius(wu)
        a = np.int64(wa >> np.uint64(8))
        j = (a + (1 << 21)) >> 22
        x = np.float32(a - (j << 22)) * ANGLE
        z = x * x
        ps = (_S2 * z + _S1) * z + _S0
        pc = ((_C3 * z + _C2) * z + _C1) * z + _C0
        s = x + x * z * ps
        c = _ONE + z * pc
        q = j & 3
        cos_t = s if (q & 1) == 1 else c
        sin_t = c if (q & 1) == 1 else s
        cos_t = -cos_t if (q == 1 or q == 2) else cos_t
        sin_t = -sin_t if q >= 2 else sin_t
        return r * cos_t, r * sin_t

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _fill(out, seed, draw):  # pragma: no cover - compiled
        q = out.size // 4
        k0, k1 = np.uint64(seed) & _MU, np.uint64(seed) >> _S32
        d0, d1 = np.uint64(draw) & _MU, np.uint64(draw) >> _S32
        for ch in numba.prange((q + CHUNK - 1) // CHUNK):
            lo = ch * CHUNK
            hi = min(q, lo + CHUNK)
            o0 = out[lo:hi]
            o1 = out[q + lo : q + hi]
            o2 = out[2 * q + lo : 2 * q + hi]
            o3 = out[3 * q + lo : 3 * q + hi]
            for t in range(hi - lo):
                i = np.uint64(lo + t)
                w0, w1, w2, w3 = _philox(i & _MU, i >> _S32, d0, d1, k0, k1)
                o0[t], o1[t] = _pair(w0, w1)
                o2[t], o3[t] = _pair(w2, w3)


def gaussian_numba(n: int, seed: int, draw: int) -> torch.Tensor:
    """The same samples as :func:`gaussian_reference` (bit for bit), by the compiled kernel on
    the CPU threads numba uses."""
    out = np.empty(_padded(n), dtype=np.float32)
    _fill(out, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), np.uint64(draw & 0xFFFFFFFFFFFFFFFF))
    return torch.from_numpy(out[:n])


def gaussian(shape: tuple[int, ...], seed: int, draw: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """N(0, 1) float32 samples of ``shape``, draw ``draw`` under ``seed``: the compiled kernel
    on the CPU when numba is installed, else (and on other devices) the reference — the same
    bytes either way."""
    device = torch.device(device)
    n = math.prod(shape)
    if device.type == "cpu" and fused_cpu_available():
        return gaussian_numba(n, seed, draw).view(shape)
    return gaussian_reference(n, seed, draw, device).view(shape)
