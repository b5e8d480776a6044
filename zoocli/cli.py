"""The `zoo` command: parse options, call the pipeline, print what render returns.

Known errors become one line on stderr and a non-zero exit (2 for usage errors). torch and
transformers are imported inside commands so `zoo --help` and `zoo methods` start fast.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console

from zoocli.errors import UsageError, ZooError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines).",
)
console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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

def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    """``--config zoo.yaml``: defaults for any option of this command; flags on the line win."""
    if not value:
        return value
    import yaml

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise click.BadParameter(f"no such file: {value}") from None
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"cannot read {value}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value}: expected a mapping of option names to values")
    names = {p.name: p for p in ctx.command.params if p.name not in ("config",)}
    defaults = {}
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name not in names or isinstance(names[name], click.Argument):
            known = ", ".join(sorted(n for n, p in names.items() if isinstance(p, click.Option)))
            raise click.BadParameter(f"{value}: unknown key '{key}' for this command; known: {known}")
        if isinstance(val, list):
            val = ",".join(str(v) for v in val)
        if isinstance(val, dict):
            raise click.BadParameter(f"{value}: key '{key}' must be a single value, not a mapping")
        try:
            val = names[name].type_cast_value(ctx, val)
        except click.BadParameter as e:
            raise click.BadParameter(f"{value}: key '{key}': {e.message}") from None
        defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="YAML file of defaults for this command's options.",
                 is_eager=True, callback=_load_config),
]
ModelOpt = Annotated[str, typer.Option("--model", help="alias, offline model, HF id or local dir")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")]
RandomOpt = Annotated[bool, typer.Option("--random-weights",
                                         help="full-size architecture of an alias, random weights")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document instead of tables")]
MOpt = Annotated[int, typer.Option("--m", help="ZOO: number of random directions")]
HOpt = Annotated[float, typer.Option("--h", help="ZOO: finite-difference step")]
SeedOpt = Annotated[int, typer.Option(help="seed of the random directions / random method")]
EstOpt = Annotated[str, typer.Option(help="ZOO estimator: fd | jvp | naive")]
RankOpt = Annotated[int | None, typer.Option(help="ZOO: low-rank (truncated SVD) second Linear")]
ScopeOpt = Annotated[str, typer.Option("--budget-scope",
                                       help="crop: budget split over LLaVA-NeXT crops; global: one selection")]


def _zoo_options(m: int, h: float, estimator: str, rank: int | None) -> dict[str, Any]:
    import math

    if m <= 0:
        raise UsageError(f"--m must be at least 1, got {m}")
    if not math.isfinite(h) or h <= 0:
        raise UsageError(f"--h must be a positive number, got {h}")
    if estimator not in ("fd", "jvp", "naive"):
        raise UsageError(f"--estimator {estimator!r}: choose fd, jvp or naive")
    if rank is not None and rank <= 0:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    return {"m": m, "h": h, "estimator": estimator, "rank": rank}


def _load(model: str, device: str, dtype: str, random_weights: bool):
    from zoocli.adapters import load_adapter

    with err.status(f"loading {model}…"):
        return load_adapter(model, device=device, dtype=dtype, random_weights=random_weights)


def _image(path: str):
    from zoocli.images import load_image

    return load_image(path)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _question(q: str) -> str:
    if not q or not q.strip():
        raise UsageError("the question is empty")
    return q.strip()


# ------------------------------------------------------------------------------------ commands

@app.command()
@handle_errors
def methods(json_out: JsonOpt = False) -> None:
    """List the registered token-selection methods."""
    from zoocli import METHODS
    from zoocli.render import methods_table

    if json_out:
        _print_json([
            {"name": m.name, "stage": m.stage, "families": sorted(m.families), "summary": m.summary,
             "paper": m.paper, "deviation": m.deviation, "needs": sorted(m.needs),
             "options": dict(m.options)}
            for m in METHODS.values()
        ])
        return
    console.print(methods_table(METHODS.values()))


@app.command()
@handle_errors
def models(json_out: JsonOpt = False) -> None:
    """List model aliases and the offline models."""
    from rich.table import Table

    from zoocli.adapters import MODEL_ALIASES, OFFLINE_MODELS

    rows = [(k, v, "download / HF cache") for k, v in MODEL_ALIASES.items()]
    rows += [(k, v[0], "built offline, random weights") for k, v in OFFLINE_MODELS.items()]
    if json_out:
        _print_json([{"name": a, "target": b, "source": c} for a, b, c in rows])
        return
    t = Table(title="models", title_justify="left")
    for col in ("name", "HF id / family", "source"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    console.print(t)


@app.command()
@handle_errors
def ask(
    image: Annotated[str, typer.Argument(help="image file")],
    question: Annotated[str, typer.Argument(help="question about the image")],
    keep: Annotated[str, typer.Option(help="visual tokens to keep: a count (64) or a share (11%)")] = "64",
    method: Annotated[str, typer.Option(help="selection method (see `zoo methods`)")] = "zoo",
    m: MOpt = 64, h: HOpt = 0.01, seed: SeedOpt = 0, estimator: EstOpt = "fd", rank: RankOpt = None,
    model: ModelOpt = "llava-1.5", device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    random_weights: RandomOpt = False,
    max_new_tokens: Annotated[int, typer.Option(help="answer length limit")] = 64,
    budget_scope: ScopeOpt = "crop",
    overlay: Annotated[Path | None, typer.Option(help="write a PNG with dropped patches dimmed")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Answer a question about an image with only --keep visual tokens."""
    from zoocli.methods import get_method
    from zoocli.pipeline import run_one
    from zoocli.render import answer_panel, grids_panel, overlay as draw_overlay, timings_table

    question = _question(question)
    get_method(method)
    opts = _zoo_options(m, h, estimator, rank)
    if max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    img = _image(image)
    adapter = _load(model, device, dtype, random_weights)
    warnings: list[str] = []
    res = run_one(adapter, img, question, method, keep, scope=budget_scope, seed=seed,
                  options={**opts}, max_new_tokens=max_new_tokens, warnings=warnings)
    for w in warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    if overlay is not None:
        _save_png(draw_overlay(img, res.scopes), overlay)
    if json_out:
        d = res.as_dict()
        d.pop("scopes")
        _print_json(d)
        return
    console.print(answer_panel(res.as_dict()))
    console.print(grids_panel(res.scopes))
    console.print(timings_table(res.timings_ms, res.new_tokens))


def _save_png(im, path: Path) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        im.save(path, format="PNG")
    except OSError as e:
        raise ZooError(f"cannot write {path}: {e.strerror or e}") from None
    err.print(f"wrote {path}", highlight=False)


@app.command("bench-kernel")
@handle_errors
def bench_kernel(
    device: DeviceOpt = "cpu",
    n: Annotated[int, typer.Option("--n", help="tokens")] = 576,
    m: MOpt = 64,
    repeats: Annotated[int, typer.Option(help="timed repeats (median reported)")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs")] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Benchmark the sensitivity estimators on a LLaVA-1.5-7B-sized projector (1024->4096->4096)."""
    from rich.table import Table

    from zoocli.adapters import resolve_device
    from zoocli.kernel_bench import sensitivity_bench

    if repeats < 1 or warmup < 0 or n < 1 or m < 1:
        raise UsageError("--repeats, --n and --m must be at least 1, --warmup at least 0")
    rows = sensitivity_bench(device=str(resolve_device(device)), n=n, m=m, repeats=repeats,
                             warmup=warmup)
    if json_out:
        _print_json(rows)
        return
    t = Table(title=f"sensitivity estimators, N={n}, m={m}", title_justify="left")
    keys = list(rows[0].keys())
    for k in keys:
        t.add_column(k, justify="right")
    for r in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(t)


def main() -> None:
    app()
