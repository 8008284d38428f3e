"""Timing G~ against a dense layer: the library side of ``sparsefit bench`` (never prints).

For each width ``n``, batch and dtype, :func:`run_bench` times, with the same protocol:

* ``dense`` — ``x @ W.T`` with a dense ``out × in`` weight (the layer G~ replaces);
* ``torch`` — the ``torch`` backend (:mod:`sparsefit.kernels.torch_path`);
* ``fused`` — the device's fused backend (:func:`sparsefit.kernels.fused_backend`: ``cuda``, the
  Triton kernel, on a GPU; ``cpu``, the numba kernels, on the CPU);

each forward and forward+backward (``∂x`` and ``∂W`` / ``∂blocks``), at depth ``2·log2 n``
unless given. Each :class:`BenchRow` carries the median (and min, max) time, the speedup over
dense, the bytes a perfect implementation must move through device memory, the achieved
bandwidth, a bound (GPU, fused kernel: shared memory, the model in ``docs/gpu.md``; CPU: those
bytes at the measured copy bandwidth) and, for G~, the relative error of the forward against
the float64 reference.

Protocol: warm-up calls (compilation, allocator, autotuning stay out; at least one per rotated
input set, so no buffer is timed on its first use), then ``repeats`` timed calls, each timed
alone (CUDA events on the current stream, or ``time.perf_counter`` on the CPU), median reported;
inputs (and the dense weight) rotate among several buffers whose total size exceeds twice the
last-level cache, so a call does not find its operands in cache from the previous one.

Example
-------
>>> rows = run_bench(BenchConfig(widths=(256,), batches=(8,), dtypes=("fp32",), repeats=3))
>>> sorted({r.method for r in rows})
['dense', 'torch']
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import SparsefitError
from .fitting import resolve_device
from .kernels import Backend, dispatch, fused_backend, fused_cpu_available, fused_gpu_available
from .kernels.reference import gtilde_reference
from .operator import random_orthogonal_blocks
from .permutations import inverse_permutations, sample_permutations

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_DEFAULTS = {
    "widths": (1024, 2048, 4096, 8192, 16384),
    "batches": (1, 16, 256, 4096),
    "dtypes": ("fp32", "bf16", "fp16"),
}
CPU_DEFAULTS = {"widths": (1024, 4096), "batches": (1, 16, 256), "dtypes": ("fp32",)}
#: (repeats, warmup) when the config leaves them unset
PROTOCOL_DEFAULTS = {"cuda": (20, 3), "cpu": (30, 5)}
#: shared-memory bytes per clock per SM (NVIDIA: 32 banks × 4 bytes, Volta through Hopper)
SMEM_BYTES_PER_CLOCK = 128
#: assumed last-level cache when the device does not say (bytes)
DEFAULT_CACHE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to time. ``None`` sizes mean the device's defaults (:data:`GPU_DEFAULTS` on CUDA,
    the small :data:`CPU_DEFAULTS` on the CPU).

    widths: internal widths ``n`` (even); batches: rows of ``x``; dtypes: ``fp32``/``bf16``/``fp16``;
    depth: layers (``None``: ``round(2·log2 n)``); features: ``"width"`` (in = out = ``n``, dense is
    ``n × n``) or ``"half"`` (in = out = ``n/2``: the fit's default width ``2·max(m, k)``);
    repeats: timed calls per figure (median; default 20 on CUDA, 30 on the CPU); warmup: untimed
    calls first (default 3 on CUDA, 5 on the CPU; raised to one per rotated input set); backward: also time
    forward+backward; methods: subset of ``dense``, ``torch``, ``fused``; device: ``auto``,
    ``cpu`` or ``cuda``; memory_fraction: skip a case whose estimated footprint exceeds this
    fraction of free device memory (CPU: of 8 GiB)."""

    widths: Sequence[int] | None = None
    batches: Sequence[int] | None = None
    dtypes: Sequence[str] | None = None
    depth: int | None = None
    features: str = "width"
    repeats: int | None = None
    warmup: int | None = None
    backward: bool = True
    methods: Sequence[str] = ("dense", "torch", "fused")  # "fused" is left out on the CPU
    device: str = "auto"
    seed: int = 0
    memory_fraction: float = 0.6

    def __post_init__(self) -> None:
        for name in ("widths", "batches"):
            vals = getattr(self, name)
            if vals is not None:
                if not vals or any(int(v) < 1 for v in vals):
                    raise SparsefitError(f"{name} must be positive integers, got {list(vals)}")
        if self.widths is not None and any(int(w) % 2 or int(w) < 2 for w in self.widths):
            raise SparsefitError(f"widths must be even (2×2 blocks), got {list(self.widths)}")
        if self.dtypes is not None:
            bad = [d for d in self.dtypes if d not in DTYPES]
            if bad or not self.dtypes:
                raise SparsefitError(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
        bad_m = [m for m in self.methods if m not in ("dense", "torch", "fused")]
        if bad_m or not self.methods:
            raise SparsefitError(f"unknown method(s) {bad_m}; choose from dense, torch, fused")
        if self.features not in ("width", "half"):
            raise SparsefitError(f"features must be 'width' or 'half', got {self.features!r}")
        if (self.repeats is not None and self.repeats < 1) or (self.warmup is not None and self.warmup < 0):
            raise SparsefitError("repeats must be ≥ 1 and warmup ≥ 0")
        if self.depth is not None and self.depth < 1:
            raise SparsefitError(f"depth must be at least 1, got {self.depth}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SparsefitError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclasses.dataclass
class BenchRow:
    """One timed case. Times in milliseconds (median over ``repeats``); ``None`` where not run.

    ``hbm_bytes``: bytes a perfect forward must move through device memory (inputs read once,
    outputs written once, the dense weight or the blocks and permutations read once);
    ``bytes_per_row``: the same per row of ``x`` (the weights' share divided over the batch);
    ``gbps``: ``hbm_bytes`` over the forward time; ``bound_ms``: GPU, the fused kernel's
    shared-memory bound (``None`` for other methods); CPU, ``hbm_bytes`` at the measured copy
    bandwidth (every method); ``speedup``: dense time over this method's, forward and
    forward+backward; ``rel_error``: G~ methods, ``||y − y_ref|| / ||y_ref||`` of one forward
    against the float64 reference."""

    device: str
    device_name: str
    method: str
    width: int
    depth: int
    in_features: int
    out_features: int
    batch: int
    dtype: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    speedup_fwd: float | None
    speedup_fwd_bwd: float | None
    hbm_bytes: int
    gbps: float | None
    bound_ms: float | None
    flops: int
    repeats: int | None
    note: str = ""
    fwd_min_ms: float | None = None
    fwd_max_ms: float | None = None
    fwd_bwd_min_ms: float | None = None
    fwd_bwd_max_ms: float | None = None
    bytes_per_row: float | None = None
    rel_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[int], Any], device: torch.device, *, warmup: int = 3, repeats: int = 20) -> list[float]:
    """Time ``fn(i)`` (``i`` = call index, for rotating buffers) ``repeats`` times after
    ``warmup`` untimed calls; returns milliseconds per call. CUDA: events on the current stream
    around each call; CPU: ``time.perf_counter``."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            fn(warmup + i)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(warmup + i)
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size (CUDA: L2 from the device; CPU and unknown: 64 MiB)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        size = getattr(props, "L2_cache_size", 0) or 0
        if size:
            return int(size)
    return DEFAULT_CACHE_BYTES


def rotation_count(bytes_per_set: int, device: torch.device, limit: int = 16) -> int:
    """How many input sets to rotate among so that together they exceed twice the cache."""
    return int(max(2, min(limit, math.ceil(2 * cache_bytes(device) / max(1, bytes_per_set)))))


def smem_bandwidth(device: torch.device) -> float | None:
    """Aggregate shared-memory bandwidth in bytes/s (SMs × 128 B/clock × SM clock), or None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "clock_rate", 0) or 0
    clock = clock_khz * 1e3 if clock_khz else 1.755e9  # H100 SXM sustained clock if unknown
    return props.multi_processor_count * SMEM_BYTES_PER_CLOCK * clock


def copy_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 10) -> float:
    """Measured device-memory bandwidth in bytes/s: a large copy, bytes read plus written."""
    n = (mib << 20) // 4
    a = torch.empty(n, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    ms = statistics.median(time_calls(lambda i: b.copy_(a), device, warmup=2, repeats=repeats))
    return 2 * a.numel() * 4 / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def default_depth(width: int) -> int:
    """``round(2·log2 n)``, the issue's benchmark depth (two butterflies' worth of layers)."""
    return max(1, round(2 * math.log2(width)))


def dense_bytes(batch: int, fin: int, fout: int, es: int) -> int:
    return es * (fout * fin + batch * (fin + fout))


def gtilde_bytes(batch: int, fin: int, fout: int, width: int, depth: int, es: int, block_es: int) -> int:
    return es * batch * (fin + fout) + depth * width * (2 * block_es + 4)


def smem_bound_seconds(batch: int, width: int, depth: int, device: torch.device) -> float | None:
    """Fused-kernel bound: per layer and element one 4-byte shared-memory store and one 4-byte
    gathered load (fp32 state), over the aggregate shared-memory bandwidth. Bank conflicts of
    the random gather (≈3.5-way for 32 uniform addresses) are *not* in the bound."""
    bw = smem_bandwidth(device)
    return None if bw is None else batch * width * depth * 8 / bw


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def _protocol(config: BenchConfig, device: torch.device) -> BenchConfig:
    repeats, warmup = PROTOCOL_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    return dataclasses.replace(
        config,
        repeats=config.repeats if config.repeats is not None else repeats,
        warmup=config.warmup if config.warmup is not None else warmup,
    )


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return 8 << 30


def _fused_ok(device: torch.device) -> bool:
    if fused_backend(device) is Backend.CUDA:
        return fused_gpu_available(device)
    return fused_cpu_available()


_CPU_COPY_BANDWIDTH: list[float] = []


def memory_bound_seconds(nbytes: int, device: torch.device) -> float | None:
    """CPU: ``nbytes`` at the copy bandwidth measured once per process (256 MiB copies); GPU:
    ``None`` (the fused kernel's bound is :func:`smem_bound_seconds`)."""
    if device.type == "cuda":
        return None
    if not _CPU_COPY_BANDWIDTH:
        _CPU_COPY_BANDWIDTH.append(copy_bandwidth(device, mib=256, repeats=5))
    return nbytes / _CPU_COPY_BANDWIDTH[0]


def run_bench(
    config: BenchConfig | None = None, *, progress: Callable[[BenchRow], None] | None = None
) -> list[BenchRow]:
    """Time dense, the PyTorch path and the fused kernel for every configured case.

    Returns one :class:`BenchRow` per (width, batch, dtype, method); ``progress(row)`` is called
    as each row completes (the CLI uses it; the library never prints)."""
    config = config or BenchConfig()
    device = resolve_device(config.device)
    config = _protocol(config, device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    widths = [int(w) for w in (config.widths or defaults["widths"])]
    batches = [int(b) for b in (config.batches or defaults["batches"])]
    dtypes = list(config.dtypes or defaults["dtypes"])
    rows: list[BenchRow] = []
    gen = torch.Generator().manual_seed(config.seed)
    for n in widths:
        depth = config.depth or default_depth(n)
        f = n if config.features == "width" else n // 2
        perms = sample_permutations(depth, n, gen).to(device)
        blocks64 = random_orthogonal_blocks(depth, n, gen, torch.float64)
        w64 = torch.randn(f, f, generator=gen, dtype=torch.float64) / math.sqrt(f)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            blocks = blocks64.to(device=device, dtype=dtype)
            w = w64.to(device=device, dtype=dtype)
            for batch in batches:
                for row in bench_case(config, device, perms, blocks, w, f, f, batch, dtype_name):
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return rows


def bench_case(
    config: BenchConfig,
    device: torch.device,
    perms: torch.Tensor,
    blocks: torch.Tensor,
    w: torch.Tensor | None,
    fin: int,
    fout: int,
    batch: int,
    dtype_name: str,
) -> list[BenchRow]:
    """Time one (operator, batch, dtype) case for each method; ``w`` is the dense weight
    ``(fout, fin)`` (``None``: no dense row)."""
    dtype = DTYPES[dtype_name]
    es = torch.tensor([], dtype=dtype).element_size()
    depth, n = perms.shape
    inv = inverse_permutations(perms)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    methods = [m for m in config.methods if not (m == "dense" and w is None)]
    gx_bytes = dense_bytes(batch, fin, fout, es)
    budget = config.memory_fraction * _free_bytes(device)
    out: list[BenchRow] = []
    dense_times: tuple[float | None, float | None] = (None, None)
    for method in methods:
        base = {
            "device": device.type,
            "device_name": name,
            "method": method,
            "width": n,
            "depth": depth,
            "in_features": fin,
            "out_features": fout,
            "batch": batch,
            "dtype": dtype_name,
            "repeats": config.repeats,
        }
        if method == "dense":
            hbm = dense_bytes(batch, fin, fout, es)
            flops = 2 * batch * fin * fout
            footprint = 4 * fout * fin * es + 6 * batch * (fin + fout) * es
        else:
            hbm = gtilde_bytes(batch, fin, fout, n, depth, es, blocks.element_size())
            flops = 4 * batch * n * depth
            state_es = 4 if method == "torch" else es
            footprint = 3 * depth * batch * n * state_es + 8 * batch * n * 4
        if method == "fused" and not _fused_ok(device):
            if device.type != "cuda":
                continue  # the fused kernel needs a GPU; the CLI says so once
            reason = "Triton is not installed"
            out.append(BenchRow(**base, fwd_ms=None, fwd_bwd_ms=None, speedup_fwd=None, speedup_fwd_bwd=None,
                                hbm_bytes=hbm, gbps=None, bound_ms=None, flops=flops, note=reason))  # fmt: skip
            continue
        if footprint > budget:
            out.append(BenchRow(**base, fwd_ms=None, fwd_bwd_ms=None, speedup_fwd=None, speedup_fwd_bwd=None,
                                hbm_bytes=hbm, gbps=None, bound_ms=None, flops=flops,
                                note=f"skipped: needs ~{footprint / 2**30:.1f} GiB"))  # fmt: skip
            continue
        t_fwd, t_fwd_bwd = _time_method(
            method, config, device, perms, inv, blocks, w, fin, fout, batch, dtype, gx_bytes
        )
        fwd, fwd_bwd = t_fwd[1], (t_fwd_bwd[1] if t_fwd_bwd else None)
        if method == "dense":
            dense_times = (fwd, fwd_bwd)
        if device.type == "cuda":
            bound = smem_bound_seconds(batch, n, depth, device) if method == "fused" else None
        else:
            bound = memory_bound_seconds(hbm, device)
        out.append(
            BenchRow(
                **base,
                fwd_ms=fwd,
                fwd_bwd_ms=fwd_bwd,
                speedup_fwd=_ratio(dense_times[0], fwd),
                speedup_fwd_bwd=_ratio(dense_times[1], fwd_bwd),
                hbm_bytes=hbm,
                gbps=(hbm / (fwd * 1e-3) / 1e9) if fwd else None,
                bound_ms=bound * 1e3 if bound is not None else None,
                flops=flops,
                fwd_min_ms=t_fwd[0],
                fwd_max_ms=t_fwd[2],
                fwd_bwd_min_ms=t_fwd_bwd[0] if t_fwd_bwd else None,
                fwd_bwd_max_ms=t_fwd_bwd[2] if t_fwd_bwd else None,
                bytes_per_row=hbm / batch,
                rel_error=None
                if method == "dense"
                else _gtilde_error(method, device, perms, inv, blocks, fin, fout, batch, dtype),
            )
        )
    return out


def _backend(method: str, device: torch.device) -> Backend:
    return fused_backend(device) if method == "fused" else Backend.TORCH


def _gtilde_error(
    method: str,
    device: torch.device,
    perms: torch.Tensor,
    inv: torch.Tensor,
    blocks: torch.Tensor,
    fin: int,
    fout: int,
    batch: int,
    dtype: torch.dtype,
) -> float:
    """Relative error of one forward (inputs stored in ``dtype``) against the float64 reference."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, fin, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        y = dispatch(_backend(method, device), x, blocks, perms, fout, inv).double()
        ref = gtilde_reference(x.double(), blocks.double(), perms, fout)
    return float(torch.linalg.norm(y - ref) / torch.linalg.norm(ref))


def _stats(times: list[float]) -> tuple[float, float, float]:
    return min(times), statistics.median(times), max(times)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _time_method(
    method: str,
    config: BenchConfig,
    device: torch.device,
    perms: torch.Tensor,
    inv: torch.Tensor,
    blocks: torch.Tensor,
    w: torch.Tensor | None,
    fin: int,
    fout: int,
    batch: int,
    dtype: torch.dtype,
    dense_set_bytes: int,
) -> tuple[tuple[float, float, float], tuple[float, float, float] | None]:
    """``(min, median, max)`` milliseconds of the forward and (``None`` if not timed) forward+backward."""
    es = blocks.element_size()
    if method == "dense":
        assert w is not None
        nsets = rotation_count(dense_set_bytes, device)
        ws = [w.clone() for _ in range(nsets)]
    else:
        nsets = rotation_count(batch * (fin + fout) * es, device)
    xs = [torch.randn(batch, fin, device=device, dtype=dtype) for _ in range(nsets)]
    gys = [torch.randn(batch, fout, device=device, dtype=dtype) for _ in range(nsets)]

    if method == "dense":

        def apply(i: int, x: torch.Tensor, grad: bool) -> torch.Tensor:
            return torch.nn.functional.linear(x, ws[i % nsets].requires_grad_(grad))

        params: Callable[[int], list[torch.Tensor]] = lambda i: [ws[i % nsets]]  # noqa: E731
    else:
        backend = _backend(method, device)

        def gt(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return dispatch(backend, x, b, perms, fout, inv)

        bparam = blocks.clone()

        def apply(i: int, x: torch.Tensor, grad: bool) -> torch.Tensor:
            return gt(x, bparam.requires_grad_(grad))

        params = lambda i: [bparam]  # noqa: E731

    def fwd(i: int) -> None:
        with torch.no_grad():
            apply(i, xs[i % nsets], False)

    warmup = max(config.warmup, nsets) if config.warmup else 0  # no buffer is timed on its first use
    fwd_ms = _stats(time_calls(fwd, device, warmup=warmup, repeats=config.repeats))
    fwd_bwd_ms = None
    if config.backward:

        def fwd_bwd(i: int) -> None:
            x = xs[i % nsets].requires_grad_(True)
            y = apply(i, x, True)
            y.backward(gys[i % nsets])
            x.grad = None
            for p in params(i):
                p.grad = None

        fwd_bwd_ms = _stats(time_calls(fwd_bwd, device, warmup=warmup, repeats=config.repeats))
        for x in xs:
            x.requires_grad_(False)
    return fwd_ms, fwd_bwd_ms


def bench_file(path: str | os.PathLike[str], config: BenchConfig | None = None) -> list[BenchRow]:
    """Benchmark an exported sparsefit file at its own shape (width, depth, features).

    The dense baseline is the file's operator as a dense ``out × in`` matrix (skipped above 64 M
    entries). ``config.widths``/``depth``/``features`` are ignored."""
    from .fileformat import load

    config = config or BenchConfig()
    device = resolve_device(config.device)
    config = _protocol(config, device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    op, _, _ = load(path, device=device)
    dense = op.to_dense(torch.float32) if op.out_features * op.in_features <= 64 << 20 else None
    rows: list[BenchRow] = []
    for dtype_name in config.dtypes or defaults["dtypes"]:
        dtype = DTYPES[dtype_name]
        blocks = op.blocks.detach().to(dtype)
        w = dense.to(dtype) if dense is not None else None
        for batch in config.batches or defaults["batches"]:
            rows += bench_case(
                config, device, op.perms, blocks, w, op.in_features, op.out_features, int(batch), dtype_name
            )
    return rows
