"""The fused numba training step against its plain PyTorch reference."""

import pytest
import torch

from sparsefit.kernels import cpu
from sparsefit.kernels.cpu import fit_step_numba, fit_step_reference
from sparsefit.operator import random_orthogonal_blocks
from sparsefit.permutations import sample_permutations
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason="numba is not installed")

# (in_features, out_features, width, depth, batch): odd batches (partial lane chunks, fewer
# chunks than gradient groups, more chunks than groups), widths that are not powers of two
SHAPES = [
    (1, 1, 2, 1, 1),
    (7, 5, 10, 3, 3),
    (5, 7, 14, 2, 17),
    (30, 17, 66, 5, 37),
    (63, 60, 126, 4, 129),
    (50, 50, 100, 6, 301),
]
IDS = [f"in{k}-out{m}-n{n}-D{d}-B{b}" for k, m, n, d, b in SHAPES]


def _problem(k, m, n, depth, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = random_orthogonal_blocks(depth, n, g, dtype) + 0.2 * torch.randn(
        depth, n // 2, 2, 2, generator=g, dtype=dtype
    )
    perms = sample_permutations(depth, n, g)
    x = torch.randn(batch, k, generator=g, dtype=dtype)
    t = torch.randn(batch, m, generator=g, dtype=dtype)
    return x, t, blocks, perms


@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES, ids=IDS)
def test_numba_step_matches_reference_float64(k, m, n, depth, batch):
    x, t, blocks, perms = _problem(k, m, n, depth, batch, torch.float64)
    mse, grad = fit_step_numba(x, t, blocks, perms, m)
    mse_ref, grad_ref = fit_step_reference(x, t, blocks, perms, m)
    assert grad.shape == blocks.shape and grad.dtype == torch.float64
    assert abs(float(mse) - float(mse_ref)) <= 1e-12 * float(mse_ref)
    assert rel_err(grad, grad_ref) < 1e-12


@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES[1:], ids=IDS[1:])
def test_numba_step_reads_feature_major_probes_and_targets(k, m, n, depth, batch):
    # probes drawn (k, batch) and targets computed (m, batch), passed as transposed views: read
    # in place (no copy) and the same loss and gradient as row-major inputs
    x, t, blocks, perms = _problem(k, m, n, depth, batch, torch.float64)
    xf, tf = x.t().contiguous().t(), t.t().contiguous().t()
    assert not xf.is_contiguous() and xf.t().is_contiguous()
    assert cpu._layout(xf, torch.float64)[1] and not cpu._layout(x, torch.float64)[1]
    mse_ref, grad_ref = fit_step_reference(x, t, blocks, perms, m)
    for xs, ts in ((xf, tf), (xf, t), (x, tf)):
        mse, grad = fit_step_numba(xs, ts, blocks, perms, m)
        assert abs(float(mse) - float(mse_ref)) <= 1e-12 * float(mse_ref)
        assert rel_err(grad, grad_ref) < 1e-12
    # the block gradient's lane sums do not depend on the layout: same bytes
    assert torch.equal(fit_step_numba(xf, tf, blocks, perms, m)[1], fit_step_numba(x, t, blocks, perms, m)[1])


@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES[2:], ids=IDS[2:])
def test_numba_step_float32_close_to_float64_reference(k, m, n, depth, batch):
    x, t, blocks, perms = _problem(k, m, n, depth, batch, torch.float32)
    mse, grad = fit_step_numba(x, t, blocks, perms, m)
    mse_ref, grad_ref = fit_step_reference(x.double(), t.double(), blocks.double(), perms, m)
    assert grad.dtype == torch.float32
    assert abs(float(mse) - float(mse_ref)) <= 1e-5 * float(mse_ref)
    assert rel_err(grad, grad_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_checkpoint_segments_give_the_same_bytes(dtype):
    # every segment length (1 = keep every layer, up to one segment of all 7 layers, uneven
    # last segments included) recomputes exactly the activations it would have kept
    x, t, blocks, perms = _problem(30, 17, 66, 7, 37, dtype)
    runs = []
    for seglen in (1, 2, 3, 5, 7):
        sq, gacc = cpu._run_kernel(x, t, blocks, perms, 17, seglen=seglen)
        runs.append((sq, gacc.copy()))
    for sq, gacc in runs[1:]:
        assert sq == runs[0][0] and (gacc == runs[0][1]).all()
    if dtype == torch.float64:
        mse_ref, grad_ref = fit_step_reference(x, t, blocks, perms, 17)
        grad = torch.from_numpy(runs[3][1].sum(0))
        assert abs(runs[3][0] / (17 * 37) - float(mse_ref)) <= 1e-12 * float(mse_ref)
        assert rel_err(grad, grad_ref) < 1e-12


def test_segment_length_keeps_the_working_set_in_cache():
    from sparsefit.kernels import cpu_apply

    seg = cpu_apply.segment_length
    assert seg(6, 100, 8) == 1  # everything fits: no recomputation
    s32, s64 = seg(40, 2048, 4), seg(40, 2048, 8)
    layer = 2048 * cpu_apply.LANES
    assert 2 <= s64 < s32 < 40
    assert s32 * layer * 4 <= cpu_apply.SEGMENT_BYTES and s64 * layer * 8 <= cpu_apply.SEGMENT_BYTES
    assert seg(3, 10**6, 8) == 2  # never below 2 (1 would keep every layer)
    assert seg(40, 2048, 4, lanes=8) > s32  # fewer lanes a chunk: more layers fit


def test_segment_candidates():
    assert cpu.segment_candidates(6, 100, torch.float64) == (1,)  # everything fits: nothing to tune
    cands = cpu.segment_candidates(40, 2048, torch.float32)
    assert cands[:3] == (1, 2, 4) and cands[-1] == cpu.segment_length(40, 2048, 4, cpu.LANES)
    assert cpu.segment_candidates(3, 10**5, torch.float32) == (1, 2, 3)  # never past the depth


def test_segment_tuner_explores_picks_the_fastest_median_and_reexplores():
    tuner = cpu.SegmentTuner((1, 2, 8), trials=3, period=20)
    cost = {1: 5.0, 2: 3.0, 8: 4.0}
    seen = []
    for step in range(9):
        s = tuner.next()
        seen.append(s)
        spike = 100.0 if step == 1 else 0.0  # one slow trial of 2: the median ignores it
        tuner.record(s, cost[s] + spike)
    assert seen == [1, 2, 8] * 3 and tuner.choice == 2
    assert [tuner.next() for _ in range(3)] == [2, 2, 2]
    cost[2] = 9.0  # the host changed: the next exploration (at step 20) moves away from 2
    for _ in range(11 + 9):
        s = tuner.next()
        tuner.record(s, cost[s])
    assert tuner.choice == 8
    assert cpu.SegmentTuner((4,)).next() == 4
    with pytest.raises(ValueError):
        cpu.SegmentTuner(())


def test_workspace_keeps_buffers_per_shape():
    import numpy as np

    a = cpu._workspace("test-ws", (2, 3), np.float32)
    b = cpu._workspace("test-ws", (2, 5), np.float32)
    assert cpu._workspace("test-ws", (2, 3), np.float32) is a and cpu._workspace("test-ws", (2, 5), np.float32) is b
    for extra in range(cpu._WORKSPACE_SHAPES):
        cpu._workspace("test-ws", (3, extra + 1), np.float32)
    assert cpu._workspace("test-ws", (2, 3), np.float32) is not a  # the least recently used went
    assert sum(k[0] == "test-ws" for k in cpu._WORKSPACE) == cpu._WORKSPACE_SHAPES


def test_fit_bytes_do_not_depend_on_the_tuned_segment_length(monkeypatch):
    import sparsefit
    from sparsefit import FitConfig, fit
    from sparsefit.kernels import cpu_apply

    # a tiny L2 budget so that a small fit has several candidates; a fake clock makes each fit's
    # tuner prefer another one
    monkeypatch.setattr(cpu_apply, "SEGMENT_BYTES", 2 * 40 * cpu.LANES * 8)
    a = sparsefit.synth("sparse", size=20, k=2, seed=3)
    cfg = FitConfig(depth=9, steps=60, batch=40, seed=1, backend="cpu", dtype="float64")
    assert len(cpu.segment_candidates(9, 40, torch.float64)) > 2
    results, used = [], []
    real_record = cpu.SegmentTuner.record
    for favourite in cpu.segment_candidates(9, 40, torch.float64)[:3]:
        chosen = []

        def record(self, seglen, seconds, favourite=favourite, chosen=chosen, real=real_record):
            chosen.append(seglen)
            real(self, seglen, 0.0 if seglen == favourite else 1.0)

        monkeypatch.setattr(cpu.SegmentTuner, "record", record)
        results.append(fit(a, cfg).operator.blocks)
        used.append(chosen[-1])
    assert len(set(used)) == 3  # each fit settled on another segment length
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_numba_step_independent_of_thread_count():
    import numba

    x, t, blocks, perms = _problem(40, 40, 80, 4, 200, torch.float32, seed=5)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        m1, g1 = fit_step_numba(x, t, blocks, perms, 40)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        m2, g2 = fit_step_numba(x, t, blocks, perms, 40)
    finally:
        numba.set_num_threads(before)
    assert torch.equal(g1, g2) and float(m1) == float(m2)


def test_numba_step_rejects_wrong_dtype():
    x, t, blocks, perms = _problem(4, 4, 8, 2, 3, torch.float64)
    with pytest.raises(ValueError, match="float32 or float64"):
        fit_step_numba(x, t, blocks.half(), perms, 4)


def test_fit_uses_numba_and_matches_torch_backend():
    import sparsefit

    A = sparsefit.synth("perm", size=24, seed=1)
    # the step backends are what differs; the sweeps after them are one shared code path (sweeps=0:
    # they would amplify the steps' rounding differences through a nearly singular polish)
    cfg = dict(depth=6, steps=60, batch=33, seed=2, dtype="float64", sweeps=0)
    r_numba = sparsefit.fit(A, sparsefit.FitConfig(backend="numba", **cfg))
    r_torch = sparsefit.fit(A, sparsefit.FitConfig(backend="torch", **cfg))
    # same probes, same gradients up to rounding: the two fits stay together
    assert rel_err(r_numba.operator.blocks, r_torch.operator.blocks) < 1e-9


@pytest.mark.parametrize("k,m,n,depth,batch", SHAPES, ids=IDS)
def test_fused_adam_step_matches_reference_float64(k, m, n, depth, batch):
    from sparsefit.kernels.cpu import AdamState, adam_step_numba, adam_step_reference

    x, t, blocks, perms = _problem(k, m, n, depth, batch, torch.float64)
    b_ref, b_num = blocks.clone(), blocks.clone()
    s_ref, s_num = AdamState.zeros_like(blocks), AdamState.zeros_like(blocks)
    for i, (lr, reg) in enumerate([(1e-2, 3.0), (1e-2, 0.0), (3e-3, 0.3), (1e-3, 0.3)]):
        timings = {}
        mse_num = adam_step_numba(x, t, b_num, perms, m, s_num, lr=lr, reg=reg, timings=timings)
        mse_ref = adam_step_reference(x, t, b_ref, perms, m, s_ref, lr=lr, reg=reg)
        assert abs(float(mse_num) - float(mse_ref)) <= 1e-12 * float(mse_ref), i
        assert set(timings) == {"kernel", "regulariser+optimiser"}
    assert s_num.step == s_ref.step == 4
    assert rel_err(b_num - blocks, b_ref - blocks) < 1e-9  # the updates, not just the blocks
    assert rel_err(s_num.exp_avg_sq, s_ref.exp_avg_sq) < 1e-9


def test_fused_adam_step_float32_and_thread_count():
    import numba

    from sparsefit.kernels.cpu import AdamState, adam_step_numba, adam_step_reference

    x, t, blocks, perms = _problem(30, 17, 66, 5, 37, torch.float32, seed=3)
    runs = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            b, s = blocks.clone(), AdamState.zeros_like(blocks)
            for _ in range(3):
                adam_step_numba(x, t, b, perms, 17, s, lr=1e-2, reg=1.0)
            runs.append(b)
    finally:
        numba.set_num_threads(before)
    assert torch.equal(runs[0], runs[1])  # same bytes for any thread count
    b64, s64 = blocks.double(), AdamState.zeros_like(blocks.double())
    for _ in range(3):
        adam_step_reference(x.double(), t.double(), b64, perms, 17, s64, lr=1e-2, reg=1.0)
    assert rel_err(runs[0].double() - blocks.double(), b64 - blocks.double()) < 1e-4
