"""The offline demo model of issue 14: a synthetic world (``world``), its eval set (``evalset``),
the LLaVA-architecture demo model (``model``), its training script (``python -m zoocli.demo.train``)
and reports on the trained model (``table``, ``projector``, ``heat``). ``--model demo-llava`` loads
the shipped checkpoint through ``zoocli.adapters.load_adapter``."""


def cli_description(doc: str) -> str:
    """A module docstring's first line as an ``--help`` description: without the trailing
    ``python -m ...`` literal or colon that the docstring uses to introduce itself."""
    return doc.splitlines()[0].split("``")[0].rstrip(" :")


def run_cli(main) -> int:
    """``sys.exit(run_cli(main))`` for the demo scripts: zoo's one-line errors and exit codes
    (``cli.common.handle_errors``) instead of a traceback."""
    import typer

    from zoocli.cli.common import handle_errors

    try:
        return handle_errors(main)()
    except typer.Exit as e:
        return e.exit_code


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def check_new_folder(parser, path, flag: str) -> None:
    """Refuse (``parser.error``, one line, exit 2) a ``path`` that exists and is not an empty
    folder: the demo scripts write checkpoints and eval sets, and never over what is there."""
    if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        parser.error(f"{flag} {path} exists and is not an empty folder; give a new one (nothing is overwritten)")
