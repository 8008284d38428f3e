"""``sparsefit fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import FitConfig
from ..fileformat import check_output_path
from ..fitting import FitResult, fit
from ..targets import load_target
from .app import app, err_console, user_errors
from .report import FitProgress, check_json_target, emit_json, fmt, key_value_table


def default_output(matrix: Path) -> Path:
    return matrix.with_name(matrix.stem + ".gtilde.safetensors")


def fit_report_rows(r: FitResult, backend: str | None = None) -> list[tuple[str, str]]:
    m = r.metrics
    if m.relative_error_method == "exact":
        err = f"{fmt(m.relative_error)} (exact)"
    else:
        err = f"{fmt(m.relative_error)} (estimated, 95% CI {fmt(m.relative_error_low)}–{fmt(m.relative_error_high)})"
    svd = "—" if m.svd_relative_error is None else f"{fmt(m.svd_relative_error)} (rank {m.svd_rank}, {m.svd_method})"
    if m.svd_relative_error is None:
        svd = f"rank {m.svd_rank}: {m.svd_method}"
    rows = [
        ("matrix", f"{m.out_features} × {m.in_features}"),
        ("G~", f"width {m.width}, depth {m.depth}"),
        ("relative error", err),
        ("MSE, last steps", fmt(m.mse_last)),
        ("parameters", f"{fmt(m.params)} vs {fmt(m.dense_params)} dense ({fmt(m.savings, 3)}× fewer)"),
        ("FLOPs per matvec", f"{fmt(m.flops)} vs {fmt(m.dense_flops)} dense"),
        ("truncated SVD, same budget", svd),
        ("steps", f"{fmt(m.steps_run)}" + (" (interrupted)" if m.interrupted else "")),
        ("fit time", f"{m.seconds:.1f} s"),
    ]
    if backend:
        rows.append(("backend", backend))
    return rows


def fit_json(r: FitResult, output: Path | None, source: str) -> dict[str, Any]:
    d: dict[str, Any] = r.metrics.to_dict()
    d["matrix"] = source
    d["output"] = str(output) if output else None
    d["config"] = r.config.to_dict()
    d["history"] = [{"step": s, "mse": v} for s, v in r.history]
    return d


@app.command("fit")
@user_errors
def fit_command(
    matrix: Annotated[
        Path,
        typer.Argument(
            help="Matrix file: .npy, .npz (dense or scipy.sparse), .safetensors, .pt/.pth/.bin state dict, .mtx."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Where to export the fit (safetensors). Default: MATRIX stem + .gtilde.safetensors."
        ),
    ] = None,
    key: Annotated[str | None, typer.Option(help="Tensor name inside a file that holds several.")] = None,
    depth: Annotated[int | None, typer.Option(help="Layers N. Default 2·ceil(log2 width).")] = None,
    width: Annotated[
        int | None, typer.Option(help="Internal width n (even, ≥ max(out, in)). Default 2·max(out, in).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Adam steps.")] = 12000,
    batch: Annotated[int, typer.Option(help="Gaussian probes per step.")] = 1024,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-2,
    schedule: Annotated[
        str, typer.Option(help="Learning-rate/regulariser schedule (paper = the note's three phases).")
    ] = "paper",
    seed: Annotated[int, typer.Option(help="Seeds permutations, initialisation and probes.")] = 0,
    permutations: Annotated[str, typer.Option("--permutations", help="Permutation sampler.")] = "uniform",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    backend: Annotated[str, typer.Option(help="Fit step: auto, torch, reference, numba.")] = "auto",
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the report as JSON to FILE, or - for stdout.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
) -> None:
    """Fit G~ to a matrix, report the error and savings, and export it.

    Example: [bold]sparsefit fit P.npy --depth 24 --steps 3000 -o P.safetensors --json r.json[/]
    """
    config = FitConfig(
        depth=depth,
        width=width,
        steps=steps,
        batch=batch,
        lr=lr,
        schedule=schedule,
        seed=seed,
        sampler=permutations,
        device=device,
        dtype=dtype,
        backend=backend,
    )
    out = check_output_path(output or default_output(matrix))
    check_json_target(json_out)
    target = load_target(matrix, key)
    if not quiet and json_out != "-":
        err_console.print(f"fitting {target.name} ({target.shape[0]} × {target.shape[1]})", highlight=False)
    with FitProgress("fit", quiet=quiet) as progress:
        result = fit(target, config, [progress])
    result.save(str(out))
    if not quiet:
        err_console.print(key_value_table("sparsefit fit", fit_report_rows(result)))
        err_console.print(f"wrote {out}", highlight=False)
    emit_json(json_out, fit_json(result, out, str(matrix)))
    if result.interrupted:
        err_console.print("[yellow]interrupted:[/] the best result so far was written, marked as interrupted")
        raise typer.Exit(130)
