"""Data-aware structures: the whitened SVD's optimality, error reporting, G~ on the data loss,
the joint fit's guarantee, the structure choice and determinism."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import sparsefit
from sparsefit.compress.structures import (
    DataProbes,
    GTildeSettings,
    choose,
    data_error,
    fit_gtilde,
    fit_joint,
    fit_lowrank,
    weight_error,
    whitened_svd,
    whitening,
)
from sparsefit.errors import SparsefitError
from sparsefit.targets import as_target


def _problem(m, k, seed=0, cond=30.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, math.log10(cond), k, dtype=torch.float64)
    gram = (q * lam) @ q.t()
    return w, gram


@pytest.mark.parametrize("m,k,rank", [(5, 4, 1), (4, 6, 2), (7, 5, 3)], ids=["5x4r1", "4x6r2", "7x5r3"])
def test_whitened_svd_is_optimal_against_brute_force(m, k, rank):
    w, gram = _problem(m, k, seed=m * 10 + k)
    wh = whitening(gram, ridge=0.0)
    svd = whitened_svd(w, wh)
    closed = fit_lowrank(w, wh, rank, svd)
    # every rank's error comes from the spectrum, and matches the measured one
    assert closed.data_error == pytest.approx(float(svd.relative_errors()[rank]), rel=1e-9)
    wn, cn = w.numpy(), gram.numpy()

    def loss(theta):  # ||(A B − W) L||²_F = tr(D C Dᵀ) and its gradient
        a = theta[: m * rank].reshape(m, rank)
        b = theta[m * rank :].reshape(rank, k)
        dc = (a @ b - wn) @ cn
        f = float(((a @ b - wn) * dc).sum())
        return f, np.concatenate([(2 * dc @ b.T).ravel(), (2 * a.T @ dc).ravel()])

    ref = float(((wn @ cn) * wn).sum())
    rng = np.random.default_rng(0)
    best = math.inf
    for _ in range(8):
        x0 = rng.standard_normal(rank * (m + k))
        res = minimize(loss, x0, jac=True, method="L-BFGS-B", options={"maxiter": 10000, "gtol": 1e-12, "ftol": 1e-15})
        best = min(best, math.sqrt(max(res.fun, 0.0) / ref))
    assert closed.data_error <= best + 1e-7  # nothing found beats the closed form ...
    assert best == pytest.approx(closed.data_error, abs=1e-5)  # ... and the search reaches it
    # a plain truncated SVD (not whitened) is worse on the data loss
    u, s, vh = torch.linalg.svd(w)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert data_error(plain, w, gram) > closed.data_error


def test_whitened_svd_equals_plain_svd_for_identity_gram():
    w, _ = _problem(9, 6, seed=3)
    wh = whitening(torch.eye(6, dtype=torch.float64))
    got = fit_lowrank(w, wh, 2)
    u, s, vh = torch.linalg.svd(w)
    plain = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(got.dense(w), plain, atol=1e-10)
    assert got.data_error == pytest.approx(got.weight_error, rel=1e-9)
    assert got.params == 2 * (9 + 6) and got.a.shape == (9, 2) and got.b.shape == (2, 6)


def test_data_and_weight_errors_are_the_stated_quantities():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(301, 7, generator=g, dtype=torch.float64) + 2.0  # a non-zero mean: the Gram is uncentred
    gram = x.t() @ x / x.shape[0]
    direct = math.sqrt(float((((w_hat - w) @ x.t()) ** 2).sum() / ((w @ x.t()) ** 2).sum()))
    assert data_error(w_hat, w, gram) == pytest.approx(direct, rel=1e-12)
    assert weight_error(w_hat, w) == pytest.approx(
        float(torch.linalg.norm(w_hat - w) / torch.linalg.norm(w)), rel=1e-12
    )
    assert data_error(w, w, gram) == 0.0 and data_error(torch.zeros_like(w), w, gram) == pytest.approx(1.0)
    assert data_error(w_hat, w, torch.eye(7, dtype=torch.float64)) == pytest.approx(weight_error(w_hat, w), rel=1e-12)


def test_whitening_rejects_bad_gram():
    with pytest.raises(SparsefitError, match="square"):
        whitening(torch.zeros(3, 4))
    with pytest.raises(SparsefitError, match="zero"):
        whitening(torch.zeros(3, 3))
    with pytest.raises(SparsefitError, match="NaN"):
        whitening(torch.full((2, 2), float("nan")))


def test_data_probes_give_the_exact_data_loss():
    w, gram = _problem(6, 5, seed=4)
    wh = whitening(gram, ridge=0.0)
    probes = DataProbes(wh)
    x = probes.rows64
    assert x.shape == (5, 5)
    assert float((x**2).sum(1).mean()) == pytest.approx(5.0)  # the scale of N(0, I) probes
    c2 = 5.0 / float(gram.trace() / 5)  # rows = c · L-columns, c² = k / mean squared column norm
    m = torch.randn(6, 5, dtype=torch.float64)
    assert float(((x @ m.t()) ** 2).sum()) == pytest.approx(c2 * float(((m @ wh.root) ** 2).sum()), rel=1e-10)
    op = sparsefit.GTilde(5, 6, depth=3, width=6, seed=0, dtype=torch.float64)
    diff = op.to_dense(torch.float64) - w
    assert probes.loss(op, as_target(w)) == pytest.approx(c2 * float(((diff @ wh.root) ** 2).sum()), rel=1e-10)
    # the same call every time, whatever the batch or generator: no probe noise
    assert torch.equal(probes(7, torch.Generator()), probes(99, torch.Generator().manual_seed(3)))


def test_gtilde_fit_on_data_loss_improves_and_is_deterministic():
    w, gram = _problem(12, 10, seed=5, cond=1e3)
    wh = whitening(gram)
    s = GTildeSettings(steps=60, seed=0)
    op1 = fit_gtilde(w, wh, depth=8, settings=s)
    op2 = fit_gtilde(w, wh, depth=8, settings=s)
    assert torch.equal(op1.blocks, op2.blocks) and torch.equal(op1.perms, op2.perms)
    start = sparsefit.GTilde(10, 12, 8, 12, seed=0)
    d_fit = data_error(op1.to_dense(torch.float64), w, gram)
    assert d_fit < 0.9 * data_error(start.to_dense(torch.float64), w, gram)
    assert d_fit < 1.0


def test_warm_start_is_judged_on_the_data_loss():
    """With a huge learning rate the steps end worse; the fit must return its start, judged on the
    probes' own loss (not the Frobenius error)."""
    w, gram = _problem(8, 8, seed=6)
    wh = whitening(gram)
    init = sparsefit.GTilde(8, 8, 4, 8, seed=1)
    with torch.no_grad():
        init.blocks[-1].zero_()
    probes = DataProbes(wh)
    cfg = sparsefit.FitConfig(depth=4, width=8, steps=3, lr=50.0, device="cpu", eval_every=1, schedule="low-reg")
    start = init.blocks.detach().clone()
    r = sparsefit.fit(w.float(), cfg, init=init, probes=probes)
    assert torch.equal(r.operator.blocks.detach(), start)


def test_joint_never_worse_than_its_lowrank_start():
    w, gram = _problem(16, 12, seed=7, cond=1e2)
    wh = whitening(gram)
    svd = whitened_svd(w, wh)
    for rank in (1, 4):
        start = fit_lowrank(w, wh, rank, svd)
        joint = fit_joint(w, wh, rank, depth=4, settings=GTildeSettings(steps=40, rounds=2), svd=svd)
        assert joint.data_error <= start.data_error
        assert joint.structure == "gtilde+lowrank" and joint.rank == rank
        assert joint.params == rank * (16 + 12) + 2 * 16 * 4
        assert data_error(joint.dense(w), w, gram) == pytest.approx(joint.data_error, rel=1e-9)


def test_choose_takes_the_smallest_data_error_and_records_why():
    w, gram = _problem(16, 16, seed=8)
    wh = whitening(gram)
    budget = 16 * 16 // 2
    c = choose(w, wh, budget, settings=GTildeSettings(steps=30))
    errs = {f.structure: f.data_error for f in c.candidates}
    assert set(errs) == {"lowrank", "gtilde", "gtilde+lowrank"}  # dense is over budget
    assert c.chosen.data_error == min(errs.values())
    assert all(f.params <= budget for f in c.candidates)
    d = c.to_dict()
    assert d["structure"] == c.chosen.structure and len(d["candidates"]) == 3 and "smallest data error" in d["why"]
    assert choose(w, wh, 16 * 16, structures=("lowrank", "dense")).chosen.structure == "dense"
    with pytest.raises(SparsefitError, match="unknown structure"):
        choose(w, wh, budget, structures=("svd",))


def test_baseline_helpers_match_the_structures():
    from sparsefit.compress.structures import lowrank_svd, lowrank_whitened

    w, gram = _problem(8, 6, seed=9)
    u, v = lowrank_whitened(w, gram * 1000.0, 3)  # a summed Gram (count × mean) gives the same factors
    assert u.shape == (8, 3) and v.shape == (3, 6)
    assert torch.allclose(u @ v, fit_lowrank(w, whitening(gram), 3).dense(w), atol=1e-9)
    # Cholesky root instead of the symmetric one: the same optimum
    chol = torch.linalg.cholesky(gram + 1e-6 * float(gram.diagonal().mean()) * torch.eye(6, dtype=torch.float64))
    uu, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    ref = (uu[:, :3] * s[:3]) @ torch.linalg.solve_triangular(chol, vh[:3], upper=False, left=False)
    assert torch.allclose(u @ v, ref, atol=1e-9)
    a, b = lowrank_svd(w, 2)
    uu, s, vh = torch.linalg.svd(w)
    assert torch.allclose(a @ b, (uu[:, :2] * s[:2]) @ vh[:2], atol=1e-12)
