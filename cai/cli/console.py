"""The terminal: rich consoles, tables, error messages, and keeping libraries' own output out of it."""

from __future__ import annotations

import logging
import warnings

from rich.markup import escape

from cai.core.errors import CaiError

__all__ = ["console", "escape", "print_error", "quiet_libraries", "table"]


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def table(title: str):
    from rich.table import Table

    return Table(title=title, show_header=False, title_justify="left")


def print_error(e: CaiError) -> None:
    # soft_wrap: one issue stays on one line however narrow the terminal (or a pipe: 80 columns), so that
    # "file:line: field: message" can be grepped and jumped to
    err = console(stderr=True)
    err.print(f"[bold red]error:[/] {e.message}", markup=True, highlight=False, soft_wrap=True)
    for issue in e.issues:
        err.print(f"  {issue}", markup=False, soft_wrap=True)
    if e.hint:
        err.print(e.hint, markup=False, soft_wrap=True)


# Warnings that are about the libraries' own future, not the user's work: never shown. Ours (and a library's
# UserWarning about the user's input, e.g. a truncated generation) still are.
_LIBRARY_CHATTER = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def quiet_libraries(heavy: bool = True) -> None:
    """Our progress bars and messages only: no library progress bars, info logs or deprecation chatter.
    ``heavy=False`` sets the filters without importing transformers (for commands that may not load it)."""
    for category in _LIBRARY_CHATTER:
        warnings.filterwarnings("ignore", category=category)
    # bitsandbytes looks for an optional CPU kernel on the hub at import and warns when it is not there; the
    # built-in CPU path is used instead, so the warning is noise
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not heavy:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
