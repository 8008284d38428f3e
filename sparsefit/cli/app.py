"""The typer application, error handling and the shared console."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from ..errors import SparsefitError

app = typer.Typer(
    name="sparsefit",
    help="Structured-sparse approximation of dense matrices: fit G~ = B·P···B·P, export, run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

#: Human-facing output (tables, progress) goes to stderr so stdout stays clean for ``--json -``.
err_console = Console(stderr=True)
out_console = Console()

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    """Print one error line and return the exit (code 2) to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Turn :class:`SparsefitError` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SparsefitError as e:
            raise fail(str(e)) from None

    return wrapper  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="sparsefit")
