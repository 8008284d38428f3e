"""Fitting G~ to a target by online Adam on fresh Gaussian probes.

The library never prints: progress goes to callbacks (objects with any of ``on_start``,
``on_step``, ``on_end``). Ctrl-C (``KeyboardInterrupt``) during the steps stops the fit cleanly;
the result then holds the best parameters seen so far and ``interrupted=True``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .als import SweepInfo, als_sweeps, check_als_width
from .config import FitConfig, Phase
from .errors import SparsefitError
from .kernels import Backend, dispatch, fused_cpu_available, parse_backend, resolve_backend
from .metrics import ErrorEstimate, SvdBaseline, relative_error, svd_baseline
from .operator import (
    GTilde,
    extend_operator,
    gtilde_flops_per_matvec,
    orthogonality_penalty,
    orthogonality_penalty_grad,
)
from .targets import Target, as_target

#: ``loss="exact"`` probes with all ``in_features`` unit vectors each step; beyond this many it refuses.
EXACT_LOSS_MAX_COLUMNS = 16384

#: Steps between progress reports (each report synchronises with the device once).
REPORT_EVERY = 25


@dataclass(frozen=True)
class StepInfo:
    """What a callback's ``on_step`` receives: ``mse`` is the mean over the steps since the last report."""

    step: int
    total: int
    mse: float
    reg: float
    lr: float
    phase: int
    seconds: float


@dataclass(frozen=True)
class FitMetrics:
    """The report of a fit. ``relative_error`` is ``||G~ − A||_F / ||A||_F``."""

    relative_error: float
    relative_error_method: str
    relative_error_low: float | None
    relative_error_high: float | None
    mse_last: float
    params: int
    dense_params: int
    savings: float
    flops: int
    dense_flops: int
    svd_rank: int
    svd_relative_error: float | None
    svd_method: str
    depth: int
    width: int
    out_features: int
    in_features: int
    steps_run: int
    seconds: float
    interrupted: bool
    sweeps_run: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def file_dict(self) -> dict[str, Any]:
        """Metrics stored in exported files: everything but the wall-clock time, so that the
        same command and seed give a byte-identical file."""
        d = self.to_dict()
        d.pop("seconds")
        return d


@dataclass
class FitResult:
    operator: GTilde
    metrics: FitMetrics
    config: FitConfig
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.metrics.interrupted

    def save(self, path: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Export to a sparsefit safetensors file (atomically); returns the header."""
        from .fileformat import save

        return save(
            path,
            self.operator,
            dtype=dtype,
            config=self.config.to_dict(),
            metrics=self.metrics.file_dict(),
            interrupted=self.interrupted,
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SparsefitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def _step_backend(config: FitConfig, device: torch.device) -> Backend:
    """The training step's backend: ``cpu`` runs the fused numba step (loss and block gradient in
    one call); the others apply the operator with that backend and let autograd do the rest."""
    b = parse_backend(config.backend)
    if b is Backend.AUTO and device.type == "cpu" and fused_cpu_available():
        return Backend.CPU
    return resolve_backend(b, device)


def _emit(callbacks: Sequence[Any], name: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


# ----------------------------------------------------------------------------------------------
# Probe sources: where each step's ``(x, t = x Aᵀ)`` comes from
# ----------------------------------------------------------------------------------------------
class ExactProbes:
    """The scaled identity ``x = √k·I`` every step (``E[x xᵀ] = I`` as for N(0, I) probes, so the
    loss has the same scale): the loss is exactly ``||G~ − A||²_F / out``, with no probe noise.
    ``t`` is computed once, and made contiguous once (a sparse target's product is a transposed
    view, which the fused step would otherwise copy every step)."""

    loss = "exact"

    def __init__(self, tgt: Target, device: torch.device, dtype: torch.dtype) -> None:
        k = tgt.in_features
        self.x = torch.eye(k, device=device, dtype=dtype) * math.sqrt(k)
        self.t = tgt.matmat(self.x).contiguous()
        self.timings: dict[str, float] = {}

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.t


class RandomProbes:
    """Fresh probes each step, N(0, I) or drawn by ``draw(batch, generator)``; ``t`` is the
    target's product (one GEMM for dense targets, a CSR product for sparse ones). N(0, I) probes
    are draw ``k`` (the step) of :func:`sparsefit.kernels.gaussian.gaussian` under ``seed``: the
    same float32 values on every device and thread count, drawn on all cores on the CPU. They are
    drawn as ``(in_features, batch)`` and returned transposed (a view)."""

    loss = "probes"

    def __init__(
        self,
        tgt: Target,
        batch: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        draw: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        self.tgt, self.batch, self.device, self.dtype, self.draw = tgt, batch, device, dtype, draw
        from .kernels.gaussian import gaussian  # imports numba when installed: not at package import

        self.gaussian, self.seed, self.draws = gaussian, seed, 0
        self.gen = torch.Generator(device=device).manual_seed(seed)  # for custom ``draw`` only
        self.timings: dict[str, float] = {}

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        if self.draw is not None:
            x = self.draw(self.batch, self.gen).to(device=self.device, dtype=self.dtype)
        else:
            # drawn feature-major: the target's product then comes out feature-major too and the
            # fused step reads both without a transposing copy (kernels/cpu.py, _layout)
            xt = self.gaussian((self.tgt.in_features, self.batch), self.seed, self.draws, self.device)
            x = xt.to(self.dtype).t()
        self.draws += 1
        t1 = time.perf_counter()
        t = self.tgt.matmat(x)
        self.timings = {"probes": t1 - t0, "target": time.perf_counter() - t1}
        return x, t


class LateExactProbes:
    """Gaussian probes for the first ``switch`` steps, then the exact loss: the limit of a
    larger batch late. The exact source (``in_features²`` values) is built at the switch."""

    loss = "late-exact"

    def __init__(self, early: RandomProbes, tgt: Target, switch: int) -> None:
        _check_exact_columns(tgt)
        self.early, self.tgt, self.switch = early, tgt, switch
        self._exact: ExactProbes | None = None
        self.calls = 0
        self.timings: dict[str, float] = {}

    def exact(self) -> ExactProbes:
        """The exact source, built on first use (the switch, or a polish after the steps)."""
        if self._exact is None:
            self._exact = ExactProbes(self.tgt, self.early.device, self.early.dtype)
        return self._exact

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        source = self.early if self.calls <= self.switch else self.exact()
        out = source.next()
        self.timings = source.timings
        return out


def _check_exact_columns(tgt: Target) -> None:
    if tgt.in_features > EXACT_LOSS_MAX_COLUMNS:
        raise SparsefitError(
            f"the exact loss needs all {tgt.in_features} columns every step (more than "
            f"{EXACT_LOSS_MAX_COLUMNS}); use --loss probes (and no --polish)"
        )


def _exact_source(tgt: Target, op: GTilde) -> ExactProbes:
    _check_exact_columns(tgt)
    return ExactProbes(tgt, op.blocks.device, op.blocks.dtype)


ProbeSource = ExactProbes | RandomProbes | LateExactProbes


def _exact_for(source: ProbeSource, tgt: Target, op: GTilde) -> ExactProbes:
    """The exact source for a polish after the steps: the fit's own when it has one."""
    if isinstance(source, ExactProbes):
        return source
    if isinstance(source, LateExactProbes):
        return source.exact()
    return _exact_source(tgt, op)


def make_probe_source(
    tgt: Target,
    config: FitConfig,
    op: GTilde,
    probes: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> ProbeSource:
    """The probe source ``config`` asks for, on ``op``'s device and dtype (the target prepared there)."""
    device, dtype = op.blocks.device, op.blocks.dtype
    tgt.prepare(device, dtype)
    loss = config.resolved_loss(tgt.in_features, custom_probes=probes is not None)
    if loss != "probes" and probes is not None:
        raise SparsefitError(f"the {loss} loss probes with the identity; it cannot be combined with custom probes")
    if loss == "exact":
        return _exact_source(tgt, op)
    random = RandomProbes(tgt, config.batch, config.seed + 1, device, dtype, probes)
    if loss == "late-exact":
        return LateExactProbes(random, tgt, switch=config.phase_steps()[-1][0])
    return random


# ----------------------------------------------------------------------------------------------
# Step functions: one per backend, same call ``step(x, t, phase) -> mse`` (a 0-d tensor); each
# updates ``op.blocks`` in place by Adam on ``mse + phase.reg · penalty`` and records the seconds
# spent per part in ``step.timings``.
# ----------------------------------------------------------------------------------------------
class TorchStep:
    """Autograd through ``op(x, backend)`` (torch, reference or the CUDA kernel) and ``torch.optim.Adam``."""

    def __init__(self, op: GTilde, out_features: int, backend: Backend | str) -> None:
        self.op, self.m, self.backend = op, out_features, backend
        self.opt = torch.optim.Adam([op.blocks], lr=1e-3)
        self.timings: dict[str, float] = {}
        self.last_mse = torch.zeros(())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, phase: Phase) -> torch.Tensor:
        t0 = time.perf_counter()
        op = self.op
        y = op(x, backend=self.backend)
        mse = ((y - t) ** 2).sum(1).mean() / self.m
        loss = mse + phase.reg * op.orthogonality_penalty() if phase.reg > 0 else mse
        loss.backward()
        t1 = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = phase.lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.timings = {"kernel+regulariser": t1 - t0, "optimiser": time.perf_counter() - t1}
        self.last_mse = mse.detach()
        return self.last_mse

    def loss_and_grad(self, x: torch.Tensor, t: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mse + reg · penalty, its gradient)`` at the current blocks, no update."""
        b = self.op.blocks.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = dispatch(self.backend, x, b, self.op.perms, self.m, self.op.inv_perms)
            loss = ((y - t) ** 2).sum(1).mean() / self.m + reg * orthogonality_penalty(b)
            (grad,) = torch.autograd.grad(loss, b)
        return loss.detach(), grad


class NumbaStep:
    """The fused numba kernel (forward, loss, block gradient), then one compiled pass that reduces
    the gradient groups, adds the regulariser's gradient and applies Adam (same update as
    ``torch.optim.Adam``; see :func:`sparsefit.kernels.cpu.adam_step_reference`). The kernel's
    checkpoint segment length is chosen by timing (:class:`sparsefit.kernels.cpu.SegmentTuner`)."""

    def __init__(self, op: GTilde, out_features: int) -> None:
        from .kernels import cpu

        self.cpu, self.op, self.m = cpu, op, out_features
        self.state = cpu.AdamState.zeros_like(op.blocks.detach())
        self.timings: dict[str, float] = {}
        self.last_mse = torch.zeros(())
        depth, width = op.perms.shape
        self.tuner = cpu.SegmentTuner(cpu.segment_candidates(depth, width, op.blocks.dtype))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, phase: Phase) -> torch.Tensor:
        blocks = self.op.blocks.detach()
        seglen = self.tuner.next()  # speed only: every segment length gives the same bytes
        self.last_mse = self.cpu.adam_step_numba(
            x,
            t,
            blocks,
            self.op.perms,
            self.m,
            self.state,
            lr=phase.lr,
            reg=phase.reg,
            timings=self.timings,
            seglen=seglen,
        )
        self.tuner.record(seglen, self.timings["kernel"])
        return self.last_mse

    def loss_and_grad(self, x: torch.Tensor, t: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mse + reg · penalty, its gradient)`` at the current blocks, no update."""
        blocks = self.op.blocks.detach()
        mse, grad = self.cpu.fit_step_numba(x, t, blocks, self.op.perms, self.m)
        if reg > 0:
            mse = mse + reg * orthogonality_penalty(blocks)
            grad += reg * orthogonality_penalty_grad(blocks)
        return mse, grad


def make_step(op: GTilde, config: FitConfig, out_features: int) -> TorchStep | NumbaStep:
    """The step function for ``config.backend`` on ``op``'s device."""
    backend = _step_backend(config, op.blocks.device)
    if backend is Backend.CPU:
        return NumbaStep(op, out_features)
    return TorchStep(op, out_features, backend)


# ----------------------------------------------------------------------------------------------
# Best-so-far tracking and progress reports
# ----------------------------------------------------------------------------------------------
class BestSoFar:
    """Keeps the blocks with the lowest mean loss over each ``every``-step window (and the
    history of window means); the device is synchronised once per window."""

    def __init__(self, every: int, device: torch.device) -> None:
        self.every = every
        self.window = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.best_mse = math.inf
        self.best_blocks: torch.Tensor | None = None
        self.last_mse = math.nan
        self.history: list[tuple[int, float]] = []

    def add(self, done: int, mse: torch.Tensor, blocks: torch.Tensor, last: bool) -> None:
        self.window += mse.to(torch.float64)
        self.n += 1
        if done % self.every == 0 or last:
            w = float(self.window) / self.n
            self.history.append((done, w))
            self.last_mse = w
            if w <= self.best_mse:
                self.best_mse, self.best_blocks = w, blocks.detach().clone()
            self.window.zero_()
            self.n = 0

    def restore(self, op: GTilde) -> None:
        if self.best_blocks is not None:
            with torch.no_grad():
                op.blocks.copy_(self.best_blocks)


class _Reporter:
    """Mean loss since the last report, every :data:`REPORT_EVERY` steps, to the callbacks;
    raises on divergence."""

    def __init__(self, callbacks: Sequence[Any], total: int, device: torch.device) -> None:
        self.callbacks, self.total = callbacks, total
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, done: int, mse: torch.Tensor, phase: Phase, phase_idx: int) -> bool:
        """Returns True when a report was made (the caller may then poll ``should_stop``)."""
        self.sum += mse.to(torch.float64)
        self.n += 1
        if not (done % REPORT_EVERY == 0 or done == self.total):
            return False
        r = float(self.sum) / self.n
        if not math.isfinite(r):
            raise SparsefitError(
                f"the fit diverged (loss {r}) at step {done}; lower the learning rate or check the matrix scale"
            )
        info = StepInfo(done, self.total, r, phase.reg, phase.lr, phase_idx, time.perf_counter() - self.t0)
        _emit(self.callbacks, "on_step", info)
        self.sum.zero_()
        self.n = 0
        return True


def polish(
    op: GTilde,
    step: TorchStep | NumbaStep,
    exact: ExactProbes,
    iterations: int,
    reg: float,
    should_stop: Callable[[], bool] | None = None,
) -> list[float]:
    """L-BFGS (strong Wolfe line search) on the exact loss ``||G~ − A||²_F / out + reg · penalty``,
    from the current blocks, for ``iterations`` iterations; every accepted iterate lowers the
    loss. Returns the loss after each iteration."""
    x, t = exact.next()
    opt = torch.optim.LBFGS(
        [op.blocks],
        lr=1.0,
        max_iter=1,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def closure() -> torch.Tensor:
        loss, grad = step.loss_and_grad(x, t, reg)
        op.blocks.grad = grad.to(op.blocks.dtype)
        return loss

    losses = []
    for _ in range(iterations):
        losses.append(float(opt.step(closure)))
        if not math.isfinite(losses[-1]) or (should_stop is not None and should_stop()):
            break
    op.blocks.grad = None
    return losses


def _sweep(
    op: GTilde,
    exact: ExactProbes,
    config: FitConfig,
    callbacks: Sequence[Any],
    should_stop: Callable[[], bool] | None,
    rows: torch.Tensor | None = None,
) -> tuple[int, bool]:
    """``config.sweeps`` least-squares sweeps on ``op`` (in float64, then back to its dtype), in
    rounds (:meth:`FitConfig.sweep_rounds`) with ``config.round_steps`` Adam steps between two
    rounds. The loss is ``||G~ − A||²_F``, or with ``rows`` (the probes' ``sweep_rows``,
    ``(p, in)``) the data loss ``||(G~ − A)·rowsᵀ||²_F``; the Adam steps minimise the same loss.
    Keeps the blocks with the lowest loss in ``op``'s dtype among the start and the end of each
    round (Adam steps that raise it are undone). A round ends early when a sweep gains too little
    (:data:`sparsefit.als.TOLERANCE`); sweeps are counted as run. Returns the sweeps run up to the
    blocks kept (0 when none lowered the loss) and whether Ctrl-C stopped them (the best reached
    is kept)."""
    a = exact.t.t().to(torch.float64) / math.sqrt(exact.x.shape[0])  # t = √k·Aᵀ
    x, t, x64 = exact.x, exact.t, None
    if rows is not None:  # judged on the data loss over the rows
        x64 = rows.to(op.blocks.device, torch.float64)
        x, t = x64.to(op.blocks.dtype), (x64 @ a.t()).to(op.blocks.dtype)
    lengths = config.sweep_rounds(config.sweeps)
    between = Phase(1.0, config.resolved_phases()[-1].lr, 0.0)
    best = [_probe_loss(op, x, t), op.blocks.detach().clone(), 0]  # loss, blocks, sweeps done
    done, t0 = 0, time.perf_counter()  # sweeps run so far

    def keep_if_best() -> None:
        loss = _probe_loss(op, x, t)
        if loss < best[0]:
            best[:] = [loss, op.blocks.detach().clone(), done]

    def report(info: SweepInfo, r: int, before: int) -> None:
        nonlocal done
        if info.sweep == 0 and r > 0:  # the loss the round starts from: reported as the last one's end
            return
        done = before + info.sweep
        info = SweepInfo(done, config.sweeps, info.mse, time.perf_counter() - t0, r + 1, len(lengths))
        _emit(callbacks, "on_sweep", info)

    interrupted = False
    try:
        for r, length in enumerate(lengths):
            if r:
                _steps_between(op, config, x, t, between, should_stop)
                if _probe_loss(op, x, t) >= best[0]:
                    with torch.no_grad():
                        op.blocks.copy_(best[1])
            blocks = op.blocks.detach().to(torch.float64)
            try:
                on_sweep = functools.partial(report, r=r, before=done)
                als_sweeps(blocks, op.perms, a, length, on_sweep=on_sweep, should_stop=should_stop, x=x64)
            finally:  # on Ctrl-C the blocks hold the last layer solved, which lowered the loss
                with torch.no_grad():
                    op.blocks.copy_(blocks)
                keep_if_best()
            if should_stop is not None and should_stop():
                break
    except KeyboardInterrupt:
        interrupted = True
    with torch.no_grad():
        op.blocks.copy_(best[1])
    return best[2], interrupted


def _steps_between(
    op: GTilde,
    config: FitConfig,
    x: torch.Tensor,
    t: torch.Tensor,
    phase: Phase,
    should_stop: Callable[[], bool] | None,
) -> None:
    """``config.round_steps`` Adam steps on ``(x, t)`` from a fresh optimiser state (between two
    rounds of sweeps); ``should_stop`` is asked every ``eval_every`` steps."""
    step = make_step(op, config, t.shape[1])
    for i in range(config.round_steps):
        step(x, t, phase)
        if should_stop is not None and (i + 1) % config.eval_every == 0 and should_stop():
            break


def _probe_loss(op: GTilde, x: torch.Tensor, t: torch.Tensor) -> float:
    """``||G~·xᵀ − tᵀ||²_F`` in ``op``'s dtype (only compared, never reported): with the exact
    source's ``x = √k·I`` that is ``k·||G~ − A||²_F``."""
    with torch.no_grad():
        return float(((op(x, backend="torch") - t) ** 2).sum(dtype=torch.float64))


def _grow(
    op: GTilde, best: BestSoFar, depth: int, config: FitConfig, out_features: int, seed: int
) -> tuple[GTilde, TorchStep | NumbaStep, BestSoFar]:
    """The next stage of a ``grow`` fit: ``op`` at its best so far, extended to ``depth`` (the same
    matrix), a fresh step (optimiser state) for it, and a tracker whose best is that start."""
    best.restore(op)
    deeper = extend_operator(op, depth, seed=seed).to(device=op.blocks.device, dtype=op.blocks.dtype)
    tracker = BestSoFar(best.every, op.blocks.device)
    tracker.history = best.history
    tracker.last_mse = best.last_mse
    tracker.best_mse, tracker.best_blocks = best.best_mse, deeper.blocks.detach().clone()
    return deeper, make_step(deeper, config, out_features), tracker


def _phase_at(phases: list[tuple[int, Phase]], step: int) -> int:
    idx = 0
    while idx + 1 < len(phases) and step >= phases[idx + 1][0]:
        idx += 1
    return idx


def fit(
    target: Any,
    config: FitConfig | None = None,
    callbacks: Sequence[Any] = (),
    *,
    shape: tuple[int, int] | None = None,
    init: GTilde | None = None,
    should_stop: Callable[[], bool] | None = None,
    probes: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> FitResult:
    """Fit G~ to ``target`` and report how good the fit is.

    target: a dense array/tensor ``(out, in)``, a scipy sparse matrix, a
    ``scipy.sparse.linalg.LinearOperator``, a :class:`~sparsefit.targets.Target`, or a callable
    ``X ↦ A @ X`` on ``(in, batch)`` tensors (then pass ``shape=(out, in)``).
    config: a :class:`FitConfig` (default: the note's protocol).
    callbacks: objects with optional ``on_start(info: dict)``, ``on_step(StepInfo)``,
    ``on_end(FitResult)``.
    init: an operator to start from (same shape/width; e.g. a shallower fit extended).
    should_stop: polled at each report; returning True stops like Ctrl-C.
    probes: ``probes(batch, generator) -> (batch, in)`` replaces the Gaussian probes (e.g. rows of
    recorded activations, for a fit of ``E||(G~ − A)x||²`` over real inputs); default N(0, I). A
    probe source with a ``loss(op, target) -> float`` method (e.g.
    :class:`~sparsefit.compress.structures.DataProbes`) is also what a warm start is judged by;
    one with a ``sweep_rows`` tensor ``(p, in)`` makes the least-squares sweeps (``config.sweeps``,
    which custom probes leave at 0 unless asked) minimise the data loss ``||(G~ − A)·rowsᵀ||²_F``
    over those rows; without it the sweeps minimise ``||G~ − A||²_F``.

    Example
    -------
    >>> import sparsefit
    >>> A = sparsefit.synth("perm", size=32)
    >>> r = sparsefit.fit(A, sparsefit.FitConfig(depth=10, steps=200))
    >>> r.metrics.relative_error < 1.0
    True
    """
    config = config or FitConfig()
    tgt: Target = as_target(target, shape)
    m, k = tgt.shape
    device = resolve_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    width, depth = config.resolve_shape(m, k)
    if init is None and config.init == "butterfly":
        from .butterfly import butterfly_init

        init = butterfly_init(tgt, depth, width, seed=config.seed, dtype=dtype)
    start_blocks = None  # kept if the steps end worse than the start
    stages = config.stage_steps(depth)
    if init is not None:
        if config.grow:
            raise SparsefitError("a depth-doubling fit (grow) starts from its own shallow operator; give no init")
        if (init.out_features, init.in_features, init.width) != (m, k, width):
            raise SparsefitError("init operator does not match the target's shape and width")
        op = init.to(device=device, dtype=dtype)
        start_blocks = op.blocks.detach().clone()
    else:
        op = GTilde(k, m, stages[0][1], width, seed=config.seed, sampler=config.sampler, dtype=dtype, device=device)
    config = config.replace(sweeps=config.resolved_sweeps(width, custom_probes=probes is not None))  # what runs
    if config.sweeps:  # fail before the steps, not after them
        check_als_width(width)
        if probes is not None and getattr(probes, "sweep_rows", None) is None:
            raise SparsefitError(
                "least-squares sweeps need the probes' rows (a sweep_rows attribute); these custom probes "
                "have none: use sweeps=0"
            )
    source = make_probe_source(tgt, config, op, probes)
    step = make_step(op, config, m)
    phases = config.phase_steps()
    info = {
        "steps": config.steps,
        "depth": depth,
        "stages": [{"first_step": s, "depth": d} for s, d in stages],
        "width": width,
        "shape": (m, k),
        "device": str(device),
        "backend": _step_backend(config, device).value,
        "loss": source.loss,
        "params": op.num_parameters,
    }
    _emit(callbacks, "on_start", info)

    best = BestSoFar(config.eval_every, device)
    reporter = _Reporter(callbacks, config.steps, device)
    interrupted = False
    done = 0
    grow_at = {first: (i, d) for i, (first, d) in enumerate(stages) if i > 0}
    try:
        for i in range(config.steps):
            if i in grow_at:  # a depth doubling: the best of the stage, deeper, the same matrix
                op, step, best = _grow(op, best, grow_at[i][1], config, m, seed=config.seed + grow_at[i][0])
            phase_idx = _phase_at(phases, i)
            phase = phases[phase_idx][1]
            x, t = source.next()
            mse = step(x, t, phase)
            done = i + 1
            best.add(done, mse, op.blocks, done == config.steps)
            if reporter.add(done, mse, phase, phase_idx) and should_stop is not None and should_stop():
                interrupted = True
                break
    except KeyboardInterrupt:
        interrupted = True
    best.restore(op)
    op.blocks.grad = None
    if op.depth < depth:  # stopped before the last stage: the best so far, at the asked depth
        op = extend_operator(op, depth, seed=config.seed + len(stages)).to(device=device, dtype=dtype)
    if config.polish and not interrupted:
        exact = _exact_for(source, tgt, op)
        before = op.blocks.detach().clone()
        losses = polish(op, step, exact, config.polish, phases[-1][1].reg, should_stop)
        if not (losses and math.isfinite(losses[-1])):
            with torch.no_grad():
                op.blocks.copy_(before)
    sweeps_run = 0
    if config.sweeps and not interrupted:
        rows = getattr(probes, "sweep_rows", None)
        sweeps_run, interrupted = _sweep(op, _exact_for(source, tgt, op), config, callbacks, should_stop, rows)
    fit_seconds = time.perf_counter() - reporter.t0
    error = (
        _keep_start_if_better(op, tgt, start_blocks, config.seed, probes) if start_blocks is not None and done else None
    )
    metrics = evaluate(
        op,
        tgt,
        seed=config.seed,
        error=error,
        mse_last=best.last_mse if not interrupted else best.best_mse,
        steps_run=done,
        sweeps_run=sweeps_run,
        seconds=fit_seconds,
        interrupted=interrupted,
    )
    result = FitResult(op, metrics, config, best.history)
    _emit(callbacks, "on_end", result)
    return result


def _keep_start_if_better(
    op: GTilde, tgt: Target, start_blocks: torch.Tensor, seed: int, probes: Any = None
) -> ErrorEstimate | None:
    """Put the start's blocks back if they are better than the trained ones.

    Judged on the fit's own objective: the probes' exact loss where they define one (data-aware
    fits, ``probes.loss``), else the relative Frobenius error. Returns the relative error of
    whichever is kept when that was the judge (so :func:`evaluate` need not measure it again), else
    None.
    """
    judge = getattr(probes, "loss", None)

    def score(e: Any) -> float:
        return float(e) if judge is not None else e.value

    def measure() -> Any:
        return judge(op, tgt) if judge is not None else relative_error(op, tgt, seed=seed)

    trained = op.blocks.detach().clone()
    err_trained = measure()
    with torch.no_grad():
        op.blocks.copy_(start_blocks)
    err_start = measure()
    if score(err_start) < score(err_trained):
        return None if judge is not None else err_start
    with torch.no_grad():
        op.blocks.copy_(trained)
    return None if judge is not None else err_trained


def evaluate(
    op: GTilde,
    target: Any,
    *,
    seed: int = 0,
    mse_last: float = math.nan,
    steps_run: int = 0,
    sweeps_run: int = 0,
    seconds: float = 0.0,
    interrupted: bool = False,
    shape: tuple[int, int] | None = None,
    error: ErrorEstimate | None = None,
) -> FitMetrics:
    """Measure ``op`` against ``target``: relative error, parameter and FLOP counts, SVD baseline.

    ``error``: the relative error if the caller has already measured it (with the same seed).
    """
    tgt = as_target(target, shape)
    m, k = tgt.shape
    err: ErrorEstimate = error if error is not None else relative_error(op, tgt, seed=seed)
    params = op.num_parameters
    svd: SvdBaseline = svd_baseline(tgt, params)
    return FitMetrics(
        relative_error=err.value,
        relative_error_method=err.method,
        relative_error_low=err.low,
        relative_error_high=err.high,
        mse_last=mse_last,
        params=params,
        dense_params=m * k,
        savings=m * k / params,
        flops=gtilde_flops_per_matvec(op.depth, op.width),
        dense_flops=2 * m * k,
        svd_rank=svd.rank,
        svd_relative_error=svd.relative_error,
        svd_method=svd.method,
        depth=op.depth,
        width=op.width,
        out_features=m,
        in_features=k,
        steps_run=steps_run,
        seconds=seconds,
        interrupted=interrupted,
        sweeps_run=sweeps_run,
    )
