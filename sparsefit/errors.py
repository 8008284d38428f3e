"""The one user-facing error type.

Anything the user can fix (a bad file, a bad option, an impossible request) raises
:class:`SparsefitError` with a one-line message saying what is wrong and what to do. The CLI
prints that line and exits with code 2. Any other exception is a bug.
"""

from __future__ import annotations


class SparsefitError(ValueError):
    """A problem with the user's input or request, explained in one line."""
