"""`zoo compare IMAGE QUESTION`: several methods on one image (encoded once) against the
unpruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zoocli.cli.common import (
    ConfigOpt, DeviceOpt, DtypeOpt, ImageArg, JsonOpt, KeepOpt, MaxNewOpt, MethodOptions,
    MethodsOpt, ModelOpt, NoWarmupOpt, QuestionArg, RandomOpt, console, early_checks, handle_errors, load_image,
    load_model, method_options, print_json, progress, save_png, split_list, warn,
)


@handle_errors
@method_options()
def compare(
    image: ImageArg,
    question: QuestionArg,
    methods: MethodsOpt = "divprune,zoo",
    keep: KeepOpt = "64",
    opts: MethodOptions = MethodOptions(),
    model: ModelOpt = "llava-1.5", device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    random_weights: RandomOpt = False,
    max_new_tokens: MaxNewOpt = 64,
    overlay: Annotated[Path | None, typer.Option(help="write a contact sheet of the overlays (PNG)")] = None,
    no_warmup: NoWarmupOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run several methods on the same image (encoded once) and compare them with the unpruned model."""
    from zoocli import render
    from zoocli.compare import compare_rows, run_compare
    from zoocli.pipeline import check_family

    names = split_list(methods, "--methods")
    question, parsed, zoo = early_checks(question, keep, names, max_new_tokens, overlay, opts)
    img = load_image(image)
    adapter = load_model(model, device, dtype, random_weights)
    for base_name, _ in parsed:
        check_family(adapter, base_name)
    specs = dict(zip(names, parsed, strict=True))
    warnings: list[str] = []
    with progress() as bar:
        task = bar.add_task("methods", total=len({"none", *names}) * (1 if no_warmup else 2))
        enc, k, results = run_compare(adapter, img, question, specs, keep, warmup=not no_warmup,
                                      scope=opts.budget_scope, seed=opts.seed, options=zoo,
                                      max_new_tokens=max_new_tokens, warnings=warnings,
                                      advance=lambda: bar.advance(task))
    for w in warnings:
        warn(w)
    rows = compare_rows(results, {n: p[0] for n, p in specs.items()} | {"none": "none"})
    if overlay is not None:
        from zoocli.figures import compare_sheet

        runs = [(n, r.scopes) for n, r in results.items()]
        save_png(compare_sheet(img, runs, model=adapter.model_id, budget=k), overlay)
    if json_out:
        print_json({"model": adapter.model_id, "question": question, "keep": k,
                    "n_visual_tokens": enc.n, "meaningless": adapter.meaningless, "rows": rows})
        return
    for renderable in render.compare_view(rows, results, adapter.meaningless):
        console.print(renderable)
    console.print(render.warm_note(int(not no_warmup)), highlight=False)
