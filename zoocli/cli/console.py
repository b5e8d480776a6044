"""zoo's two Rich consoles: ``console`` (stdout: tables, answers) and ``err`` (stderr: notes,
errors, progress). Imported by ``cli.common`` and ``cli.progress`` alike."""

from __future__ import annotations

import os
import sys

from rich.console import Console

from zoocli.process import reader_gone


class _Console(Console):
    """Rich's console, ending like the rest of zoo when its reader goes away (exit 141, quiet)."""

    def on_broken_pipe(self) -> None:  # rich's documented hook (its default exits 1)
        self.quiet = True
        reader_gone()


# A terminal gets its own width; a file or pipe gets 120 columns so wide tables stay readable,
# unless the standard COLUMNS variable says otherwise (Rich reads it: `COLUMNS=80 zoo ... | cat`).
# markup=False: a string cell of a table (a file name, a model's answer) is shown as it is, never
# read as Rich markup ("[/x].jpg" would crash the printer); styled text comes as Text objects.
_TTY = sys.stdout is not None and sys.stdout.isatty()
console = _Console(width=None if _TTY or os.environ.get("COLUMNS") else 120, markup=False)
err = _Console(stderr=True)
