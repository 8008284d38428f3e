"""``sparsefit compress``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..compress import (
    CompressConfig,
    CompressReport,
    Interrupted,
    LayerPlan,
    LayerRecord,
    compress_checkpoint,
    plan_checkpoint,
    torchrun_session,
    verify_compressed,
)
from ..compress.evaluate import evaluate_compressed, save_plot
from ..compress.finetune import distill_folder
from ..config import FitConfig
from ..distill import DistillConfig
from ..errors import SparsefitError
from .app import app, err_console, user_errors
from .cmd_eval import EvalProgress, check_plot_target, eval_table
from .report import FitProgress, check_json_target, emit_json, fmt


class LayerProgress(FitProgress):
    """Fit progress bar plus one line per finished layer (stderr; silent when quiet)."""

    def __init__(self, quiet: bool) -> None:
        super().__init__("layer", quiet=quiet)
        self.done = 0
        self.total = 0

    def on_plan(self, plans: list[LayerPlan]) -> None:
        self.total = len(plans)

    def on_calibration_start(self, samples: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task("calibration (forward passes)", total=samples, mse="—", rate="—")

    def on_calibration_step(self, done: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done)

    def on_layer_start(self, plan: LayerPlan) -> None:
        self.description = f"{plan.module} ({plan.shape[0]}×{plan.shape[1]})"

    def on_start(self, info: dict[str, Any]) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(
                f"{self.description} depth {info['depth']}", total=info["steps"], mse="—", rate="—"
            )

    def on_layer_end(self, plan: LayerPlan, rec: LayerRecord, resumed: bool) -> None:
        self.done += 1
        if self.progress is None:
            return
        err = fmt(rec.data_relative_error if rec.data_relative_error is not None else rec.relative_error)
        how = "resumed" if resumed else f"{rec.seconds:.1f} s"
        tail = f"depth {rec.depth}, error {err}" if rec.status == "compressed" else f"dense: {rec.reason}"
        self.progress.console.print(
            f"[{self.done}/{self.total}] {plan.name}: {tail} ({how})", highlight=False, soft_wrap=True
        )


class DistillProgress(FitProgress):
    """Distillation progress: one bar over all steps with the loss, one line per validation."""

    def on_start(self, info: dict[str, Any]) -> None:
        self.started = (int(info["done"]), time.perf_counter())
        if self.progress is not None:
            self.task = self.progress.add_task(
                f"distil (validation cosine {info['metric_before']:.4f})",
                total=info["total"],
                completed=info["done"],
                mse="—",
                rate="—",
            )

    def on_step(self, s: Any) -> None:
        if self.progress is not None and self.task is not None:
            if s.stage == "e2e":
                where = "end to end"
            else:
                where = "all blocks" if s.block is None else f"block {s.block}"
            done0, t0 = self.started
            rate = (s.done - done0) / max(time.perf_counter() - t0, 1e-9)  # this run's steps per second
            self.progress.update(self.task, completed=s.done, mse=f"{s.loss:.3e} ({where})", rate=f"{rate:.1f} step/s")

    def on_eval(self, e: Any) -> None:
        if self.progress is not None:
            self.progress.console.print(
                f"distil: validation cosine {e.metric:.4f} after {e.done} steps (best {e.best:.4f})", highlight=False
            )

    def on_end(self, r: Any) -> None:
        if self.progress is not None:
            where = f"{r.cached_batches} in memory"
            if r.spilled_batches:
                where += f", {r.spilled_batches} in a temporary file, deleted now"
            self.progress.console.print(
                f"distil: {r.steps_done} steps in {r.seconds:.0f} s, validation cosine {r.metric_before:.4f} -> "
                f"{r.metric_after:.4f}; the teacher's targets were kept for {r.cached_batches + r.spilled_batches} of "
                f"{r.batches} batches ({where})",
                highlight=False,
            )


def plan_table(plans: list[LayerPlan], config: CompressConfig) -> Table:
    table = Table(title="would compress", title_justify="left")
    table.add_column("tensor", overflow="fold")
    for col in ("shape", "dtype", "MB", "width", "max depth", "max params"):
        table.add_column(col, justify="left" if col == "dtype" else "right", no_wrap=True)
    for p in plans:
        table.add_row(
            p.name,
            f"{p.shape[0]}×{p.shape[1]}" + (" (Conv1D)" if p.transposed else ""),
            p.entry.dtype,
            f"{p.entry.nbytes / 1e6:.2f}",
            fmt(p.width),
            fmt(p.max_depth),
            fmt(2 * p.width * p.max_depth),
        )
    return table


def result_table(report: CompressReport) -> Table:
    # Numbers never wrap; long layer names fold instead, so the table stays readable at 80 columns.
    table = Table(title="sparsefit compress", title_justify="left")
    table.add_column("layer", overflow="fold", min_width=8)
    for col in ("shape", "structure", "depth", "params", "kept", "error", "SVD err", "s"):
        table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    for r in report.layers:
        data = f" (data {fmt(r.data_relative_error, 3)})" if r.data_relative_error is not None else ""
        table.add_row(
            r.name,
            f"{r.shape[0]}×{r.shape[1]}",
            r.structure,
            fmt(r.depth) if r.depth is not None and r.status == "compressed" else "—",
            fmt(r.params_after),
            f"{r.params_after / r.params_before:.3f}",
            (fmt(r.relative_error, 3) + data) if r.relative_error is not None else "—",
            fmt(r.svd_relative_error, 3),
            f"{r.seconds:.1f}",
        )
    t = report.totals()
    table.add_section()
    table.add_row(
        "total (selected)",
        "",
        f"{t['compressed_layers']}/{t['selected_layers']}",
        "",
        fmt(t["selected_params_after"]),
        f"{t['selected_params_after'] / max(1, t['selected_params_before']):.3f}",
        "",
        "",
        f"{report.seconds:.1f}",
    )
    return table


@app.command("compress")
@user_errors
def compress_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="Model folder (config.json + model.safetensors[.index.json]), .safetensors, or .pt/.pth/.bin."
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (created; an unfinished one is resumed).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Regex (full match) of tensor names to compress; repeatable.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Regex (full match) of tensor names to leave; repeatable.")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="Fixed depth for every layer.")] = None,
    target_error: Annotated[
        float | None, typer.Option(help="Per layer, the smallest depth reaching this relative error.")
    ] = None,
    keep: Annotated[
        float | None,
        typer.Option(help="Global budget: fraction of the selected layers' parameters kept, in (0, 1]."),
    ] = None,
    max_params_ratio: Annotated[
        float, typer.Option(help="Cap: G~ parameters at most this fraction of the dense layer's.")
    ] = 0.5,
    width: Annotated[str, typer.Option(help="tight (max(out,in), even), double (2·max) or an even number.")] = "tight",
    min_depth: Annotated[
        int | None, typer.Option(help="First depth tried with --target-error (default ceil(log2 width)).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Adam steps per fit.")] = 3000,
    batch: Annotated[int, typer.Option(help="Probes per step.")] = 256,
    sweeps: Annotated[
        int,
        typer.Option(
            help="Least-squares sweeps after each G~ fit (each layer's blocks solved in turn), on the data loss "
            "over the calibration inputs when there are any, else on the weight itself; they lower a G~'s error "
            "but cost more than its Adam steps at large depths (docs/quality.md §13); in rounds of two with 200 Adam "
            "steps between them (§14). 0: none.",
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seeds permutations, initialisation and probes.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    calibration: Annotated[
        str | None,
        typer.Option(
            help="builtin, a text file/folder (one sample per line; .jsonl too) or a .safetensors of recorded inputs: fit over real activations."
        ),
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option("--eval", help="Held-out quality against plain and activation-aware SVD at the same budgets."),
    ] = False,
    heldout: Annotated[
        Path | None, typer.Option(help="Held-out text for --eval (default: the builtin held-out sentences).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="With --eval: quality against kept fraction as a PNG.")] = None,
    distill: Annotated[
        str | None,
        typer.Option(
            help="After compressing, distil the model against the original on the calibration text (builtin: plus "
            "its 10,000-sentence distillation part): STEPS end-to-end steps after STEPS/4 layer-wise ones, or auto "
            "(150 layer-wise, then 3,800 end-to-end; about 13 minutes for all-MiniLM-L6-v2 on 2 CPU cores)."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be compressed; write nothing.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Reload the output and check it against the source.")
    ] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the report as JSON to FILE, or - for stdout.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table.")] = False,
) -> None:
    """Compress the linear layers of a model checkpoint into structured-sparse G~ layers.

    Example: [bold]sparsefit compress bert/ -o bert-sparse/ --target-error 0.3 --steps 2000 --json r.json[/]
    Budget, calibration, evaluation: [bold]sparsefit compress minilm/ -o out/ --keep 0.5 --calibration builtin --eval --json r.json[/]
    Parallel: [bold]torchrun --nproc-per-node 2 -m sparsefit compress bert/ -o out/ --depth 16[/]
    """
    config = CompressConfig(
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        depth=depth,
        target_error=target_error,
        keep=keep,
        max_params_ratio=max_params_ratio,
        width=width,
        min_depth=min_depth,
        fit=FitConfig(steps=steps, batch=batch, seed=seed, device=device, sweeps=sweeps),
        calibration=calibration,
    )
    dconfig = DistillConfig(steps=distill, seed=seed) if distill is not None else None
    if dconfig is not None and (calibration is None or calibration.endswith(".safetensors")):
        raise SparsefitError("--distill trains on calibration text: add --calibration builtin (or a text file/folder)")
    check_json_target(json_out)
    check_plot_target(plot)
    if plot is not None and not evaluate:
        raise SparsefitError("--plot draws the --eval results; add --eval")
    if dry_run:
        ckpt, plans = plan_checkpoint(source, config)
        if not quiet and json_out != "-":
            err_console.print(plan_table(plans, config))
            total = sum(p.entry.numel for p in plans)
            err_console.print(f"{len(plans)} tensors, {fmt(total)} parameters selected", highlight=False)
        emit_json(
            json_out,
            {
                "source": str(source),
                "dry_run": True,
                "layers": [
                    {
                        "name": p.name,
                        "shape": list(p.shape),
                        "transposed": p.transposed,
                        "dtype": p.entry.dtype,
                        "bytes": p.entry.nbytes,
                        "width": p.width,
                        "max_depth": p.max_depth,
                    }
                    for p in plans
                ],
            },
        )
        return
    if output is None:
        raise SparsefitError("give the output folder with -o/--output (or use --dry-run)")
    with torchrun_session() as (rank, _):
        quiet = quiet or rank != 0
        with LayerProgress(quiet=quiet or json_out == "-") as progress:
            try:
                report = compress_checkpoint(source, output, config, [progress])
            except Interrupted:
                if progress.progress is not None:
                    progress.progress.stop()
                err_console.print(
                    f"[yellow]interrupted:[/] finished layers are in {output}; rerun the same command to resume"
                )
                raise typer.Exit(130) from None
        if dconfig is not None and rank == 0:
            with DistillProgress("distil", quiet=quiet or json_out == "-") as dprogress:
                dreport = distill_folder(source, output, dconfig, [dprogress])
            report.distill = dreport.to_dict()
            if dreport.interrupted:
                err_console.print(
                    f"[yellow]interrupted:[/] the best distilled state is in {output}; rerun the same command to resume"
                )
                raise typer.Exit(130)
        checks = verify_compressed(output, source, seed=seed) if verify and rank == 0 else None
        evaluation = None
        if evaluate and rank == 0:
            evaluation = evaluate_compressed(
                source,
                output,
                heldout=str(heldout) if heldout is not None else None,
                curve=plot is not None,
                callbacks=[EvalProgress(quiet or json_out == "-")],
            )
            if plot is not None:
                save_plot(evaluation, str(plot))
    if rank != 0:
        return
    if not quiet and json_out != "-":
        err_console.print(result_table(report))
        if checks is not None:
            worst = max((c["relative_error"] for c in checks["layers"]), default=0.0)
            err_console.print(
                f"verify: {len(checks['layers'])} layers reload exactly as recorded (worst error {fmt(worst)})"
            )
            model = checks.get("model")
            if model and "skipped" not in model:
                err_console.print(
                    f"verify: {model['architecture']} with {model['replaced']} swapped layers: hidden-state relative error "
                    f"{fmt(model['hidden_relative_error'])}, cosine {fmt(model['hidden_cosine'])}",
                    highlight=False,
                )
        if evaluation is not None:
            err_console.print(eval_table(evaluation))
        err_console.print(f"wrote {output}", highlight=False)
    payload = report.to_dict()
    if checks is not None:
        payload["verify"] = checks
    if evaluation is not None:
        payload["eval"] = evaluation
    emit_json(json_out, payload)
