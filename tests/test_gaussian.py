"""The counter-based Gaussian sampler (sparsefit/kernels/gaussian.py): the compiled kernel
against its plain-PyTorch reference, Philox against published answers, the distribution."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from sparsefit.kernels import gaussian as G


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 51, 301, 1000, 4097, 65539])
@pytest.mark.parametrize("seed,draw", [(0, 0), (7, 3), (2**40 + 5, 2**33 + 1), (2**64 - 1, 2**32 - 1)])
def test_kernel_equals_reference_bit_for_bit(n, seed, draw):
    a = G.gaussian_numba(n, seed, draw)
    b = G.gaussian_reference(n, seed, draw)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (n,)
    assert torch.equal(a, b)


def test_same_bytes_on_any_thread_count_and_prefix_stable():
    import numba

    n = 3 * G.CHUNK * 4 + 7  # several parallel work items and a tail
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = G.gaussian_numba(n, 11, 5)
    finally:
        numba.set_num_threads(before)
    assert torch.equal(one, G.gaussian_numba(n, 11, 5))
    assert torch.equal(G.gaussian((n,), 11, 5), one)
    assert torch.equal(G.gaussian((7, 9), 11, 5).flatten(), G.gaussian_reference(63, 11, 5))


@pytest.mark.parametrize(
    "counter,key,want",
    [
        # Random123's known-answer vectors for philox4x32-10 (kat_vectors)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, want):
    words = G.philox_rounds([torch.tensor([v], dtype=torch.int64) for v in counter], *key)
    assert tuple(int(w) for w in words) == want
    # and the sampler's counter layout: counter i = c0 + 2^32 c1, draw = c2 + 2^32 c3, seed = k0 + 2^32 k1
    if counter[1] == 0:
        got = G._philox_reference(counter[0] + 1, key[0] + (key[1] << 32), counter[2] + (counter[3] << 32), "cpu")
        assert tuple(int(w[counter[0]]) for w in got) == want


def _lstsq(fn, lo, hi, powers):
    x = np.cos(np.linspace(0, np.pi, 4001)) * (hi - lo) / 2 + (hi + lo) / 2
    coef, *_ = np.linalg.lstsq(np.stack([x**p for p in powers], 1), fn(x), rcond=None)
    return coef


def test_polynomial_coefficients_are_the_documented_fits():
    def log_q(f):
        out = np.full_like(f, -0.5)
        nz = f != 0
        out[nz] = (np.log1p(f[nz]) - f[nz]) / f[nz] ** 2
        return out

    def sin_q(z):
        x = np.sqrt(z)
        out = np.full_like(z, -1 / 6)
        nz = z != 0
        out[nz] = (np.sin(x[nz]) - x[nz]) / x[nz] ** 3
        return out

    def cos_q(z):
        out = np.full_like(z, -0.5)
        nz = z != 0
        out[nz] = (np.cos(np.sqrt(z[nz])) - 1) / z[nz]
        return out

    r2 = math.sqrt(2)
    for frozen, fitted in (
        (G.LOG_C, _lstsq(log_q, 1 / r2 - 1, r2 - 1, range(9))),
        (G.SIN_C, _lstsq(sin_q, 0, (math.pi / 4) ** 2, range(3))),
        (G.COS_C, _lstsq(cos_q, 0, (math.pi / 4) ** 2, range(4))),
    ):
        np.testing.assert_allclose(np.array(frozen, dtype=np.float64), fitted, rtol=1e-5, atol=1e-9)


def test_log_and_angle_accuracy():
    w = torch.arange(0, 2**32, 4093, dtype=torch.int64)
    u = ((w >> 8) + 1).double() * 2.0**-24
    got = G._log_u_reference(w).double()
    want = torch.log(u)
    assert float(((got - want).abs() / want.abs().clamp_min(1e-30)).max()) < 2e-7
    c, s = G._sincos_reference(w)
    angle = 2 * math.pi * (w >> 8).double() * 2.0**-24
    assert float((c.double() - torch.cos(angle)).abs().max()) < 2e-7
    assert float((s.double() - torch.sin(angle)).abs().max()) < 2e-7


def test_samples_are_standard_normal_and_draws_independent():
    x = G.gaussian_numba(1 << 21, 3, 0).double()
    assert abs(float(x.mean())) < 3e-3 and abs(float(x.var()) - 1) < 3e-3
    kurt = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
    assert abs(kurt - 3) < 0.02
    assert float(x.abs().max()) < 5.78  # u >= 2^-24 bounds a sample by sqrt(48 ln 2)
    assert scipy.stats.kstest(x[:200_000].numpy(), "norm").pvalue > 1e-3
    # the four streams of one draw, consecutive draws and neighbouring seeds are uncorrelated
    q = x.numel() // 4
    streams = x.view(4, q)
    corr = torch.corrcoef(streams)
    assert float((corr - torch.eye(4, dtype=corr.dtype)).abs().max()) < 5e-3
    for other in (G.gaussian_numba(1 << 21, 3, 1), G.gaussian_numba(1 << 21, 4, 0)):
        assert abs(float(torch.corrcoef(torch.stack([x, other.double()]))[0, 1])) < 5e-3
