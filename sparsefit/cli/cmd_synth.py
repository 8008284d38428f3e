"""``sparsefit synth``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..fileformat import atomic_output
from ..synth import KINDS, synth
from .app import app, err_console, user_errors


@app.command("synth")
@user_errors
def synth_command(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(KINDS)}.")],
    size: Annotated[int, typer.Option(help="The matrix is size × size.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the matrix (.npy).")],
    k: Annotated[int, typer.Option(help="Rank (lowrank), band width (band), entries per row (sparse).")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Make one of the note's test matrices (lowrank, band, sparse, perm) or dct/hadamard/gaussian."""
    a = synth(kind, size, k, seed)
    with atomic_output(output) as f:
        np.save(f, a)
    err_console.print(f"wrote {output} ({kind}, {size} × {size})", highlight=False)
