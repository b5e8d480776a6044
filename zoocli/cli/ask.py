"""`zoo ask IMAGE QUESTION`: one pruned answer with its grid and timings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zoocli.cli.common import (
    WarmRepeatsOpt, warm_repeats,
    ConfigOpt, DeviceOpt, DtypeOpt, ImageArg, JsonOpt, KeepOpt, MaxNewOpt, MethodOptions, ModelOpt,
    NoWarmupOpt, QuestionArg, RandomOpt, check_images, console, early_checks, handle_errors,
    load_image, load_model, method_options, print_json, save_png, warn,
)


@handle_errors
@method_options()
def ask(
    image: ImageArg,
    question: QuestionArg,
    keep: KeepOpt = "64",
    method: Annotated[str, typer.Option(help=(
        "selection method (see `zoo methods`), options as name:key=value (fastv:K=3)"))] = "zoo",
    opts: MethodOptions = MethodOptions(),
    model: ModelOpt = "llava-1.5", device: DeviceOpt = "auto", dtype: DtypeOpt = "auto",
    random_weights: RandomOpt = False,
    max_new_tokens: MaxNewOpt = 64,
    overlay: Annotated[Path | None, typer.Option(help="write a PNG with dropped patches dimmed")] = None,
    no_warmup: NoWarmupOpt = False,
    repeats: WarmRepeatsOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Answer a question about an image with only --keep visual tokens."""
    from zoocli import render
    from zoocli.api import ask as ask_api

    question, _, zoo = early_checks(question, keep, [method], max_new_tokens, overlay, opts,
                                    inputs=(image, config))
    repeats = warm_repeats(repeats, no_warmup)
    img = load_image(image)
    adapter = load_model(model, device, dtype, random_weights)
    check_images(adapter, [image], [img])
    res = ask_api(adapter, img, question, keep, method, seed=opts.seed, budget_scope=opts.budget_scope,
                  options=zoo, max_new_tokens=max_new_tokens, warmup=not no_warmup, repeats=repeats)
    for w in res.warnings:
        warn(w)
    if overlay is not None:
        from zoocli.figures import overlay as draw_overlay

        save_png(draw_overlay(img, res.scopes, model=adapter.model_id, method=method, budget=keep,
                              keep=res.keep, question=question, answer=res.answer,
                              random_weights=adapter.meaningless), overlay,
                 inputs=(image, config))
    run = res.run
    if json_out:
        d = run.as_dict()
        d.pop("scopes")
        print_json({"image": image, "question": question, **d})
        return
    for renderable in render.ask_view(run.as_dict(), run.scopes, run.timings_ms, run.new_tokens):
        console.print(renderable)
    console.print(render.warm_note(run.warmup_runs, repeats), highlight=False)
