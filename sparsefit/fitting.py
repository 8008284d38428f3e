"""Fitting G~ to a target by online Adam on fresh Gaussian probes.

The library never prints: progress goes to callbacks (objects with any of ``on_start``,
``on_step``, ``on_end``). Ctrl-C (``KeyboardInterrupt``) during the steps stops the fit cleanly;
the result then holds the best parameters seen so far and ``interrupted=True``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import FitConfig, resolve_depth
from .errors import SparsefitError
from .kernels import Backend, fused_cpu_available, parse_backend, resolve_backend
from .metrics import ErrorEstimate, SvdBaseline, relative_error, svd_baseline
from .operator import GTilde, default_width, gtilde_flops_per_matvec, orthogonality_penalty_grad
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
    :class:`~sparsefit.compress.structures.DataProbes`) is also what a warm start is judged by.

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
    width = config.width if config.width is not None else default_width(m, k)
    depth = resolve_depth(config.depth, width)

    if config.loss == "exact":
        if probes is not None:
            raise SparsefitError("the exact loss probes with the identity; it cannot be combined with custom probes")
        if k > EXACT_LOSS_MAX_COLUMNS:
            raise SparsefitError(
                f"the exact loss needs all {k} columns every step (more than {EXACT_LOSS_MAX_COLUMNS}); "
                "use --loss probes"
            )
    if init is None and config.init == "butterfly":
        from .butterfly import butterfly_init

        init = butterfly_init(tgt, depth, width, seed=config.seed, dtype=dtype)
    if init is not None:
        if (init.out_features, init.in_features, init.width) != (m, k, width):
            raise SparsefitError("init operator does not match the target's shape and width")
        op = init.to(device=device, dtype=dtype)
        depth = op.depth
        start_blocks = op.blocks.detach().clone()  # kept if the steps end worse than the start
    else:
        start_blocks = None
        op = GTilde(k, m, depth, width, seed=config.seed, sampler=config.sampler, dtype=dtype, device=device)
    tgt.prepare(device, dtype)
    exact = None
    if config.loss == "exact":  # x = √k·I: E[x xᵀ] = I as for N(0, I) probes, so the same loss scale
        eye = torch.eye(k, device=device, dtype=dtype) * math.sqrt(k)
        exact = (eye, tgt.matmat(eye))
    backend = _step_backend(config, device)
    fused_cpu = None
    if backend is Backend.CPU:
        from .kernels.cpu import fit_step_numba as fused_cpu

    phases = config.phase_steps()
    opt = torch.optim.Adam([op.blocks], lr=phases[0][1].lr)
    gen = torch.Generator(device=device).manual_seed(config.seed + 1)

    info = {
        "steps": config.steps,
        "depth": depth,
        "width": width,
        "shape": (m, k),
        "device": str(device),
        "backend": backend.value,
        "params": op.num_parameters,
    }
    _emit(callbacks, "on_start", info)

    t0 = time.perf_counter()
    history: list[tuple[int, float]] = []
    best_mse, best_blocks = math.inf, None
    window = torch.zeros((), dtype=torch.float64, device=device)
    window_n = 0
    report = torch.zeros((), dtype=torch.float64, device=device)
    report_n = 0
    last_window_mse = math.nan
    interrupted = False
    completed = 0
    phase_idx, (_, phase) = 0, phases[0]
    try:
        for step in range(config.steps):
            while phase_idx + 1 < len(phases) and step >= phases[phase_idx + 1][0]:
                phase_idx += 1
                phase = phases[phase_idx][1]
                for group in opt.param_groups:
                    group["lr"] = phase.lr
            if exact is not None:
                x, t = exact
            else:
                if probes is not None:
                    x = probes(config.batch, gen).to(device=device, dtype=dtype)
                else:
                    x = torch.randn(config.batch, k, generator=gen, device=device, dtype=dtype)
                t = tgt.matmat(x)
            if fused_cpu is not None:
                mse, grad = fused_cpu(x, t, op.blocks.detach(), op.perms, m)
                if phase.reg > 0:
                    grad += phase.reg * orthogonality_penalty_grad(op.blocks.detach())
                op.blocks.grad = grad
            else:
                y = op(x, backend=backend)
                mse = ((y - t) ** 2).sum(1).mean() / m
                loss = mse + phase.reg * op.orthogonality_penalty() if phase.reg > 0 else mse
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            completed += 1
            mse_d = mse.detach().to(torch.float64)
            window += mse_d
            report += mse_d
            window_n += 1
            report_n += 1
            done = completed
            if done % REPORT_EVERY == 0 or done == config.steps:
                r = float(report) / report_n
                if not math.isfinite(r):
                    raise SparsefitError(
                        f"the fit diverged (loss {r}) at step {done}; lower the learning rate or check the matrix scale"
                    )
                _emit(
                    callbacks,
                    "on_step",
                    StepInfo(done, config.steps, r, phase.reg, phase.lr, phase_idx, time.perf_counter() - t0),
                )
                report.zero_()
                report_n = 0
                if should_stop is not None and should_stop():
                    interrupted = True
                    break
            if done % config.eval_every == 0 or done == config.steps:
                w = float(window) / window_n
                history.append((done, w))
                last_window_mse = w
                if w <= best_mse:
                    best_mse, best_blocks = w, op.blocks.detach().clone()
                window.zero_()
                window_n = 0
    except KeyboardInterrupt:
        interrupted = True
    steps_run = completed
    fit_seconds = time.perf_counter() - t0
    if best_blocks is not None:
        with torch.no_grad():
            op.blocks.copy_(best_blocks)
    op.blocks.grad = None
    error = None  # measured here when a start has to be compared; evaluate() reuses it
    if start_blocks is not None and steps_run > 0:
        # Judged on the fit's own objective: the probes' exact loss where they define one (data-
        # aware fits), else the relative Frobenius error.
        judge = getattr(probes, "loss", None)
        trained = op.blocks.detach().clone()
        err_trained = judge(op, tgt) if judge is not None else relative_error(op, tgt, seed=config.seed)
        with torch.no_grad():
            op.blocks.copy_(start_blocks)
        err_start = judge(op, tgt) if judge is not None else relative_error(op, tgt, seed=config.seed)
        start_better = err_start < err_trained if judge is not None else err_start.value < err_trained.value
        if start_better:
            error = None if judge is not None else err_start
        else:
            error = None if judge is not None else err_trained
            with torch.no_grad():
                op.blocks.copy_(trained)
    metrics = evaluate(
        op,
        tgt,
        seed=config.seed,
        error=error,
        mse_last=last_window_mse if not interrupted else best_mse,
        steps_run=steps_run,
        seconds=fit_seconds,
        interrupted=interrupted,
    )
    result = FitResult(op, metrics, config, history)
    _emit(callbacks, "on_end", result)
    return result


def evaluate(
    op: GTilde,
    target: Any,
    *,
    seed: int = 0,
    mse_last: float = math.nan,
    steps_run: int = 0,
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
    )
