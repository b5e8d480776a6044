"""`zoo bench`: latency of each method x budget against the unpruned model, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zoocli.cli.common import (
    BudgetsOpt, ConfigOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxNewOpt, MethodOptions, MethodsOpt,
    ModelOpt, RandomOpt, check_out_file, console, err, handle_errors, load_image, load_model,
    method_options, print_json, progress, question_text, split_list,
)
from zoocli.errors import UsageError, ZooError


def _check_plan(names: list[str], budgets: list[str], repeats: int, warmup: int,
                max_new_tokens: int) -> None:
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import parse_keep

    for name in names:
        parse_method_spec(name)
    for b in budgets:
        parse_keep(b, 10**9, "--budgets")  # validates the syntax
    if repeats < 1 or warmup < 0 or max_new_tokens < 1:
        raise UsageError("--repeats and --max-new-tokens must be at least 1, --warmup at least 0")


def _check_out(out: Path | None) -> None:
    check_out_file(out, "--out")
    if out is not None:
        try:  # fail now, not after the baseline has been measured
            open(out, "a").close()
        except OSError as e:
            raise ZooError(f"cannot write {out}: {e.strerror or e}") from None


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
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Latency of each method x budget against the unpruned model, measured in one run."""
    from zoocli import render
    from zoocli.bench import (
        BenchSpec, append_row, bench_rows, done_keys, plan_rows, planned_runs, shipped_images,
    )

    names = split_list(methods, "--methods")
    budget_list = split_list(budgets, "--budgets")
    _check_plan(names, budget_list, repeats, warmup, max_new_tokens)
    zoo = opts.zoo()
    paths = ([p for spec in (images or []) for p in split_list(spec, "--images")]
             or [str(p) for p in shipped_images()])
    imgs = [load_image(p) for p in paths]
    _check_out(out)
    adapter = load_model(model, device, dtype, random_weights)
    spec = BenchSpec(model=adapter.model_id, methods=names, budgets=budget_list,
                     images=[Path(p).name for p in paths], question=question_text(question),
                     repeats=repeats, warmup=warmup, max_new_tokens=max_new_tokens, seed=opts.seed,
                     scope=opts.budget_scope, options=zoo, device=str(adapter.device),
                     dtype=str(adapter.dtype).replace("torch.", ""), random_weights=random_weights)
    rows = []
    with progress() as bar:
        task = bar.add_task("bench", total=planned_runs(spec))
        for row in bench_rows(adapter, imgs, spec, done_keys(out),
                              progress=lambda what: bar.update(task, advance=1, description=what)):
            rows.append(row)
            if out is not None:
                append_row(out, row)
    order = plan_rows(spec)  # rows finish in the last round's shuffled order: show them in plan order
    rows.sort(key=lambda r: order.index((r["method"], r["budget"])))
    if json_out:
        print_json(rows)
        return
    console.print(render.bench_table(rows, spec))
    if out is not None:
        err.print(f"appended {len(rows)} rows to {out}", highlight=False)
