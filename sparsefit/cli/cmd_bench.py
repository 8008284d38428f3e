"""``sparsefit bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from ..bench import BenchConfig, BenchRow, bench_file, run_bench
from ..errors import SparsefitError
from ..fitting import resolve_device
from .app import app, err_console, out_console, user_errors
from .report import check_json_target, emit_json, fmt


def _int_list(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SparsefitError(
            f"--{name} takes comma-separated integers, e.g. --{name} 1024,4096; got {text!r}"
        ) from None
    if not vals:
        raise SparsefitError(f"--{name} is empty; give comma-separated integers")
    return vals


def _table(rows: list[BenchRow]) -> Table:
    device = rows[0].device_name if rows else "cpu"
    shapes = {("n" if r.in_features == r.out_features == r.width else "n/2") for r in rows}
    features = "in = out = " + "/".join(sorted(shapes))
    table = Table(
        title=f"sparsefit bench on {device} ({features}; times: median ms, min–max below)", title_justify="left"
    )
    cols = ["method", "n", "D", "batch", "dtype", "fwd", "fwd+bwd", "×dense", "×dense f+b", "GB/s"]
    bounds = any(r.bound_ms is not None for r in rows)
    errors = any(r.rel_error is not None for r in rows)
    notes = any(r.note for r in rows)
    cols += ["bound"] * bounds + ["rel err"] * errors + ["note"] * notes
    for col in cols:
        left = col in ("method", "dtype", "note")
        table.add_column(col, justify="left" if left else "right", no_wrap=col == "method", min_width=6 * left)
    for r in rows:
        cells = [
            r.method,
            str(r.width),
            str(r.depth),
            str(r.batch),
            r.dtype,
            _spread(r.fwd_ms, r.fwd_min_ms, r.fwd_max_ms),
            _spread(r.fwd_bwd_ms, r.fwd_bwd_min_ms, r.fwd_bwd_max_ms),
            fmt(r.speedup_fwd, 3),
            fmt(r.speedup_fwd_bwd, 3),
            fmt(r.gbps, 3),
        ]
        err = f"{r.rel_error:.1e}" if r.rel_error is not None else "-"
        cells += [fmt(r.bound_ms, 3)] * bounds + [err] * errors + [r.note] * notes
        table.add_row(*cells)
    return table


def _spread(median: float | None, lo: float | None, hi: float | None) -> str:
    if median is None:
        return fmt(median, 3)
    if lo is None or hi is None:
        return fmt(median, 3)
    return f"{fmt(median, 3)}\n{fmt(lo, 3)}–{fmt(hi, 3)}"


@app.command("bench")
@user_errors
def bench_command(
    file: Annotated[
        Path | None, typer.Argument(help="Optional sparsefit .safetensors file: benchmark it at its own shape.")
    ] = None,
    widths: Annotated[
        str | None, typer.Option(help="Comma-separated widths n (default: GPU 1024…16384, CPU 1024,4096).")
    ] = None,
    batches: Annotated[
        str | None, typer.Option(help="Comma-separated batch sizes (default: GPU 1,16,256,4096; CPU 1,16,256).")
    ] = None,
    dtypes: Annotated[
        str | None, typer.Option(help="Comma-separated: fp32, bf16, fp16 (default: GPU all three; CPU fp32).")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="Layers (default round(2·log2 n)).")] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Timed calls per figure, median reported (default: GPU 20, CPU 30).")
    ] = None,
    features: Annotated[
        str, typer.Option(help="width: in = out = n (dense n×n); half: in = out = n/2 (the fit's default width).")
    ] = "width",
    no_backward: Annotated[bool, typer.Option("--no-backward", help="Time the forward only.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the rows as JSON to FILE, or - for stdout.")
    ] = None,
) -> None:
    """Time G~ (the PyTorch path and the device's fused kernel) against a dense layer: median times, speedups, bandwidth, error."""
    check_json_target(json_out)
    if repeats is not None and repeats < 1:
        raise SparsefitError(f"--repeats must be at least 1, got {repeats}")
    dtype_list = tuple(d.strip() for d in dtypes.split(",") if d.strip()) if dtypes is not None else None
    config = BenchConfig(
        widths=_int_list(widths, "widths"),
        batches=_int_list(batches, "batches"),
        dtypes=dtype_list,
        depth=depth,
        features=features,
        repeats=repeats,
        backward=not no_backward,
        device=device,
    )
    dev = resolve_device(device)
    if file is not None:
        rows = bench_file(file, config)
    else:
        rows = run_bench(config)
    payload: dict[str, Any] = {
        "device": dev.type,
        "device_name": rows[0].device_name if rows else dev.type,
        "rows": [r.to_dict() for r in rows],
    }
    if dev.type != "cuda":
        payload["note"] = "CPU timings (fused = the numba kernels); the GPU figures need a CUDA GPU"
        payload["threads"] = torch.get_num_threads()
    if json_out:
        emit_json(json_out, payload)
        if json_out == "-":
            return
    out_console.print(_table(rows))
    if dev.type != "cuda":
        err_console.print(
            "[yellow]note:[/] these are CPU timings (fused = the numba kernels); the GPU figures need a "
            "CUDA GPU with Triton (pip install 'sparsefit\\[gpu]').",
            highlight=False,
            soft_wrap=True,
        )
