"""`zoo compare IMAGE QUESTION`: several methods on one image (encoded once) against the
unpruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zoocli.cli.common import (
    ConfigOpt, DeviceOpt, DtypeOpt, ImageArg, JsonOpt, KeepOpt, MaxNewOpt, MethodOptions,
    MethodsOpt, ModelOpt, QuestionArg, RandomOpt, check_images, console, early_checks,
    handle_errors, load_image, load_model, method_options, print_json, progress, save_png,
    split_list, warn,
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
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run several methods on the same image (encoded once) and compare them with the unpruned model."""
    from zoocli import render
    from zoocli.compare import compare_rows, run_methods
    from zoocli.pipeline import check_family, encode_image, parse_keep

    names = split_list(methods, "--methods")
    question, parsed, zoo = early_checks(question, keep, names, max_new_tokens, overlay, opts)
    img = load_image(image)
    adapter = load_model(model, device, dtype, random_weights)
    check_images(adapter, [image], [img])
    for base_name, _ in parsed:
        check_family(adapter, base_name)
    enc = encode_image(adapter, img, question)
    k, warning = parse_keep(keep, enc.n)
    if warning:
        warn(warning)
    specs = dict(zip(names, parsed, strict=True))
    with progress() as bar:
        task = bar.add_task("methods", total=len({"none", *names}))
        results = run_methods(adapter, enc, specs, k, scope=opts.budget_scope, seed=opts.seed,
                              options=zoo, max_new_tokens=max_new_tokens,
                              advance=lambda: bar.advance(task))
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
