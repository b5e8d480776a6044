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
    from zoocli.api import compare_methods
    from zoocli.cli.progress import Steps

    image, question = with_sample(image, question, model)
    names = split_list(methods, "--methods")
    question, _, zoo = early_checks(question, keep, names, max_new_tokens, overlay, opts,
                                    inputs=(image, config))
    repeats = warm_repeats(repeats, no_warmup)
    img = load_image(image)
    adapter = load_model(model, device, dtype, random_weights)
    check_images(adapter, [image], [img])
    with Steps("compare", len({"none", *names}) * repeats, "runs") as steps:
        res = compare_methods(
            adapter, img, question, names, keep, warmup=not no_warmup, budget_scope=opts.budget_scope,
            seed=opts.seed, options=zoo, max_new_tokens=max_new_tokens, repeats=repeats,
            on_warm=lambda: steps.note("compare: warm-up pass done (untimed, left out of the figures)"),
            on_done=lambda spec: steps.finished(spec))
    for w in res.warnings:
        warn(w)
    results = {spec: a.run for spec, a in res.answers.items()}
    rows, k = res.rows, res.keep
    if overlay is not None:
        from zoocli.figures import compare_sheet

        runs = [(n, r.scopes) for n, r in results.items()]
        save_png(compare_sheet(img, runs, model=adapter.model_id, budget=keep, keep=k, question=question,
                               answers={n: r.answer for n, r in results.items()},
                               random_weights=adapter.meaningless), overlay,
                 inputs=(image, config))
    if json_out:
        print_json({"model": adapter.model_id, "question": question, "keep": k,
                    "n_visual_tokens": res.n_visual_tokens, "meaningless": adapter.meaningless, "rows": rows})
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
