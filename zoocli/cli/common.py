"""What every `zoo` command shares, declared once: the consoles, the error handler, the option
types, the method-option group (``--m --h --seed --estimator --rank --budget-scope``), ``--config``
loading, the JSON printer, the progress factory and the model / image loaders.

Only typer and rich are imported here at module level: torch and transformers load inside the
helpers that need them, so `zoo --help` starts without them.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from zoocli.errors import UsageError, ZooError

# A terminal gets its own width; a file or pipe gets 120 columns so wide tables stay readable.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def handle_errors(fn):
    """Turn user-facing failures into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZooError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            fail("out of memory: try a smaller --keep or --m, --dtype bf16, or a smaller model")
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                fail("out of memory on the device: try a smaller --keep or --m, --dtype bf16, "
                     "or --device cpu")
            raise

    return wrapper


# ------------------------------------------------------------------------- configuration file

def _coerce(key: str, val: Any, annotation: Any) -> Any:
    """A YAML value as the option's Python type, or an error naming the key."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if val is None:
            return None
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        items = val if isinstance(val, list) else [val]
        return [str(_coerce(key, v, typing.get_args(annotation)[0])) for v in items]
    if isinstance(val, (list, dict)):
        raise typer.BadParameter(f"key '{key}' must be a single value")
    scalar = isinstance(val, (int, float)) and not isinstance(val, bool)
    if annotation is bool and isinstance(val, bool):
        return val
    if annotation is int and scalar and isinstance(val, int):
        return val
    if annotation is float and scalar:
        return float(val)
    if annotation in (str, Path) and (scalar or isinstance(val, str)):
        return annotation(val) if annotation is Path else str(val)
    name = getattr(annotation, "__name__", str(annotation))
    raise typer.BadParameter(f"key '{key}' must be of type {name}, got {val!r}")


def _read_config(value: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text())
    except FileNotFoundError:
        raise typer.BadParameter(f"no such file: {value}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"cannot read {value}: {str(e).splitlines()[0]}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
    return data


def load_config(ctx: typer.Context, param: Any, value: str | None):
    """``--config zoo.yaml``: defaults for any option of this command; flags on the line win."""
    if not value:
        return value
    data = _read_config(value)
    options = {p.name: p for p in ctx.command.params
               if p.param_type_name == "option" and p.name not in ("config", "help")}
    defaults = {}
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name == "json":
            name = "json_out"
        if name not in options:
            known = ", ".join(sorted(n.replace("_out", "") for n in options))
            raise typer.BadParameter(f"{value}: unknown key '{key}' for this command; known: {known}")
        defaults[name] = _coerce(str(key), val, options[name].type_descriptor.annotation)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


# ------------------------------------------------------------------------------ option types

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="YAML file of defaults for this command's options.",
                 is_eager=True, callback=load_config),
]
ModelOpt = Annotated[str, typer.Option("--model", help="alias, offline model, HF id or local dir")]
DeviceOpt = Annotated[str, typer.Option(
    help="auto | cpu | cuda | cuda:N (eval under torchrun: one GPU per rank)")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")]
RandomOpt = Annotated[bool, typer.Option("--random-weights",
                                         help="full-size architecture of an alias, random weights")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document instead of tables")]
NoWarmupOpt = Annotated[bool, typer.Option("--no-warmup", help=(
    "time the first (cold) run; by default one untimed warm-up run comes first"))]
KeepOpt = Annotated[str, typer.Option(help="visual tokens to keep: a count (64) or a share (11%)")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="answer length limit")]
ImageArg = Annotated[str, typer.Argument(help="image file")]
QuestionArg = Annotated[str, typer.Argument(help="question about the image")]
MethodsOpt = Annotated[str, typer.Option(help=(
    "comma-separated methods, each optionally with options: zoo:estimator=jvp:rank=128 "
    "(the unpruned baseline always runs)"))]
BudgetsOpt = Annotated[str, typer.Option(help="comma-separated budgets: counts (640) or shares (11%)")]
MOpt = Annotated[int | None, typer.Option("--m", "--zoo-m", help=(
    "ZOO, sampled estimators only: number of random directions [default: 64] (under torchrun "
    "write --zoo-m: torchrun's own parser takes --m for an abbreviation of its options)"))]
HOpt = Annotated[float | None, typer.Option("--h", "--zoo-h", help=(
    "ZOO, sampled estimators only: finite-difference step [default: 0.01] (--zoo-h under torchrun)"))]
SeedOpt = Annotated[int, typer.Option(help="seed of the random directions / random method")]
EstOpt = Annotated[str, typer.Option(help=(
    "ZOO sensitivity: exact (closed form, no sampling) | fd (the paper's sampled Eq. 2-3) | jvp | naive"))]
RankOpt = Annotated[int | None, typer.Option(help="ZOO: low-rank (truncated SVD) second Linear")]
ScopeOpt = Annotated[str, typer.Option("--budget-scope", help=(
    "crop: budget split over LLaVA-NeXT crops; global: one selection"))]


# ---------------------------------------------------------------------- the method options

@dataclass(frozen=True)
class MethodOptions:
    """The method-option group every command that runs a method takes (declared once here)."""

    m: int | None = None  # None: not given (exact takes none; the sampled estimators use 64)
    h: float | None = None  # None: not given (the sampled estimators use 0.01)
    seed: int = 0
    estimator: str = "exact"
    rank: int | None = None
    budget_scope: str = "crop"

    def zoo(self) -> dict[str, Any]:
        """The ZOO options (m, h, estimator, rank), validated: a UsageError names the flag. With
        ``exact`` only the estimator (m, h and rank are the sampled estimators' options); with a
        sampled estimator m and h are filled with the paper's defaults when not given."""
        import math

        from zoocli.pipeline import BUDGET_SCOPES
        from zoocli.sensitivity import SEED_MAX, SEED_MIN

        if not SEED_MIN <= self.seed <= SEED_MAX:  # what torch.Generator.manual_seed takes
            raise UsageError(f"--seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.m is not None and self.m <= 0:
            raise UsageError(f"--m must be at least 1, got {self.m}")
        if self.h is not None and (not math.isfinite(self.h) or self.h <= 0):
            raise UsageError(f"--h must be a positive number, got {self.h}")
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"--estimator {self.estimator!r}: choose {', '.join(ESTIMATORS)}")
        if self.rank is not None and self.rank <= 0:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.estimator == "exact":
            given = [f"--{k}" for k in ("m", "h", "rank") if getattr(self, k) is not None]
            if given:
                what = "is an option" if len(given) == 1 else "are options"
                raise UsageError(f"{'/'.join(given)} {what} of the sampled estimators (fd, jvp, naive); "
                                 "the default --estimator exact computes the sensitivity in closed "
                                 "form: add --estimator fd for the paper's sampled form")
        if self.budget_scope not in BUDGET_SCOPES:
            raise UsageError(f"--budget-scope {self.budget_scope!r}: choose one of "
                             f"{', '.join(BUDGET_SCOPES)}")
        if self.estimator == "exact":
            return {"estimator": "exact"}
        return {"m": 64 if self.m is None else self.m, "h": 0.01 if self.h is None else self.h,
                "estimator": self.estimator, "rank": self.rank}


ESTIMATORS = ("exact", "fd", "jvp", "naive")


_GROUP = {"m": MOpt, "h": HOpt, "seed": SeedOpt, "estimator": EstOpt, "rank": RankOpt,
          "budget_scope": ScopeOpt}


def method_options(*, budget_scope: bool = True):
    """Decorator: the command's ``opts: MethodOptions`` parameter becomes the option group on the
    command line (``--budget-scope`` left out where nothing is selected, e.g. `score`)."""
    names = [f.name for f in fields(MethodOptions) if budget_scope or f.name != "budget_scope"]
    defaults = {f.name: f.default for f in fields(MethodOptions)}

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        group = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n],
                                   annotation=_GROUP[n]) for n in names]
        params = []
        for p in sig.parameters.values():
            if p.name == "opts":
                params += group
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(fn)
        def wrapper(**kwargs):
            opts = MethodOptions(**{n: kwargs.pop(n) for n in names})
            return fn(**kwargs, opts=opts)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


# ------------------------------------------------------------------------------ small helpers

def split_list(text: str, what: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is a usage error naming the flag."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what} is empty")
    return items


def question_text(q: str) -> str:
    if not q or not q.strip():
        raise UsageError("the question is empty")
    return q.strip()


def early_checks(question: str, keep: str, specs: list[str], max_new_tokens: int,
                 overlay: Path | None, opts: MethodOptions) -> tuple[str, list, dict[str, Any]]:
    """What `ask` and `compare` validate before anything is loaded: (question, parsed method
    specs, ZOO options)."""
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import parse_keep

    question = question_text(question)
    parsed = [parse_method_spec(spec) for spec in specs]
    parse_keep(keep, 10**9)  # syntax and sign; the token count is known after encoding
    zoo = opts.zoo()
    if max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_out_file(overlay, "--overlay")
    return question, parsed, zoo


def finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None: they are not JSON."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def progress(unit: str | None = None, disable: bool = False):
    """A transient progress bar on stderr; ``unit`` adds a rate column (``2.1 samples/s``)."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:.2f} {unit}/s", style="progress.data.speed")

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns += [RateColumn(), TimeElapsedColumn(), TextColumn("eta")]
    return Progress(*columns, TimeRemainingColumn(), console=err, transient=True, disable=disable)


def load_model(model: str, device: str, dtype: str, random_weights: bool, quiet: bool = False):
    """The adapter of ``model``, with a status line while it loads."""
    import contextlib

    from zoocli.adapters import load_adapter

    with contextlib.nullcontext() if quiet else err.status(f"loading {model}…"):
        return load_adapter(model, device=device, dtype=dtype, random_weights=random_weights)


def load_image(path: str):
    from zoocli.images import load_image as load

    return load(path)


def check_out_file(path: Path | None, option: str) -> None:
    """Refuse, before any model loads, an output path that cannot be a file (a directory, or in a
    folder that does not exist); other write failures are reported when the file is written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if path.parent and not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")


def save_png(im, path: Path) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        im.save(path, format="PNG")
    except OSError as e:
        raise ZooError(f"cannot write {path}: {e.strerror or e}") from None
    err.print(f"wrote {path}", highlight=False)
