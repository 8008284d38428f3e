"""Rich rendering shared by the commands: progress bars, tables, JSON output."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..fileformat import check_output_path, save_text
from .app import err_console


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.{digits}g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.{digits - 1}e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class FitProgress:
    """A fit callback that drives a rich progress bar (on stderr)."""

    def __init__(self, description: str, quiet: bool = False) -> None:
        self.quiet = quiet
        self.description = description
        self.progress: Progress | None = None
        self.task = None
        self.sweep_task = None

    def __enter__(self) -> FitProgress:
        if not self.quiet:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("mse {task.fields[mse]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def on_start(self, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(self.description, total=info["steps"], mse="—", rate="—")

    def on_step(self, s: Any) -> None:
        if self.progress is not None and self.task is not None:
            rate = s.step / s.seconds if s.seconds > 0 else 0.0
            self.progress.update(self.task, completed=s.step, mse=f"{s.mse:.3e}", rate=f"{rate:.0f} step/s")

    def on_sweep(self, s: Any) -> None:
        """Least-squares sweeps after the steps: a second bar."""
        if self.progress is None:
            return
        if self.sweep_task is None:
            self.sweep_task = self.progress.add_task("sweeps", total=s.total, mse="—", rate="—")
        rate = f"{60 * s.sweep / s.seconds:.1f} sweep/min" if s.sweep and s.seconds > 0 else "—"
        label = "sweeps" if s.rounds == 1 else f"sweeps, round {s.round}/{s.rounds}"
        self.progress.update(self.sweep_task, description=label, completed=s.sweep, mse=f"{s.mse:.3e}", rate=rate)


def check_json_target(path: str | None) -> None:
    """Fail before long work if the --json file cannot be written."""
    if path and path != "-":
        check_output_path(path)


def emit_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (``-`` = stdout), atomically for files."""
    if not path:
        return
    text = json.dumps(payload, indent=2, sort_keys=False, default=str)
    if path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    save_text(path, text + "\n")


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table
