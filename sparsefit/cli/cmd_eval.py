"""``sparsefit eval``: a compressed model's quality on held-out text against SVD baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..compress.evaluate import evaluate_compressed, save_plot
from .app import app, err_console, user_errors
from .report import check_json_target, emit_json, fmt


class EvalProgress:
    """One status line per stage (stderr; silent when quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def on_eval(self, stage: str) -> None:
        if not self.quiet:
            err_console.print(f"eval: {stage} model…", highlight=False)

    def on_calibration_start(self, samples: int) -> None:
        if not self.quiet:
            err_console.print(f"calibration: {samples} samples through the original model…", highlight=False)


def eval_table(result: dict[str, Any]) -> Table:
    """One row per method: kept fraction and the task's metrics."""
    cols = (
        ["cosine_mean", "cosine_min", "spearman", "neighbors_at10"]
        if result["task"] == "encoder"
        else ["perplexity", "perplexity_ratio"]
    )
    table = Table(title=f"held-out quality ({result['sentences']} sentences, {result['task']})", title_justify="left")
    table.add_column("method")
    table.add_column("kept", justify="right", no_wrap=True)
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right", no_wrap=True)
    for name, m in result["methods"].items():
        table.add_row(name, f"{m['kept_fraction']:.3f}", *(fmt(m[c], 4) for c in cols))
    return table


def check_plot_target(plot: Path | None) -> None:
    from ..errors import SparsefitError

    if plot is not None and plot.suffix.lower() != ".png":
        raise SparsefitError(f"--plot writes a PNG; give a file name ending in .png, got {plot}")


@app.command("eval")
@user_errors
def eval_command(
    original: Annotated[Path, typer.Argument(help="The original model folder (config.json, weights, tokenizer).")],
    compressed: Annotated[Path, typer.Argument(help="A folder written by sparsefit compress.")],
    calibration: Annotated[
        str | None,
        typer.Option(
            help="Text (builtin, FILE or DIR) whitening the svd_whitened baseline; default: the compression's."
        ),
    ] = None,
    heldout: Annotated[
        Path | None, typer.Option(help="Held-out text file/folder (default: the builtin held-out sentences).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write quality against kept fraction as a PNG.")] = None,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the result as JSON to FILE, or - for stdout.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table.")] = False,
) -> None:
    """Compare a compressed model with its original on held-out text, beside plain and
    activation-aware SVD at the same per-layer budgets.

    Example: [bold]sparsefit eval minilm/ minilm-sparse/ --plot q.png --json e.json[/]
    """
    check_json_target(json_out)
    check_plot_target(plot)
    quiet = quiet or json_out == "-"
    result = evaluate_compressed(
        original,
        compressed,
        calibration=calibration,
        heldout=str(heldout) if heldout is not None else None,
        curve=plot is not None,
        callbacks=[EvalProgress(quiet)],
    )
    if plot is not None:
        save_plot(result, str(plot))
    if not quiet:
        err_console.print(eval_table(result))
    emit_json(json_out, result)
