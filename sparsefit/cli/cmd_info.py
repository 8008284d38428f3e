"""``sparsefit info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..fileformat import load
from ..operator import gtilde_num_parameters
from .app import app, out_console, user_errors
from .report import emit_json, fmt, key_value_table


@app.command("info")
@user_errors
def info_command(
    file: Annotated[Path, typer.Argument(help="A sparsefit .safetensors file.")],
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the summary as JSON to FILE, or - for stdout.")
    ] = None,
) -> None:
    """Summarise an exported G~ file (validates it fully)."""
    op, bias, header = load(file)
    summary: dict[str, Any] = {
        "file": str(file),
        "format": header.get("format"),
        "format_version": header.get("format_version"),
        "out_features": op.out_features,
        "in_features": op.in_features,
        "width": op.width,
        "depth": op.depth,
        "params": gtilde_num_parameters(op.depth, op.width),
        "dense_params": op.out_features * op.in_features,
        "permutation_sampler": op.sampler,
        "seed": op.seed,
        "dtype": header.get("dtype"),
        "has_bias": bias is not None,
        "interrupted": bool(header.get("interrupted", False)),
        "metrics": header.get("metrics"),
        "config": header.get("config"),
    }
    if json_out:
        emit_json(json_out, summary)
        if json_out == "-":
            return
    metrics = header.get("metrics") or {}
    rows = [
        ("file", str(file)),
        ("format", f"{summary['format']} v{summary['format_version']}"),
        ("matrix", f"{op.out_features} × {op.in_features}"),
        ("G~", f"width {op.width}, depth {op.depth}, {op.sampler} permutations, seed {op.seed}"),
        ("parameters", f"{fmt(summary['params'])} vs {fmt(summary['dense_params'])} dense"),
        ("dtype", str(summary["dtype"])),
        ("bias", "yes" if bias is not None else "no"),
    ]
    if metrics:
        rows.append(
            ("relative error", f"{fmt(metrics.get('relative_error'))} ({metrics.get('relative_error_method')})")
        )
        if metrics.get("svd_relative_error") is not None:
            rows.append(
                ("truncated SVD, same budget", f"{fmt(metrics['svd_relative_error'])} (rank {metrics.get('svd_rank')})")
            )
    if summary["interrupted"]:
        rows.append(("status", "[yellow]interrupted fit[/]"))
    out_console.print(key_value_table("sparsefit info", rows))
