"""sparsefit: structured-sparse approximation of dense matrices.

A dense ``out × in`` matrix ``A`` is approximated by ``G~ = B_{N-1}P_{N-1} ··· B_0P_0``: ``N``
layers, each a fixed random permutation followed by a block-diagonal matrix of 2×2 blocks.

Example
-------
>>> import numpy as np, sparsefit
>>> A = sparsefit.synth("perm", size=64, seed=0)
>>> result = sparsefit.fit(A, sparsefit.FitConfig(depth=12, steps=300))   # doctest: +SKIP
>>> result.metrics.relative_error                                          # doctest: +SKIP

Importing this package does not import typer or rich and does not initialise CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .autosize import fit_auto
from .config import FitConfig, Phase
from .errors import SparsefitError
from .fileformat import load, read_header, save
from .fitting import FitMetrics, FitResult, StepInfo, evaluate, fit
from .nn import SparseLinear
from .operator import GTilde
from .synth import synth
from .targets import Target, as_target, load_target

__all__ = [
    "FitConfig",
    "FitMetrics",
    "FitResult",
    "GTilde",
    "Phase",
    "SparseLinear",
    "SparsefitError",
    "StepInfo",
    "Target",
    "__version__",
    "as_target",
    "evaluate",
    "fit",
    "fit_auto",
    "load",
    "load_target",
    "read_header",
    "save",
    "synth",
    # checkpoint compression, imported on first use (see __getattr__)
    "CompressConfig",
    "compress_",
    "compress_checkpoint",
    "load_compressed",
    "record_activations",
]

_LAZY = {
    "CompressConfig": "compress",
    "compress_": "compress",
    "compress_checkpoint": "compress",
    "load_compressed": "compress",
    "record_activations": "calibration",
}


def __getattr__(name: str):  # PEP 562: keep ``import sparsefit`` lean
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
