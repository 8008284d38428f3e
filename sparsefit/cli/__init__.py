"""The ``sparsefit`` command line: a thin typer layer over the library.

Each command lives in its own module and registers itself on :data:`app`; rich is imported
only inside this package.
"""

from __future__ import annotations

from .app import app, main

# Each command module registers itself on ``app`` when imported.
from . import cmd_apply, cmd_bench, cmd_compress, cmd_eval, cmd_fit, cmd_info, cmd_synth  # noqa: E402,F401  isort: skip

__all__ = ["app", "main"]
