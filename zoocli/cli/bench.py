"""`zoo bench`: latency of each method x budget against the unpruned model, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zoocli.errors import UsageError

from zoocli.cli.common import (
    MAX_BATCH, MAX_NEW_TOKENS, MAX_REPEATS, BudgetsOpt, ConfigOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxNewOpt,
    MethodOptions, MethodsOpt, ModelOpt, RandomOpt, check_images, check_int, check_out_file,
    console, handle_errors, load_image, load_model, method_options, note, print_json,
    budget_key, method_key, question_text, split_list, unique, warn,
)


def _check_plan(names: list[str], budgets: list[str], repeats: int | None, warmup: int,
                max_new_tokens: int | None) -> None:
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import parse_keep

    for name in names:
        parse_method_spec(name)
    for b in budgets:
        parse_keep(b, 10**9, "--budgets")  # validates the syntax
    if repeats is not None:
        check_int("--repeats", repeats, 1, MAX_REPEATS)
    check_int("--warmup", warmup, 0, MAX_REPEATS)
    if max_new_tokens is not None:
        check_int("--max-new-tokens", max_new_tokens, 1, MAX_NEW_TOKENS)


DEFAULT_REPEATS, DEFAULT_NEW_TOKENS = 5, 32
# An offline model on CPU (random weights: only the timings mean something): a budget of work that
# finishes in minutes unless the user asks for more. small-llava-next, 3 budgets x 2 methods: 7
# rows x 4 rounds on one image: 28 runs (8.5 min measured with 8 new tokens, the 2 cores shared
# with four other jobs).
QUICK_REPEATS, QUICK_NEW_TOKENS = 3, 4


def quick_defaults(model: str, device: str, random_weights: bool) -> bool:
    """Whether bench's defaults shrink: an offline or shipped model (built here, small) on CPU."""
    from zoocli.adapters import OFFLINE_MODELS, SHIPPED_MODELS

    on_cpu = device == "cpu" or (device == "auto" and not _cuda())
    return on_cpu and not random_weights and (model in OFFLINE_MODELS or model in SHIPPED_MODELS)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def small_work(model: str, images: list[str], repeats: int | None, max_new_tokens: int | None) -> dict:
    """The defaults for a quick bench, filling only what the user did not give: one image (the
    model's sample: demo-llava's is a shapes image), ``QUICK_REPEATS`` repeats, ``QUICK_NEW_TOKENS``
    new tokens; ``said``: what was chosen, in words."""
    from zoocli.bench import sample_example

    said = []
    if not images:
        path = sample_example(model)[0]
        images = [str(path)]
        said.append(f"1 image ({path.name})")
    if repeats is None:
        repeats = QUICK_REPEATS
        said.append(f"{repeats} repeats")
    if max_new_tokens is None:
        max_new_tokens = QUICK_NEW_TOKENS
        said.append(f"{max_new_tokens} new tokens")
    return {"images": images, "repeats": repeats, "max_new_tokens": max_new_tokens, "said": ", ".join(said)}


def _check_out(out: Path | None, inputs: tuple) -> None:
    """Refuse, before anything loads, an --out that zoo must not append to: a directory, a file in
    a missing folder, a FIFO or device (never opened, so it cannot hang), one of the ``inputs``,
    or a file that is not zoo's own bench rows (``zoocli.outfile``). Nothing is created or
    written here."""
    from zoocli.outfile import check_target

    check_out_file(out, "--out")
    if out is not None:
        check_target(out, "--out", inputs=inputs)


def _locked(out: Path | None):
    """The advisory lock of --out for the whole run (a second writer is refused, naming this
    process), or nothing without --out."""
    import contextlib

    from zoocli.outfile import output_lock

    return contextlib.nullcontext() if out is None else output_lock(out, "--out")


@handle_errors
@method_options()
def bench(
    model: ModelOpt = "llava-1.5",
    budgets: BudgetsOpt = "192,128,64",
    methods: MethodsOpt = "zoo,divprune",
    images: Annotated[list[str] | None, typer.Option("--images", help=(
        "images (repeat the option or comma-separate); default: the shipped samples"))] = None,
    question: Annotated[str, typer.Option(help="the question asked of every image")] = (
        "Describe the image in one sentence."),
    repeats: Annotated[int | None, typer.Option(help=(
        "timed repeats per image (median reported); default 5, or 3 for an offline model on CPU"),
        show_default=False)] = None,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs per image")] = 1,
    max_new_tokens: Annotated[int | None, typer.Option(help=(
        f"tokens to generate per run, 1 to {MAX_NEW_TOKENS}; default 32, or 4 for an offline model on CPU"),
        show_default=False)] = None,
    opts: MethodOptions = MethodOptions(),
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", random_weights: RandomOpt = False,
    out: Annotated[Path | None, typer.Option(help=(
        "append one JSON line per finished row; rows already there are skipped"))] = None,
    engine: Annotated[str, typer.Option(help=(
        "hf (zoo's own path, per stage) | vllm (vLLM's engine with zoo's plugin: TTFT and throughput)"))] = "hf",
    concurrency: Annotated[int, typer.Option(help="--engine vllm: requests sent at once per row")] = 8,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Latency of each method x budget against the unpruned model, measured in one run."""
    from zoocli import render
    from zoocli.bench import BenchSpec, budget_warnings, done_keys, planned_rows, shipped_images

    names = split_list(methods, "--methods")
    budget_list = split_list(budgets, "--budgets")
    _check_plan(names, budget_list, repeats, warmup, max_new_tokens)
    names = unique(names, "--methods", method_key)
    budget_list = unique(budget_list, "--budgets", budget_key)
    zoo = opts.zoo()
    question = question_text(question)
    given = [p for spec in (images or []) for p in split_list(spec, "--images")]
    small = quick_defaults(model, device, random_weights)
    chose = ""  # said once the input is checked, before the model loads
    if small and not (given and repeats is not None and max_new_tokens is not None):
        chosen = small_work(model, given, repeats, max_new_tokens)
        given, repeats, max_new_tokens = chosen["images"], chosen["repeats"], chosen["max_new_tokens"]
        chose = (f"bench: {model} is an offline model on CPU: {chosen['said']} by default, to finish in "
                 "minutes (give --images, --repeats, --max-new-tokens to choose)")
    repeats = DEFAULT_REPEATS if repeats is None else repeats
    max_new_tokens = DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    paths = given or [str(p) for p in shipped_images()]
    imgs = [load_image(p) for p in paths]
    _check_out(out, (*paths, config))
    if engine not in ("hf", "vllm"):
        raise UsageError(f"--engine {engine!r}: choose hf or vllm")
    if engine == "vllm":
        check_int("--concurrency", concurrency, 1, MAX_BATCH)
        return _bench_vllm(model, names, budget_list, paths, imgs, question, repeats, warmup, max_new_tokens,
                           concurrency, opts, dtype, random_weights, out, json_out)
    with _locked(out):
        done = done_keys(out)  # also refuses a file that is not zoo's bench rows, before the model
        if chose:
            note(chose)
        adapter = load_model(model, device, dtype, random_weights)
        check_images(adapter, paths, imgs)
        spec = BenchSpec(model=adapter.model_id, methods=names, budgets=budget_list,
                         images=[Path(p).name for p in paths], question=question,
                         repeats=repeats, warmup=warmup, max_new_tokens=max_new_tokens,
                         seed=opts.seed, scope=opts.budget_scope, options=zoo,
                         device=str(adapter.device), dtype=str(adapter.dtype).replace("torch.", ""),
                         random_weights=random_weights)
        for message in budget_warnings(adapter, imgs, spec):
            warn(message)
        rows = _run_rows(adapter, imgs, spec, done, out)
        order = planned_rows(spec)  # rows finish in the last round's shuffled order: plan order
        rows.sort(key=lambda r: order.index((r["method"], r["budget"])))
    if json_out:
        print_json(rows)
        return
    console.print(render.bench_table(rows, spec, meaningless=adapter.meaningless))
    if out is not None:
        note(f"appended {len(rows)} rows to {out}")


def _bench_vllm(model, names, budgets, paths, imgs, question, repeats, warmup, max_new_tokens, concurrency,
                opts, dtype, random_weights, out, json_out) -> None:
    """`zoo bench --engine vllm` (``zoocli.integrations.vllm.bench``): one engine, rows per request."""
    from zoocli import render
    from zoocli.adapters import checkpoint_source
    from zoocli.bench import append_row, done_keys, key_str
    from zoocli.cli.progress import Steps, loading
    from zoocli.integrations.vllm import bench as vb
    from zoocli.integrations.vllm.serve import check_vllm
    from zoocli.integrations.vllm.settings import ZooSettings, check_settings

    if random_weights:
        raise UsageError("--random-weights builds a model in zoo's process; vLLM loads checkpoints: "
                         "serve an offline model (small-llava, small-qwen3-vl) or a checkpoint instead")
    for name in names:
        check_settings(ZooSettings(method=name), "--methods")
    version = check_vllm()
    with _locked(out):
        done = done_keys(out)
        with loading(model, False) as on_status:
            source, model_type, meaningless = checkpoint_source(model, on_status=on_status)
        if meaningless:
            note(f"{model} has random weights: its answers mean nothing; token counts and timings are real")
        spec = vb.VllmBenchSpec(model=model, methods=names, budgets=budgets, images=[Path(p).name for p in paths],
                                question=question, repeats=repeats, warmup=warmup, max_new_tokens=max_new_tokens,
                                concurrency=concurrency, seed=opts.seed, scope=opts.budget_scope, dtype=dtype,
                                vllm_version=version)
        plan = [r for r in spec.rows() if r[0] == "none" or key_str(spec.key(*r)) not in done]
        if len(plan) == 1 and len(spec.rows()) > 1:
            note(f"bench: every row is already in {out}: nothing to measure")
            return
        note(f"bench --engine vllm: {len(plan)} rows x {warmup + repeats} rounds x {concurrency} requests "
             f"({len(plan) * (warmup + repeats) * concurrency} requests, {warmup} warm-up round(s) untimed)")
        llm = vb.start_engine(source, model_type, dtype=dtype)
        rows: list[dict] = []
        with Steps("bench", len(plan) * (warmup + repeats), "row rounds") as steps:
            for row in vb.run_bench(llm, vb.chat_prompt(source, question), imgs, spec, done, key_str,
                                    progress=lambda what: steps.finished(what)):
                rows.append(row)
                if out is not None:
                    append_row(out, row)
    if json_out:
        print_json(rows)
        return
    console.print(render.vllm_bench_table(rows, spec))
    if out is not None:
        note(f"appended {len(rows)} rows to {out}")


def _run_rows(adapter, imgs, spec, done: set[str], out: Path | None) -> list[dict]:
    """Measure the rows not in ``done``, appending each to ``out`` as it finishes; progress as a
    bar on a terminal, else one line per finished row (``cli.progress.Steps``)."""
    from zoocli.bench import append_row, bench_rows, key_str, planned_rows
    from zoocli.cli.progress import Steps, duration

    plan = planned_rows(spec)
    skipped = sum(1 for m, b in plan[1:] if key_str(spec.key(m, b)) in done)
    runs_per_row = (spec.repeats + spec.warmup) * len(imgs)
    rows: list[dict] = []
    # rows finish together in the last repeat: the ETA is the repeats' (their lines), not the rows'
    with Steps("bench", len(plan) - skipped, "rows", eta=False,
               bar_total=(len(plan) - skipped) * runs_per_row) as steps:
        if skipped:
            steps.note(f"bench: skipping {skipped} of {len(plan) - 1} rows already in {out} "
                       "(the baseline is measured again for the speed-ups)")
        steps.note(plan_line(spec, len(plan) - skipped, len(imgs)))
        rounds = spec.warmup + spec.repeats

        def round_done(i: int, n: int) -> None:
            left = steps.elapsed / i * (n - i)
            kind = "warm-up" if i <= spec.warmup else "timed"
            steps.note(f"bench: repeat {i}/{n} done ({kind}) {steps.elapsed:.1f} s"
                       + (f", eta {duration(left)}" if i < n else ""))

        for row in bench_rows(adapter, imgs, spec, done, progress=lambda what: steps.advance(what),
                              row_done=lambda m, b: steps.finished(f"{m} @ {b}", bar_units=0),
                              round_done=round_done if rounds > 1 else None):
            rows.append(row)
            if out is not None:
                append_row(out, row)
    return rows


def plan_line(spec, n_rows: int, n_images: int) -> str:
    """What the run will do, before it starts: rows, images x repeats x rows, model runs."""
    from zoocli.text import plural

    methods = [m for m in spec.methods if m != "none"]
    rounds = spec.warmup + spec.repeats
    what = (f"the unpruned row + {plural(len(methods), 'method')} x {plural(len(spec.budgets), 'budget')}"
            if n_rows == 1 + len(methods) * len(spec.budgets) else "the unpruned row + the rows not yet in --out")
    return (f"bench: plan: {plural(n_rows, 'row')} ({what}) x {plural(n_images, 'image')} x "
            f"{rounds} repeats ({spec.warmup} warm-up + {spec.repeats} timed) = "
            f"{plural(n_rows * n_images * rounds, 'model run')}, {spec.max_new_tokens} new tokens each; "
            "a time estimate after the first repeat")
