"""What every `zoo` command shares, declared once: the error handler, the option
types, the method-option group (``--m --h --seed --estimator --rank --budget-scope``), ``--config``
loading, the JSON printer and the model / image loaders (progress: ``cli.progress``; the consoles:
``cli.console``, re-exported).

Only typer and rich are imported here at module level: torch and transformers load inside the
helpers that need them, so `zoo --help` starts without them.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from zoocli.cli.console import console, err  # noqa: F401  (the consoles; cli.progress prints on them too)
from zoocli.errors import UsageError, ZooError, is_out_of_memory
from zoocli.process import INTERRUPTED, TERMINATED, Terminated, reader_gone, stdout_gone
from zoocli.text import question_text  # noqa: F401  (re-exported for the commands)


_LONG_WORD = 240  # a word of a message longer than this (a 10,000-character path) is shortened
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {9: "\\t", 10: "\\n", 13: "\\r"}


def one_line(message: str) -> str:
    """``message`` as one readable line: control characters (a newline in a file name) written
    as escapes, and any word over 240 characters shortened to its start and end with the count."""
    words = str(message).translate(_CONTROL).split(" ")
    return " ".join(w if len(w) <= _LONG_WORD else f"{w[:100]}…{w[-40:]} ({len(w)} characters)"
                    for w in words)


def _line(tag: str, style: str, message: str):
    from rich.text import Text

    return Text.assemble((tag, style), " ", one_line(message))  # Text: user strings are never markup


SHOWN: list[str] = []  # the error lines printed by this process (``main`` prints one for Ctrl-C if none)


def error_line(message: str) -> None:
    """Print ``error: MESSAGE`` on stderr as one line; the message is plain text, not markup."""
    SHOWN.append(message)
    err.print(_line("error:", "red", message), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    error_line(message)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(_line("warning:", "yellow", message), highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A plain status line on stderr (``wrote out.png``): never read as markup."""
    err.print(one_line(message), highlight=False, markup=False, soft_wrap=True)


def handle_errors(fn):
    """Turn user-facing failures into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZooError as e:
            fail(str(e), e.exit_code)
        except Terminated:  # SIGTERM (``zoocli.process``): the locks were released on the way out
            fail("terminated", TERMINATED)
        except KeyboardInterrupt:
            fail("interrupted", INTERRUPTED)
        except BrokenPipeError as e:
            if stdout_gone():  # `zoo methods | head -1`: the reader has what it wanted
                reader_gone()
            fail(f"a connection closed under zoo (broken pipe: {e.strerror or e})")
        except MemoryError as e:
            fail(out_of_memory(e))
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if is_out_of_memory(e):
                fail(out_of_memory(e))
            raise

    return wrapper


def out_of_memory(e: BaseException) -> str:
    """The one line for an allocation failure: what failed to allocate, no guess at which option
    caused it (memory runs out while loading as well as while running)."""
    import re

    detail = re.sub(r"^\[enforce fail[^\]]*\]\s*(data\.\s*)?", "", " ".join(str(e).split()))
    detail = ". ".join(detail.split(". ")[:2])[:200]  # what failed and how much it asked for
    cuda = "cuda" in detail.lower() or type(e).__name__ == "OutOfMemoryError"
    where = "on the GPU" if cuda else "in this process"
    return (f"out of memory {where}{f' ({detail})' if detail else ''}: the model and this input "
            f"need more memory than zoo can get; a smaller model or input, or --dtype bf16, needs less")


# ------------------------------------------------------------------------- configuration file

# Options that take a comma-separated list on the command line: in --config also a YAML list
# (``methods: [zoo, divprune]``, ``budgets: [192, 128]``).
LIST_OPTIONS = ("methods", "budgets")
MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few lines; 1 MiB bounds what is parsed


def _coerce(key: str, val: Any, annotation: Any, name: str = "") -> Any:
    """A YAML value as the option's Python type, or an error naming the key."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if val is None:
            return None
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        items = val if isinstance(val, list) else [val]
        return [str(_coerce(key, v, typing.get_args(annotation)[0])) for v in items]
    if name in LIST_OPTIONS and annotation is str and isinstance(val, list):
        if any(isinstance(v, (list, dict, bool)) or v is None for v in val):
            raise typer.BadParameter(f"key '{key}' must be a list of single values, e.g. "
                                     f"{key}: [a, b], or one comma-separated string")
        return ",".join(str(v) for v in val)
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
    type_name = getattr(annotation, "__name__", str(annotation))
    raise typer.BadParameter(f"key '{key}' must be of type {type_name}, got {_shown(val)}")


def _shown(val: Any) -> str:
    """A YAML value for a message: its repr, cut short (a 5000-character string, a date)."""
    try:
        text = repr(val)
    except ValueError:  # an int over Python's digit limit
        text = f"an integer of over {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} characters)"


def _config_text(value: str) -> str:
    """The text of --config ``value``: a regular file (a FIFO or device is refused without being
    opened, so it cannot hang), at most ``MAX_CONFIG_BYTES``, UTF-8."""
    from zoocli.outfile import check_regular

    try:
        if not check_regular(value, "--config"):
            raise typer.BadParameter(f"no such file: {value}")
        with open(value, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except ZooError as e:
        raise typer.BadParameter(str(e)) from None
    except OSError as e:
        raise typer.BadParameter(f"cannot read {value}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise typer.BadParameter(f"{value} is over {MAX_CONFIG_BYTES >> 20} MiB; a configuration "
                                 f"file holds a few option values")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise typer.BadParameter(f"{value} is not UTF-8 text (byte {e.start})") from None


def _yaml_problem(e: Exception) -> str:
    """What PyYAML found wrong, with its place: "found unhashable key (line 1, column 3)"."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        return (str(e).splitlines() or ["not valid YAML"])[0]
    return problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def _unique_keys_loader():
    """PyYAML's safe loader, but a key written twice in one mapping is an error naming it and
    its line (plain PyYAML keeps the last one silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
                seen: dict = {}
                for key_node, _value in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        if key in seen:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"key {_shown(key)} is given twice (first on line "
                                f"{seen[key]}); keep one", key_node.start_mark)
                        seen[key] = key_node.start_mark.line + 1
                    except TypeError:  # unhashable: the base class says so, with its place
                        break
            return super().construct_mapping(node, deep=deep)

    return Loader


def _read_config(value: str) -> dict:
    import yaml

    text = _config_text(value)
    try:
        data = yaml.load(text, Loader=_unique_keys_loader())  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise typer.BadParameter(f"cannot read {value}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise typer.BadParameter(f"cannot read {value}: it is nested too deeply") from None
    except (ValueError, OverflowError):  # an integer over Python's digit limit (4300)
        raise typer.BadParameter(f"cannot read {value}: it holds a number of over "
                                 f"{sys.get_int_max_str_digits()} digits") from None
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
    defaults, spelled = {}, {}
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name == "json":
            name = "json_out"
        if name not in options:
            known = ", ".join(sorted(n.replace("_out", "") for n in options))
            raise typer.BadParameter(f"{value}: unknown key {_shown(str(key))} for this command; "
                                     f"known: {known}")
        if name in spelled:  # max-new-tokens and max_new_tokens: which one was meant?
            raise typer.BadParameter(f"{value}: keys {_shown(str(spelled[name]))} and "
                                     f"{_shown(str(key))} are the same option; keep one")
        spelled[name] = key
        defaults[name] = _coerce(str(key), val, options[name].type_descriptor.annotation, name)
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
WARM_REPEATS = 3  # ask / compare: timed warm runs by default (median, spread shown)
WarmRepeatsOpt = Annotated[int | None, typer.Option("--repeats", show_default=False, help=(
    f"timed runs (default {WARM_REPEATS}; 1 with --no-warmup, the cold run): timings are their medians, "
    "speed-ups the median of per-run ratios, with the spread"))]


def warm_repeats(repeats: int | None, no_warmup: bool) -> int:
    """--repeats as given (checked), else 3 warm runs, or the one cold run of --no-warmup."""
    if repeats is None:
        return 1 if no_warmup else WARM_REPEATS
    check_int("--repeats", repeats, 1, MAX_REPEATS)
    return repeats
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
BackendOpt = Annotated[str, typer.Option("--select-backend", help=(
    "greedy selection (zoo, sum, divprune): auto (the fused Triton kernel on CUDA, else torch) | "
    "torch | triton; the same picks"))]
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
    select_backend: str = "auto"
    budget_scope: str = "crop"

    def zoo(self) -> dict[str, Any]:
        """The ZOO options (m, h, estimator, rank), validated: a UsageError names the flag. With
        ``exact`` only the estimator (m, h and rank are the sampled estimators' options); with a
        sampled estimator m and h are filled with the paper's defaults when not given."""
        import math

        from zoocli.pipeline import BUDGET_SCOPES
        from zoocli.sensitivity import H_MAX, H_MIN, H_WHY, M_MAX, SEED_MAX, SEED_MIN

        if not SEED_MIN <= self.seed <= SEED_MAX:  # what torch.Generator.manual_seed takes
            raise UsageError(f"--seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.m is not None:
            check_int("--m", self.m, 1, M_MAX)
        if self.h is not None and (not math.isfinite(self.h) or not H_MIN <= self.h <= H_MAX):
            what = "a positive number" if not self.h > 0 else "a number"
            raise UsageError(f"--h must be {what} in [{H_MIN:g}, {H_MAX:g}] ({H_WHY}), got {self.h:g}")
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"--estimator {self.estimator!r}: choose {', '.join(ESTIMATORS)}")
        if self.rank is not None:
            check_int("--rank", self.rank, 1, M_MAX)
        if self.estimator == "exact":
            given = [f"--{k}" for k in ("m", "h", "rank") if getattr(self, k) is not None]
            if given:
                what = "is an option" if len(given) == 1 else "are options"
                raise UsageError(f"{'/'.join(given)} {what} of the sampled estimators (fd, jvp, naive); "
                                 "the default --estimator exact computes the sensitivity in closed "
                                 "form: add --estimator fd for the paper's sampled form")
        from zoocli.greedy import BACKENDS

        if self.select_backend not in BACKENDS:
            raise UsageError(f"--select-backend {self.select_backend!r}: choose {', '.join(BACKENDS)}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise UsageError(f"--budget-scope {self.budget_scope!r}: choose one of "
                             f"{', '.join(BUDGET_SCOPES)}")
        # the backend only when chosen: rows of an earlier --out keep their keys
        backend = {} if self.select_backend == "auto" else {"backend": self.select_backend}
        if self.estimator == "exact":
            return {"estimator": "exact", **backend}
        return {"m": 64 if self.m is None else self.m, "h": 0.01 if self.h is None else self.h,
                "estimator": self.estimator, "rank": self.rank, **backend}


ESTIMATORS = ("exact", "fd", "jvp", "naive")


_GROUP = {"m": MOpt, "h": HOpt, "seed": SeedOpt, "estimator": EstOpt, "rank": RankOpt,
          "select_backend": BackendOpt, "budget_scope": ScopeOpt}


def method_options(*, budget_scope: bool = True):
    """Decorator: the command's ``opts: MethodOptions`` parameter becomes the option group on the
    command line (``--budget-scope`` and ``--select-backend`` left out where nothing is selected, e.g. `score`)."""
    names = [f.name for f in fields(MethodOptions)
             if budget_scope or f.name not in ("budget_scope", "select_backend")]
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

# Upper bounds of the numeric flags: far above any sensible run, low enough that a typo (a
# 20-digit number) is refused before anything loads instead of running for ever or overflowing.
MAX_NEW_TOKENS = 32768  # Qwen2.5-VL's native context; LLaVA's is 4096
MAX_REPEATS = 100_000  # --repeats and --warmup
MAX_BATCH = 4096  # eval --batch-size
MAX_TOP = 1_000_000  # score --top (more than any image's visual tokens: all are listed)


def check_int(flag: str, value: int, low: int, high: int) -> int:
    """``value`` when ``low <= value <= high``, else a ``UsageError`` naming ``flag`` and the range
    (a command line or --config value of 5000 digits is shown shortened)."""
    if not low <= value <= high:
        raise UsageError(f"{flag} must be at least {low} and at most {high}, got {value}")
    return value


def split_list(text: str, what: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is a usage error naming the flag."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what} is empty")
    return items


def unique(items: list[str], flag: str, key=None) -> list[str]:
    """``items`` without repeats (the first spelling kept; ``key`` says when two are the same,
    e.g. ``zoo:m=4`` and ``zoo:m=4.0``); what was dropped is said in one note line."""
    seen: dict = {}
    dropped = []
    for item in items:
        k = item if key is None else key(item)
        if k in seen:
            dropped.append(item if item == seen[k] else f"{item} (= {seen[k]})")
        else:
            seen[k] = item
    if dropped:
        note(f"{flag}: {', '.join(dict.fromkeys(dropped))} listed more than once; each is run once")
    return list(seen.values())


def method_key(spec: str):
    """What makes two method specs the same run: the method and its options (any order)."""
    from zoocli.methods import parse_method_spec

    name, opts = parse_method_spec(spec)
    return name, tuple(sorted((k, repr(v)) for k, v in opts.items()))


def budget_key(text: str):
    """What makes two budgets the same: ``64`` and `` 64``, ``11%`` and ``11 %``."""
    from zoocli.eval_runner import budget_value

    return budget_value(text)


def early_checks(question: str, keep: str, specs: list[str], max_new_tokens: int,
                 overlay: Path | None, opts: MethodOptions,
                 inputs: tuple = ()) -> tuple[str, list, dict[str, Any]]:
    """What `ask` and `compare` validate before anything is loaded: (question, parsed method
    specs, ZOO options); ``inputs``: the files the command reads (--overlay may not be one)."""
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import parse_keep

    question = question_text(question)
    parsed = [parse_method_spec(spec) for spec in specs]
    parse_keep(keep, 10**9)  # syntax and sign; the token count is known after encoding
    zoo = opts.zoo()
    check_int("--max-new-tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    check_overlay(overlay, inputs)
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


def load_model(model: str, device: str, dtype: str, random_weights: bool, quiet: bool = False):
    """The adapter of ``model``, with what is happening while it loads (``cli.progress.loading``)."""
    from zoocli.adapters import load_adapter
    from zoocli.cli.progress import loading

    with loading(model, quiet) as on_status:
        return load_adapter(model, device=device, dtype=dtype, random_weights=random_weights,
                            on_status=on_status)


def load_image(path: str):
    """The image at ``path`` (RGB), or a one-line ``ZooError`` naming the file. Loaded before the
    model, so a bad file fails fast; ``check_images`` adds the model family's limits after."""
    from zoocli.images import load_image as load

    return load(path)


def check_images(adapter, paths: list[str], images: list) -> None:
    """Each image against what ``adapter``'s family can take (aspect ratio), naming the file
    (``adapter.prepare`` would refuse it too, but without its name)."""
    for path, im in zip(paths, images, strict=True):
        adapter.check_image(im.size, path)


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


def check_overlay(path: Path | None, inputs: tuple = ()) -> None:
    """Refuse, before any model loads, an --overlay that zoo must not write (``outfile``'s rule:
    new, empty or a PNG zoo wrote; never one of ``inputs``, e.g. the image; never a FIFO)."""
    from zoocli.outfile import check_png_target

    check_out_file(path, "--overlay")
    if path is not None:
        check_png_target(path, "--overlay", inputs)


def save_png(im, path: Path, inputs: tuple = ()) -> None:
    """Write ``im`` as --overlay ``path`` under ``outfile``'s rule (atomically, signed as zoo's)."""
    from zoocli.outfile import save_png as save

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    save(im, path, "--overlay", inputs)
    note(f"wrote {path}")
