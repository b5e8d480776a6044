"""`python -m zoocli` is the `zoo` command (and ``run`` is the `zoo` console script).

Closed standard streams are reopened and Ctrl-C and SIGTERM are caught before the CLI is imported, so an
interrupt in the first second is one line and exit 130, never an import traceback
(``zoocli.process``).
"""

from __future__ import annotations

from zoocli.process import handle_sigterm, interrupted, std_streams


def run() -> None:
    """The `zoo` entry point: ``zoocli.cli.main`` behind a guard for the time it takes to import."""
    std_streams()
    handle_sigterm()
    try:
        from zoocli.cli import main
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (``Terminated``)
        interrupted(e)
    main()


if __name__ == "__main__":
    run()
