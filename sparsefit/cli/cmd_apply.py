"""``sparsefit apply``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from ..errors import SparsefitError
from ..fileformat import atomic_output, check_output_path
from ..nn import SparseLinear
from ..targets import check_matrix, read_npy
from .app import app, err_console, user_errors


def read_vectors(path: Path, in_features: int) -> torch.Tensor:
    """Rows of a .npy file (or one vector) as a checked ``(batch, in_features)`` tensor."""
    arr = read_npy(path)
    if isinstance(arr, np.ndarray) and arr.ndim == 1:
        arr = arr[None, :]
    x = check_matrix(arr, str(path))
    if x.shape[1] != in_features:
        raise SparsefitError(f"{path}: rows have {x.shape[1]} entries, the operator expects {in_features}")
    return x


@app.command("apply")
@user_errors
def apply_command(
    file: Annotated[Path, typer.Argument(help="A sparsefit .safetensors file.")],
    vectors: Annotated[
        Path, typer.Argument(help=".npy of shape (batch, in_features) (or one vector); each row is a vector x.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write G~x for each row (.npy).")],
    backend: Annotated[
        str, typer.Option(help="auto, reference, torch, cpu (fused numba) or cuda (fused Triton).")
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Apply an exported G~ to the rows of X: writes Y with row i = G~ · (row i of X), plus the bias if the file has one."""
    out = check_output_path(output)
    if device not in ("cpu", "cuda"):
        raise SparsefitError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SparsefitError("--device cuda was asked for but no CUDA GPU is available")
    layer = SparseLinear.from_file(file, device=device, backend=backend)
    x = read_vectors(vectors, layer.in_features).to(device=device, dtype=layer.operator.blocks.dtype)
    with torch.no_grad():
        y = layer(x).cpu().numpy()
    with atomic_output(out) as f:
        np.save(f, y)
    err_console.print(f"wrote {out} ({y.shape[0]} × {y.shape[1]})", highlight=False)
