import numpy as np
import pytest

from sparsefit import SparsefitError, synth


def test_perm():
    a = synth("perm", size=50, seed=1)
    assert (a.sum(0) == 1).all() and (a.sum(1) == 1).all() and set(np.unique(a)) == {0.0, 1.0}


def test_band_has_k_consecutive_entries_per_row():
    a = synth("band", size=40, k=3, seed=0)
    assert ((a != 0).sum(1) == 3).all()
    i = 10
    assert set(np.nonzero(a[i])[0]) == {9, 10, 11}
    assert set(np.nonzero(a[0])[0]) == {39, 0, 1}  # wraps around
    big = synth("band", size=400, k=4, seed=0)
    assert np.var(big[big != 0]) == pytest.approx(1 / 4, rel=0.15)


def test_sparse_has_k_times_size_entries():
    a = synth("sparse", size=100, k=3, seed=0)
    assert (a != 0).sum() == 300
    assert np.var(a[a != 0]) == pytest.approx(1 / 3, rel=0.2)


def test_lowrank():
    a = synth("lowrank", size=64, k=3, seed=0)
    s = np.linalg.svd(a, compute_uv=False)
    assert s[2] > 1e-6 and s[3] < 1e-10
    # U Vᵀ / sqrt(n k / 2) with n = 2·size: E||A||²_F = size² k / (size k) = size
    assert np.linalg.norm(a) ** 2 == pytest.approx(64, rel=0.5)


@pytest.mark.parametrize("kind", ["dct", "hadamard"])
def test_orthonormal_transforms(kind):
    a = synth(kind, size=32)
    assert np.allclose(a @ a.T, np.eye(32), atol=1e-12)


def test_gaussian_and_seeds():
    assert np.array_equal(synth("gaussian", 10, seed=3), synth("gaussian", 10, seed=3))
    assert not np.array_equal(synth("gaussian", 10, seed=3), synth("gaussian", 10, seed=4))


@pytest.mark.parametrize(
    "args,msg",
    [(("nope", 4), "unknown kind"), (("hadamard", 12), "power-of-two"), (("perm", 0), "size"), (("band", 4, 0), "--k")],
)
def test_bad(args, msg):
    with pytest.raises(SparsefitError, match=msg):
        synth(*args)
