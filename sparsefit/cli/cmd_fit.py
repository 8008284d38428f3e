"""``sparsefit fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..autosize import AutoFitResult, Trial, fit_auto
from ..config import INITS, LOSSES, SCHEDULES, FitConfig
from ..errors import SparsefitError
from ..fileformat import check_output_path
from ..fitting import FitResult, fit
from ..targets import load_target
from .app import app, err_console, user_errors
from .report import FitProgress, check_json_target, emit_json, fmt, key_value_table

_DEFAULTS = FitConfig()  # the CLI's defaults are the library's


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
        ("G~", f"width {m.width}, depth {m.depth}" + _stages(r)),
        ("relative error", err),
        ("MSE, last steps", fmt(m.mse_last)),
        ("parameters", f"{fmt(m.params)} vs {fmt(m.dense_params)} dense ({fmt(m.savings, 3)}× fewer)"),
        ("FLOPs per matvec", f"{fmt(m.flops)} vs {fmt(m.dense_flops)} dense"),
        ("truncated SVD, same budget", svd),
        ("steps", f"{fmt(m.steps_run)}" + (" (interrupted)" if m.interrupted else "")),
        ("least-squares sweeps", _sweeps(r)),
        ("fit time", f"{m.seconds:.1f} s"),
    ]
    if backend:
        rows.append(("backend", backend))
    return rows


def _sweeps(r: FitResult) -> str:
    """``6 of 9 (converged)``, ``9 of 9``, ``none``: how many ran of how many the config asked for."""
    ran, asked = r.metrics.sweeps_run, r.config.sweeps or 0
    if not asked:
        return "none"
    rounds = len(r.config.sweep_rounds(asked))
    if r.metrics.interrupted:
        why = " (interrupted)"
    elif ran == 0:
        why = " (none kept: no gain at the fit's precision)"
    else:
        why = "" if ran == asked else " (converged)" if rounds == 1 else " (the best round's)"
    return f"{ran} of {asked}{why}" + (f", in {rounds} rounds" if rounds > 1 else "")


def _stages(r: FitResult) -> str:
    """``, grown 20 → 40`` for a depth-doubling fit, else nothing."""
    stages = r.config.stage_steps(r.metrics.depth)
    return "" if len(stages) == 1 else ", grown " + " → ".join(str(d) for _, d in stages)


class TrialLog:
    """Prints one line per finished trial of a depth search."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def on_trial(self, t: Trial) -> None:
        if not self.quiet:
            met = "" if t.reached_target is None else (" ✓" if t.reached_target else " ✗")
            err_console.print(
                f"depth {t.depth}: {fmt(t.params)} parameters, relative error {fmt(t.relative_error)}{met} "
                f"({t.seconds:.1f} s{', warm start' if t.warm_start else ''})",
                highlight=False,
            )


def search_summary(a: AutoFitResult) -> str:
    tried = ", ".join(f"{t.depth}→{fmt(t.relative_error, 3)}" for t in a.search)
    return f"chose depth {a.depth} of {len(a.search)} tried ({tried})"


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
    steps: Annotated[
        int, typer.Option(help="Adam steps (per trial of a depth search; 0 keeps a closed-form --init as it is).")
    ] = 12000,
    batch: Annotated[int, typer.Option(help="Gaussian probes per step.")] = 1024,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-2,
    schedule: Annotated[
        str,
        typer.Option(
            help=f"Learning-rate/regulariser schedule: {', '.join(SCHEDULES)} (paper = the note's three phases)."
        ),
    ] = _DEFAULTS.schedule,
    seed: Annotated[int, typer.Option(help="Seeds permutations, initialisation and probes.")] = 0,
    permutations: Annotated[
        str,
        typer.Option(
            "--permutations",
            "--sampler",
            help="Permutation sampler: uniform (random, the note's) or butterfly (perfect shuffles; exact "
            "Walsh–Hadamard/butterfly products at width 2^L, depth L).",
        ),
    ] = _DEFAULTS.sampler,
    init: Annotated[
        str,
        typer.Option(
            help=f"Starting blocks: {', '.join(INITS)} (butterfly: closed-form factorisation, needs "
            "--permutations butterfly and a power-of-two --width; with --steps 0 it is kept as is)."
        ),
    ] = "random",
    loss: Annotated[
        str,
        typer.Option(
            help=f"Training loss: {', '.join(LOSSES)} (exact: the whole ||G~ − A||² each step; late-exact: probes, then exact over the schedule's last phase; auto: exact for targets with at most --batch columns, else probes)."
        ),
    ] = _DEFAULTS.loss,
    grow: Annotated[
        int,
        typer.Option(
            help="Depth doublings: train at depth/2^G first, then double the depth G times (identity layers "
            "inserted, the matrix kept), in G+1 stages of equal steps (docs/quality.md §7). 0: the note's "
            "one-stage protocol.",
        ),
    ] = _DEFAULTS.grow,
    sweeps: Annotated[
        int | None,
        typer.Option(
            help="Least-squares sweeps after the Adam steps: each layer's blocks solved in turn on the "
            "exact loss (10 conjugate-gradient steps on its normal equations); they stop early once a "
            "sweep gains < 0.01 % (needs width ≤ 4096; about 0.15 s per layer at width 2048 on two cores; "
            "docs/quality.md §10-13). Default: as many as cost no more than the steps, up to 15 (15 for a "
            "1024 × 1024 target at the default steps). 0: none, the note's protocol.",
            show_default="auto",
        ),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            help="Run the sweeps in this many rounds, with --round-steps Adam steps on the exact loss "
            "between two rounds (they move all layers at once and let the next sweeps go further; "
            "docs/quality.md §14). The best round's blocks are kept. Default: one round per 2 sweeps; "
            "1: the sweeps back to back.",
            show_default="auto",
        ),
    ] = None,
    round_steps: Annotated[
        int,
        typer.Option(
            help="Adam steps between two rounds of sweeps (fresh optimiser, the schedule's last learning rate)."
        ),
    ] = _DEFAULTS.round_steps,
    target_error: Annotated[
        float | None,
        typer.Option(
            "--target-error",
            help="Choose the depth: the smallest that reaches this relative error (a search of fits; --steps each).",
        ),
    ] = None,
    max_params: Annotated[
        int | None,
        typer.Option(
            "--max-params",
            help="Choose the depth within this parameter budget (with --target-error: the cap of the search; "
            "alone: the most accurate depth within it).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    backend: Annotated[
        str, typer.Option(help="Fit step: auto, reference, torch, cpu (fused numba step), cuda (fused Triton kernel).")
    ] = "auto",
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the report as JSON to FILE, or - for stdout.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
) -> None:
    """Fit G~ to a matrix, report the error and savings, and export it.

    Example: [bold]sparsefit fit P.npy --depth 24 --steps 3000 -o P.safetensors --json r.json[/]

    Choose the depth instead: [bold]sparsefit fit P.npy --target-error 0.05 --max-params 200000[/]
    (the JSON report then has the trials under "search"). Walsh–Hadamard exactly:
    [bold]sparsefit fit H.npy --permutations butterfly --init butterfly --width 1024 --depth 10 --steps 0[/]
    """
    auto = target_error is not None or max_params is not None
    if auto and depth is not None:
        raise SparsefitError("--depth fixes the depth; drop it to let --target-error/--max-params choose one")
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
        init=init,
        loss=loss,
        grow=grow,
        sweeps=sweeps,
        rounds=rounds,
        round_steps=round_steps,
    )
    out = check_output_path(output or default_output(matrix))
    check_json_target(json_out)
    target = load_target(matrix, key)
    if not quiet and json_out != "-":
        err_console.print(f"fitting {target.name} ({target.shape[0]} × {target.shape[1]})", highlight=False)
    search = None
    with FitProgress("fit", quiet=quiet) as progress:
        if auto:
            chosen = fit_auto(
                target, config, target_error=target_error, max_params=max_params, callbacks=[progress, TrialLog(quiet)]
            )
            result, search = chosen.result, chosen
        else:
            result = fit(target, config, [progress])
    result.save(str(out))
    if not quiet:
        rows = fit_report_rows(result)
        if search is not None:
            rows.append(("depth search", search_summary(search)))
        err_console.print(key_value_table("sparsefit fit", rows))
        err_console.print(f"wrote {out}", highlight=False)
        if search is not None and search.target_met is False:
            err_console.print(
                f"[yellow]target not reached:[/] no depth up to {max(t.depth for t in search.search)} reached "
                f"relative error {fmt(target_error)}; wrote the most accurate fit (depth {search.depth})",
                highlight=False,
            )
    payload = fit_json(result, out, str(matrix))
    if search is not None:
        payload["search"] = search.search_dicts()
        payload["target_error"] = target_error
        payload["max_params"] = max_params
        payload["target_met"] = search.target_met
    emit_json(json_out, payload)
    if result.interrupted:
        err_console.print("[yellow]interrupted:[/] the best result so far was written, marked as interrupted")
        raise typer.Exit(130)
