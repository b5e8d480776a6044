"""The `zoo` command: a Typer app with one module per command, each parse -> call -> render.

    ask.py      zoo ask IMAGE QUESTION        one pruned answer, its grid and timings
    score.py    zoo score IMAGE [QUESTION]    the sensitivity heatmap
    compare.py  zoo compare IMAGE QUESTION    several methods on one encoded image
    bench.py    zoo bench                     latency per method x budget
    eval.py     zoo eval [DATA...]            accuracy retention (batched, resumable, torchrun)
    kernel.py   zoo bench-kernel              the sensitivity estimators alone
    catalog.py  zoo methods / zoo models      what can be run
    serve.py    zoo serve MODEL               vLLM's OpenAI server with zoo's pruning
    common.py   what they share: option types, the method-option group, --config, errors, JSON

Known errors become one line on stderr and a non-zero exit (2 for usage errors). torch and
transformers are imported inside command bodies only, so `zoo --help`, `zoo --version` and shell
completion start without them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from zoocli.cli.ask import ask
from zoocli.cli.bench import bench
from zoocli.cli.catalog import methods, models
from zoocli.cli.common import SHOWN, error_line
from zoocli.cli.compare import compare
from zoocli.cli.eval import eval_command
from zoocli.cli.kernel import bench_kernel
from zoocli.cli.score import score
from zoocli.cli.serve import serve
from zoocli.process import INTERRUPTED, interrupted, reader_gone, std_streams, stdout_gone

class _FlagsWithoutType:
    """Help that shows no value type for a flag (not "<bool>": a flag is given or not)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class ZooGroup(_FlagsWithoutType, TyperGroup):
    """The `zoo` group (its flags: --version, --install-completion)."""


class ZooCommand(_FlagsWithoutType, TyperCommand):
    """A command whose usage line reads as the user types it: ``IMAGE QUESTION`` (required),
    ``[IMAGE]`` (optional), ``[DATA]...``."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        rv = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.name.upper()
                name = name if param.required else f"[{name}]"
                rv.append(name + ("..." if param.nargs != 1 else ""))
            else:
                rv.extend(param.get_usage_pieces(ctx))
        return rv


app = typer.Typer(
    cls=ZooGroup, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
    help="zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines).",
)


def version() -> str:
    """The installed distribution's version (package metadata), else ``zoocli.__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("zoo-prune")
    except PackageNotFoundError:
        import zoocli

        return zoocli.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"zoo {version()}")
        raise typer.Exit()


@app.callback()
def root(
    show_version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", is_eager=True,
        callback=_print_version)] = False,
) -> None:
    """zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines)."""


app.command(cls=ZooCommand)(methods)
app.command(cls=ZooCommand)(models)
app.command(cls=ZooCommand)(ask)
app.command(cls=ZooCommand)(score)
app.command(cls=ZooCommand)(compare)
app.command(cls=ZooCommand)(bench)
app.command("bench-kernel", cls=ZooCommand)(bench_kernel)
app.command("eval", cls=ZooCommand)(eval_command)
app.command(cls=ZooCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve)


def main() -> None:
    """The `zoo` entry point: like ``app()``, but a malformed command line (click's usage errors)
    is one line on stderr with click's exit code (2), not a boxed multi-line message; Ctrl-C is
    one line and exit 130 (SIGTERM, which ``zoocli.__main__.run`` turns into ``Terminated``:
    exit 143); a reader that goes away (``zoo methods | head -1``)
    a quiet exit 141 (``zoocli.process``)."""
    std_streams()
    SHOWN.clear()
    try:
        code = _invoke()
        sys.stdout.flush()  # here, not at exit: a broken pipe is caught below
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (``Terminated``)
        interrupted(e)
    except BrokenPipeError:
        if not stdout_gone():
            raise
        reader_gone()
    if code == INTERRUPTED and not SHOWN:  # Ctrl-C while typer parsed: it returns 130 silently
        interrupted()
    sys.exit(code)


def _invoke() -> int:
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # typer vendors click: recognise its exceptions by their interface
        if isinstance(e.__cause__, KeyboardInterrupt):  # click's Abort, from Ctrl-C while parsing
            raise e.__cause__ from None
        message, exit_code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
        if message is None or not isinstance(exit_code, int):
            raise
        text = " ".join(str(message()).split())
        if not text:  # `zoo` alone: the help was already shown
            return exit_code
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        error_line(f"{text}{hint}")
        return exit_code
    return code if isinstance(code, int) else 0
