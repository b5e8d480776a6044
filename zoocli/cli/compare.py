"""`zoo compare IMAGE QUESTION`: several methods on one image (encoded once) against the
unpruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zoocli.cli.common import (
    WarmRepeatsOpt, warm_repeats,
    ConfigOpt, DeviceOpt, DtypeOpt, JsonOpt, KeepOpt, MaxNewOpt, MethodOptions, MethodsOpt,
    ModelOpt, NoWarmupOpt, RandomOpt, check_images, console, early_checks, handle_errors,
    load_image, load_model, method_options, note, print_json, save_png, split_list, warn,
)


@handle_errors
@method_options()
def compare(
    image: Annotated[str | None, typer.Argument(help=(
        "image file (default: the shipped sample two_cats_couch_remotes.jpg and its question)"))] = None,
    question: Annotated[str | None, typer.Argument(help="question about the image")] = None,
    methods: MethodsOpt = "divprune,zoo",
    keep: KeepOpt = "64",
    opts: MethodOptions = MethodOptions(),
    model: ModelOpt = "llava-1.5", device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    random_weights: RandomOpt = False,
    max_new_tokens: MaxNewOpt = 64,
    overlay: Annotated[Path | None, typer.Option(help="write a contact sheet of the overlays (PNG)")] = None,
    no_warmup: NoWarmupOpt = False,
    repeats: WarmRepeatsOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run several methods on the same image (encoded once) and compare them with the unpruned model."""
    from zoocli import render
    from zoocli.compare import compare_rows, run_compare
    from zoocli.pipeline import check_family

    image, question = with_sample(image, question, model)
    names = split_list(methods, "--methods")
    question, parsed, zoo = early_checks(question, keep, names, max_new_tokens, overlay, opts)
    repeats = warm_repeats(repeats, no_warmup)
    img = load_image(image)
    adapter = load_model(model, device, dtype, random_weights)
    check_images(adapter, [image], [img])
    for base_name, _ in parsed:
        check_family(adapter, base_name)
    specs = dict(zip(names, parsed, strict=True))
    from zoocli.cli.progress import Steps

    warnings: list[str] = []
    with Steps("compare", len({"none", *names}) * repeats, "runs") as steps:
        enc, k, results = run_compare(
            adapter, img, question, specs, keep, warmup=not no_warmup, repeats=repeats, scope=opts.budget_scope,
            seed=opts.seed, options=zoo, max_new_tokens=max_new_tokens, warnings=warnings,
            on_warm=lambda: steps.note("compare: warm-up pass done (untimed, left out of the figures)"),
            on_done=lambda spec: steps.finished(spec))
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
    console.print(render.warm_note(int(not no_warmup), repeats), highlight=False)


def with_sample(image: str | None, question: str | None, model: str | None = None) -> tuple[str, str]:
    """No image: the shipped sample image and its question (for ``model``: demo-llava gets a
    shapes image), said on stderr; an image needs a question."""
    from zoocli.errors import UsageError

    if image is None:
        from zoocli.bench import sample_example

        path, sample_q = sample_example(model)
        question = sample_q if question is None else question
        note(f"no image given: using the shipped sample {path.name}, question {question!r}")
        return str(path), question
    if question is None:
        raise UsageError("missing argument QUESTION: compare asks one question of the image")
    return image, question
