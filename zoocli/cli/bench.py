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


def _check_plan(names: list[str], budgets: list[str], repeats: int, warmup: int,
                max_new_tokens: int) -> None:
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import parse_keep

    for name in names:
        parse_method_spec(name)
    for b in budgets:
        parse_keep(b, 10**9, "--budgets")  # validates the syntax
    check_int("--repeats", repeats, 1, MAX_REPEATS)
    check_int("--warmup", warmup, 0, MAX_REPEATS)
    check_int("--max-new-tokens", max_new_tokens, 1, MAX_NEW_TOKENS)


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
    repeats: Annotated[int, typer.Option(help="timed repeats per image (median reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs per image")] = 1,
    max_new_tokens: MaxNewOpt = 32,
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
    paths = ([p for spec in (images or []) for p in split_list(spec, "--images")]
             or [str(p) for p in shipped_images()])
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
    console.print(render.bench_table(rows, spec))
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
    from zoocli.cli.progress import Steps

    plan = planned_rows(spec)
    skipped = sum(1 for m, b in plan[1:] if key_str(spec.key(m, b)) in done)
    runs_per_row = (spec.repeats + spec.warmup) * len(imgs)
    rows: list[dict] = []
    with Steps("bench", len(plan) - skipped, "rows",
               bar_total=(len(plan) - skipped) * runs_per_row) as steps:
        if skipped:
            steps.note(f"bench: skipping {skipped} of {len(plan) - 1} rows already in {out} "
                       "(the baseline is measured again for the speed-ups)")
        for row in bench_rows(adapter, imgs, spec, done, progress=lambda what: steps.advance(what),
                              row_done=lambda m, b: steps.finished(f"{m} @ {b}", bar_units=0)):
            rows.append(row)
            if out is not None:
                append_row(out, row)
    return rows
