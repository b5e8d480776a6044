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

import typer
from rich.console import Console

from zoocli.errors import UsageError, ZooError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines).",
)
# A terminal gets its own width; a file or pipe gets 120 columns so wide tables stay readable.
console = Console(width=None if sys.stdout.isatty() else 120)
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

def _coerce(key: str, val: Any, annotation: Any) -> Any:
    """A YAML value as the option's Python type, or an error naming the key."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if val is None:
            return None
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if origin is list:
        items = val if isinstance(val, list) else [val]
        return [str(_coerce(key, v, typing.get_args(annotation)[0])) for v in items]
    if isinstance(val, (list, dict)):
        raise typer.BadParameter(f"key '{key}' must be a single value")
    if annotation is bool:
        if isinstance(val, bool):
            return val
    elif annotation is int:
        if isinstance(val, int) and not isinstance(val, bool):
            return val
    elif annotation is float:
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            return float(val)
    elif annotation in (str, Path):
        if isinstance(val, (str, int, float)) and not isinstance(val, bool):
            return annotation(val) if annotation is Path else str(val)
    name = getattr(annotation, "__name__", str(annotation))
    raise typer.BadParameter(f"key '{key}' must be of type {name}, got {val!r}")


def _load_config(ctx: typer.Context, param: Any, value: str | None):
    """``--config zoo.yaml``: defaults for any option of this command; flags on the line win."""
    if not value:
        return value
    import yaml

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise typer.BadParameter(f"no such file: {value}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"cannot read {value}: {str(e).splitlines()[0]}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
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


def _zoo_options(m: int, h: float, estimator: str, rank: int | None, seed: int = 0) -> dict[str, Any]:
    import math

    from zoocli.sensitivity import SEED_MAX, SEED_MIN

    if not SEED_MIN <= seed <= SEED_MAX:  # what torch.Generator.manual_seed takes
        raise UsageError(f"--seed must be in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    if m <= 0:
        raise UsageError(f"--m must be at least 1, got {m}")
    if not math.isfinite(h) or h <= 0:
        raise UsageError(f"--h must be a positive number, got {h}")
    if estimator not in ("fd", "jvp", "naive"):
        raise UsageError(f"--estimator {estimator!r}: choose fd, jvp or naive")
    if rank is not None and rank <= 0:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    return {"m": m, "h": h, "estimator": estimator, "rank": rank}


def _early_checks(question: str, keep: str, specs: list[str], max_new_tokens: int,
                  overlay: Path | None, zoo: dict[str, Any]):
    """What `ask` and `compare` validate before anything is loaded: (question, parsed method
    specs, ZOO options)."""
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import parse_keep

    question = _question(question)
    parsed = [parse_method_spec(spec) for spec in specs]
    parse_keep(keep, 10**9)  # syntax and sign; the token count is known after encoding
    opts = _zoo_options(**zoo)
    if max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    _check_out_file(overlay, "--overlay")
    return question, parsed, opts


def _load(model: str, device: str, dtype: str, random_weights: bool):
    import transformers

    from zoocli.adapters import load_adapter

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    with err.status(f"loading {model}…"):
        return load_adapter(model, device=device, dtype=dtype, random_weights=random_weights)


def _image(path: str):
    from zoocli.images import load_image

    return load_image(path)


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None: they are not JSON."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


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
    method: Annotated[str, typer.Option(help="selection method (see `zoo methods`), options as name:key=value (fastv:K=3)")] = "zoo",
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
    from zoocli.pipeline import run_one
    from zoocli.render import answer_panel, grids_panel, overlay as draw_overlay, timings_table

    question, [(method, extra)], opts = _early_checks(  # method: "fastv" or "fastv:K=3"
        question, keep, [method], max_new_tokens, overlay,
        dict(m=m, h=h, estimator=estimator, rank=rank, seed=seed))
    img = _image(image)
    adapter = _load(model, device, dtype, random_weights)
    warnings: list[str] = []
    res = run_one(adapter, img, question, method, keep, scope=budget_scope, seed=seed,
                  options={**opts, **extra}, max_new_tokens=max_new_tokens, warnings=warnings)
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
    console.print(timings_table(res.timings_ms, res.new_tokens, in_llm=res.stage == "in_llm"))


def _check_out_file(path: Path | None, option: str) -> None:
    """Refuse, before any model loads, an output path that cannot be a file (a directory, or in a
    folder that does not exist); other write failures are reported when the file is written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if path.parent and not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")


def _save_png(im, path: Path) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        im.save(path, format="PNG")
    except OSError as e:
        raise ZooError(f"cannot write {path}: {e.strerror or e}") from None
    err.print(f"wrote {path}", highlight=False)


def _positions(scopes: list[dict]) -> dict[int, tuple[str, int, int]]:
    """Candidate index -> (scope name, row, col) for the first scope holding it."""
    pos: dict[int, tuple[str, int, int]] = {}
    for s in scopes:
        for i, (r, c) in zip(s["index"], s["cells"]):
            pos.setdefault(i, (s["name"], r, c))
    return pos


@app.command()
@handle_errors
def score(
    image: Annotated[str, typer.Argument(help="image file")],
    question: Annotated[str | None, typer.Argument(help="question (sets the chat context)")] = None,
    m: MOpt = 64, h: HOpt = 0.01, seed: SeedOpt = 0, estimator: EstOpt = "fd", rank: RankOpt = None,
    model: ModelOpt = "llava-1.5", device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    random_weights: RandomOpt = False,
    top: Annotated[int, typer.Option(help="how many of the most sensitive tokens to list")] = 10,
    overlay: Annotated[Path | None, typer.Option(help="write a PNG of the heatmap over the image")] = None,
    vs_encoder: Annotated[bool, typer.Option("--vs-encoder", help=(
        "also estimate sensitivity at the vision encoder's input (costs 2·m encoder passes per "
        "token: use a small --m) and report its Spearman correlation with the projector's"))] = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show where the zeroth-order sensitivity is: a heatmap laid out like the image."""
    import statistics

    import torch

    from zoocli.pipeline import encode_image, scope_layout
    from zoocli.render import heat_overlay, heat_panel
    from zoocli.sensitivity import token_sensitivity

    q = _question(question) if question is not None else "Describe the image."
    opts = _zoo_options(m=m, h=h, estimator=estimator, rank=rank, seed=seed)
    _check_out_file(overlay, "--overlay")
    img = _image(image)
    adapter = _load(model, device, dtype, random_weights)
    enc = encode_image(adapter, img, q)
    s = token_sensitivity(enc.encoded.vision, adapter.projector, seed=seed, **opts).cpu()
    vals = [float(v) for v in s]
    layout = scope_layout(enc.encoded, torch.zeros(0, dtype=torch.long))
    pos = _positions(layout)
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))[: max(0, top)]
    stats = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    out: dict[str, Any] = {
        "model": adapter.model_id, "n_visual_tokens": len(vals), "m": m, "h": h, "seed": seed,
        "estimator": estimator, "rank": rank, "stats": stats,
        "tokens": [{"index": i, "scope": pos[i][0], "row": pos[i][1], "col": pos[i][2],
                    "sensitivity": vals[i]} for i in range(len(vals))],
        "top": [{"index": i, "scope": pos[i][0], "row": pos[i][1], "col": pos[i][2],
                 "sensitivity": vals[i]} for i in order],
    }
    if vs_encoder:
        from zoocli.analysis import encoder_sensitivity, spearman

        with _progress() as bar:
            task = bar.add_task("encoder passes", total=None)
            enc_s = encoder_sensitivity(adapter, enc, m=m, h=h, seed=seed,
                                        progress=lambda done, total: bar.update(task, completed=done, total=total))
        out["encoder_sensitivity"] = [float(v) for v in enc_s]
        out["spearman_encoder_vs_projector"] = spearman(enc_s, s)
    if overlay is not None:
        _save_png(heat_overlay(img, layout, vals), overlay)
    if json_out:
        _print_json(out)
        return
    from rich.table import Table

    console.print(heat_panel(layout, vals, stats["min"], stats["max"]))
    console.print(f"sensitivity over {len(vals)} tokens (m={m}, h={h}, {estimator}): "
                  f"min {stats['min']:.4g} · median {stats['median']:.4g} · max {stats['max']:.4g}",
                  highlight=False)
    t = Table(title=f"top {len(order)} tokens", title_justify="left")
    for col in ("rank", "token", "scope", "row", "col", "sensitivity"):
        t.add_column(col, justify="right")
    for r, tok in enumerate(out["top"], 1):
        t.add_row(str(r), str(tok["index"]), tok["scope"], str(tok["row"]), str(tok["col"]),
                  f"{tok['sensitivity']:.4g}")
    console.print(t)
    if vs_encoder:
        console.print(f"Spearman(encoder-input sensitivity, projector sensitivity) = "
                      f"{out['spearman_encoder_vs_projector']:.3f}", highlight=False)
    if adapter.meaningless:
        err.print("[yellow]random weights: these sensitivities describe no trained model[/yellow]")


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=err, transient=True)


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what} is empty")
    return items


@app.command()
@handle_errors
def compare(
    image: Annotated[str, typer.Argument(help="image file")],
    question: Annotated[str, typer.Argument(help="question about the image")],
    methods: Annotated[str, typer.Option(help="comma-separated methods, each optionally with options: zoo:estimator=jvp (the unpruned baseline always runs)")] = "divprune,zoo",
    keep: Annotated[str, typer.Option(help="visual tokens to keep: a count (64) or a share (11%)")] = "64",
    m: MOpt = 64, h: HOpt = 0.01, seed: SeedOpt = 0, estimator: EstOpt = "fd", rank: RankOpt = None,
    model: ModelOpt = "llava-1.5", device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    random_weights: RandomOpt = False,
    max_new_tokens: Annotated[int, typer.Option(help="answer length limit")] = 64,
    budget_scope: ScopeOpt = "crop",
    overlay: Annotated[Path | None, typer.Option(help="write a contact sheet of the overlays (PNG)")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run several methods on the same image (encoded once) and compare them with the unpruned model."""
    from zoocli.pipeline import check_family, encode_image, jaccard, parse_keep, run_method
    from zoocli.render import compare_table, contact_sheet, grids_panel, overlay as draw_overlay

    names = _split(methods, "--methods")
    question, parsed, opts = _early_checks(question, keep, names, max_new_tokens, overlay,
                                           dict(m=m, h=h, estimator=estimator, rank=rank, seed=seed))
    spec_of = dict(zip(names, parsed, strict=True)) | {"none": ("none", {})}
    img = _image(image)
    adapter = _load(model, device, dtype, random_weights)
    for base_name, _ in parsed:
        check_family(adapter, base_name)
    enc = encode_image(adapter, img, question)
    k, warn = parse_keep(keep, enc.n)
    if warn:
        err.print(f"[yellow]warning:[/yellow] {warn}", highlight=False)
    order = ["none"] + [n for n in names if n != "none"]
    results = {}
    with _progress() as bar:
        task = bar.add_task("methods", total=len(order))
        for name in order:
            base_name, extra = spec_of[name]
            results[name] = run_method(adapter, enc, base_name, enc.n if name == "none" else k,
                                       scope=budget_scope, seed=seed, options={**opts, **extra},
                                       max_new_tokens=max_new_tokens)
            bar.advance(task)
    base = results["none"].timings_ms
    zoo_specs = [n for n in order if spec_of[n][0] == "zoo"]
    ref = results[zoo_specs[0]].kept_indices if zoo_specs else None
    rows = []
    for name, r in results.items():
        t = r.timings_ms
        rows.append({
            "method": name, "stage": r.stage, "kept": len(r.kept_indices), "total": r.n_visual_tokens,
            "llm_visual_tokens": r.n_llm_visual_kept, "answer": r.answer,
            "selection_ms": t.get("selection", 0.0), "prefill_ms": t["prefill"],
            "ttft_ms": t["ttft"], "e2e_ms": t["e2e"],
            "speedup_e2e": base["e2e"] / t["e2e"], "speedup_prefill": base["prefill"] / t["prefill"],
            "jaccard_vs_zoo": None if ref is None else jaccard(r.kept_indices, ref),
            "kept_indices": r.kept_indices, "llm_stages": r.llm_stages,
        })
    if overlay is not None:
        sheet = contact_sheet([draw_overlay(img, results[n].scopes) for n in order],
                              [f"{n}: {len(results[n].kept_indices)}/{enc.n}" for n in order])
        _save_png(sheet, overlay)
    if json_out:
        _print_json({"model": adapter.model_id, "question": question, "keep": k,
                     "n_visual_tokens": enc.n, "meaningless": adapter.meaningless, "rows": rows})
        return
    console.print(compare_table(rows, adapter.meaningless))
    for name in order:
        if name != "none":
            console.print(grids_panel(results[name].scopes, title=name))


@app.command()
@handle_errors
def bench(
    model: ModelOpt = "llava-1.5",
    budgets: Annotated[str, typer.Option(help="comma-separated budgets: counts (640) or shares (11%)")] = "192,128,64",
    methods: Annotated[str, typer.Option(help="comma-separated methods, each optionally with options: zoo:estimator=jvp:rank=128 (the unpruned baseline always runs)")] = "zoo,divprune",
    images: Annotated[list[str] | None, typer.Option("--images", help="images (repeat the option or comma-separate); default: the shipped samples")] = None,
    question: Annotated[str, typer.Option(help="the question asked of every image")] = "Describe the image in one sentence.",
    repeats: Annotated[int, typer.Option(help="timed repeats per image (median reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs per image")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="answer length")] = 32,
    m: MOpt = 64, h: HOpt = 0.01, seed: SeedOpt = 0, estimator: EstOpt = "fd", rank: RankOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", random_weights: RandomOpt = False,
    budget_scope: ScopeOpt = "crop",
    out: Annotated[Path | None, typer.Option(help="append one JSON line per finished row; rows already there are skipped")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Latency of each method x budget against the unpruned model, measured in one run."""
    from zoocli.bench import BenchSpec, append_row, bench_rows, done_keys, shipped_images
    from zoocli.methods import parse_method_spec
    from zoocli.render import bench_table

    names = _split(methods, "--methods")
    for name in names:
        parse_method_spec(name)
    budget_list = _split(budgets, "--budgets")
    for b in budget_list:
        from zoocli.pipeline import parse_keep

        parse_keep(b, 10**9, "--budgets")  # validates the syntax
    if repeats < 1 or warmup < 0 or max_new_tokens < 1:
        raise UsageError("--repeats and --max-new-tokens must be at least 1, --warmup at least 0")
    opts = _zoo_options(m=m, h=h, estimator=estimator, rank=rank, seed=seed)
    paths = [p for spec in (images or []) for p in _split(spec, "--images")] or [str(p) for p in shipped_images()]
    imgs = [_image(p) for p in paths]
    _check_out_file(out, "--out")
    if out is not None:
        try:  # fail now, not after the baseline has been measured
            open(out, "a").close()
        except OSError as e:
            raise ZooError(f"cannot write {out}: {e.strerror or e}") from None
    adapter = _load(model, device, dtype, random_weights)
    spec = BenchSpec(model=adapter.model_id, methods=names, budgets=budget_list,
                     images=[Path(p).name for p in paths], question=_question(question),
                     repeats=repeats, warmup=warmup, max_new_tokens=max_new_tokens, seed=seed,
                     scope=budget_scope, options=opts, device=str(adapter.device),
                     dtype=str(adapter.dtype).replace("torch.", ""), random_weights=random_weights)
    skip = done_keys(out)
    plan = 1 + len(budget_list) * len([n for n in names if n != "none"])
    rows = []
    with _progress() as bar:
        task = bar.add_task("bench", total=plan * (repeats + warmup) * len(imgs))
        for row in bench_rows(adapter, imgs, spec, skip,
                              progress=lambda what: bar.update(task, advance=1, description=what)):
            rows.append(row)
            if out is not None:
                append_row(out, row)
    if json_out:
        _print_json(rows)
        return
    console.print(bench_table(rows, spec))
    if out is not None:
        err.print(f"appended {len(rows)} rows to {out}", highlight=False)


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
    r0 = rows[0]
    t = Table(title=(f"sensitivity estimators · N={n}, m={m}, {r0['d_in']}->{r0['d_hidden']}->"
                     f"{r0['d_out']} GELU, fp32 · {r0['device']}, torch {r0['torch']}, "
                     f"{r0['threads']} threads · median of {repeats} (warm-up {warmup} excluded)"),
              title_justify="left")
    for col in ("estimator", "W2 spectrum", "median ms", "min ms", "max ms", "vs naive",
                "Spearman vs naive"):
        t.add_column(col, justify="left" if col in ("estimator", "W2 spectrum") else "right")
    for r in rows:
        sp, rho = r.get("speedup_vs_naive"), r.get("spearman_vs_naive")
        t.add_row(r["name"], r["spectrum"], f"{r['median_ms']:.0f}", f"{r['min_ms']:.0f}",
                  f"{r['max_ms']:.0f}", "" if sp is None else f"{sp:.1f}x",
                  "" if rho is None else f"{rho:.4f}")
    t.caption = "the SVD row is paid once per projector (cached), not per call"
    console.print(t)


from zoocli.cli_eval import eval_command  # noqa: E402  (after the helpers it imports from here)

app.command("eval")(eval_command)


def main() -> None:
    """The `zoo` entry point: like ``app()``, but a malformed command line (click's usage errors)
    is one line on stderr with click's exit code (2), not a boxed multi-line message."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:  # typer vendors click: recognise its exceptions by their interface
        message, exit_code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
        if message is None or not isinstance(exit_code, int):
            raise
        text = " ".join(str(message()).split())
        if not text:  # `zoo` alone: the help was already shown
            sys.exit(exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"[red]error:[/red] {text}{hint}", highlight=False,
                  soft_wrap=True)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)
