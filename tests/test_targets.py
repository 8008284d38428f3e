import pickle

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch
from safetensors.torch import save_file
from scipy.sparse.linalg import aslinearoperator

from sparsefit import SparsefitError, as_target, load_target
from sparsefit.targets import DenseTarget, OperatorTarget, SparseTarget
from tests.conftest import rel_err

RNG = np.random.default_rng(0)
A = RNG.standard_normal((6, 9))


def _check(t, a=A):
    x = torch.randn(5, a.shape[1], dtype=torch.float64)
    assert t.shape == a.shape
    assert rel_err(t.matmat(x), x @ torch.from_numpy(np.asarray(a, dtype=np.float64)).t()) < 1e-12


def test_npy(tmp_path):
    np.save(tmp_path / "a.npy", A)
    _check(load_target(tmp_path / "a.npy"))


def test_npz_dense_needs_key_when_several(tmp_path):
    np.savez(tmp_path / "a.npz", first=A, second=A.T)
    with pytest.raises(SparsefitError, match="--key"):
        load_target(tmp_path / "a.npz")
    _check(load_target(tmp_path / "a.npz", key="first"))
    with pytest.raises(SparsefitError, match="no tensor named 'third'"):
        load_target(tmp_path / "a.npz", key="third")


def test_npz_scipy_sparse(tmp_path):
    s = sp.random(30, 20, density=0.1, random_state=1, format="csr")
    sp.save_npz(tmp_path / "s.npz", s)
    t = load_target(tmp_path / "s.npz")
    assert isinstance(t, SparseTarget)
    _check(t, s.toarray())
    assert t.frobenius_norm() == pytest.approx(np.linalg.norm(s.toarray()))


def test_safetensors_with_key(tmp_path):
    save_file({"w": torch.from_numpy(A).float(), "b": torch.zeros(6)}, str(tmp_path / "m.safetensors"))
    t = load_target(tmp_path / "m.safetensors", key="w")
    x = torch.randn(3, 9, dtype=torch.float64)
    assert rel_err(t.matmat(x), x @ torch.from_numpy(A).float().double().t()) < 1e-12
    with pytest.raises(SparsefitError, match="1-D"):
        load_target(tmp_path / "m.safetensors", key="b")
    with pytest.raises(SparsefitError, match="no tensor named"):
        load_target(tmp_path / "m.safetensors", key="nope")


def test_pt_state_dict(tmp_path):
    torch.save({"layer.weight": torch.from_numpy(A)}, tmp_path / "m.pt")
    _check(load_target(tmp_path / "m.pt"))
    torch.save(torch.from_numpy(A), tmp_path / "t.pth")
    _check(load_target(tmp_path / "t.pth"))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2, 2), "x": Evil()}, path)
    with pytest.raises(SparsefitError, match="refused"):
        load_target(path)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(SparsefitError):
        load_target(raw)


def test_mtx_sparse_and_dense(tmp_path):
    s = sp.random(12, 7, density=0.2, random_state=2, format="coo")
    scipy.io.mmwrite(str(tmp_path / "s.mtx"), s)
    t = load_target(tmp_path / "s.mtx")
    assert isinstance(t, SparseTarget)
    _check(t, s.toarray())
    scipy.io.mmwrite(str(tmp_path / "d.mtx"), A)
    _check(load_target(tmp_path / "d.mtx"))


def test_very_sparse_dense_matrix_is_applied_sparsely():
    a = np.eye(50)[np.random.default_rng(0).permutation(50)]
    t = DenseTarget(a)
    t.prepare(torch.device("cpu"), torch.float64)
    assert t._dev.layout == torch.sparse_csr
    _check(t, a)


def test_matrix_free_targets():
    at = torch.from_numpy(A)
    _check(as_target(lambda X: at @ X, shape=A.shape), A)
    _check(as_target(aslinearoperator(A)), A)
    with pytest.raises(SparsefitError, match="needs its shape"):
        as_target(lambda X: X)
    bad = OperatorTarget(lambda X: X, (6, 9))
    with pytest.raises(SparsefitError, match="returned shape"):
        bad.matmat(torch.randn(2, 9))


@pytest.mark.parametrize(
    "arr,msg",
    [
        (np.zeros(5), "2-D"),
        (np.zeros((2, 3, 4)), "3-D"),
        (np.zeros((0, 4)), "empty"),
        (np.array([[1, 2]], dtype=complex), "complex"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf]]), "NaN or Inf"),
        (np.array([[True, False]]), "dtype|boolean"),
    ],
    ids=["1d", "3d", "empty", "complex", "nan", "inf", "bool"],
)
def test_bad_arrays(tmp_path, arr, msg):
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(SparsefitError, match=msg):
        load_target(tmp_path / "a.npy")


def test_object_array(tmp_path):
    np.save(tmp_path / "o.npy", np.array([[1, "x"]], dtype=object), allow_pickle=True)
    with pytest.raises(SparsefitError, match="Python objects"):
        load_target(tmp_path / "o.npy")


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "a.npy", RNG.standard_normal((64, 64)))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(SparsefitError, match="truncated"):
        load_target(tmp_path / "a.npy")


def test_missing_unknown_and_key_misuse(tmp_path):
    with pytest.raises(SparsefitError, match="no such file"):
        load_target(tmp_path / "nope.npy")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(SparsefitError, match="unknown file type"):
        load_target(tmp_path / "a.csv")
    np.save(tmp_path / "a.npy", A)
    with pytest.raises(SparsefitError, match="--key applies"):
        load_target(tmp_path / "a.npy", key="x")
