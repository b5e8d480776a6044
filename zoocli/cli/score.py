"""`zoo score IMAGE [QUESTION]`: a sensitivity heatmap laid out like the image."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from zoocli.cli.common import (
    MAX_TOP, check_images, check_int, check_overlay, ConfigOpt, console, DeviceOpt, DtypeOpt, err,
    handle_errors, JsonOpt, load_image, load_model, method_options, MethodOptions, ModelOpt,
    print_json, question_text, RandomOpt, save_png,
)


@handle_errors
@method_options(budget_scope=False)
def score(
    image: Annotated[str | None, typer.Argument(help=(
        "image file (default: the shipped sample two_cats_couch_remotes.jpg and its question)"))] = None,
    question: Annotated[str | None, typer.Argument(help="question (sets the chat context)")] = None,
    opts: MethodOptions = MethodOptions(),
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
    from zoocli import render
    from zoocli.api import score_tokens

    if image is None:
        from zoocli.cli.compare import with_sample

        image, question = with_sample(image, question, model)
    q = question_text(question) if question is not None else None
    opts.zoo()  # the flags checked before anything loads
    check_int("--top", top, 0, MAX_TOP)
    check_overlay(overlay, (image, config))
    img = load_image(image)
    adapter = load_model(model, device, dtype, random_weights)
    check_images(adapter, [image], [img])
    steps = contextlib.nullcontext()
    if vs_encoder:
        from zoocli.cli.progress import Steps

        steps = Steps("vs-encoder", None, "encoder passes", min_interval_s=5.0)
    with steps:
        res = score_tokens(adapter, img, q, estimator=opts.estimator, m=opts.m, h=opts.h, rank=opts.rank,
                           seed=opts.seed, top=top, vs_encoder=vs_encoder, encoder_m=opts.m,
                           encoder_h=opts.h, progress=steps.set_progress if vs_encoder else None)
    out = {"model": res.model, "n_visual_tokens": res.n_visual_tokens, "m": opts.m,
           "h": opts.h, "seed": opts.seed, "estimator": opts.estimator, "rank": opts.rank,
           "stats": res.stats, "tokens": res.tokens, "top": res.top, "norms": res.norms,
           "spearman_sensitivity_vs_norm": res.spearman_sensitivity_vs_norm, **(res.encoder or {})}
    if overlay is not None:
        from zoocli.figures import heat_overlay

        save_png(heat_overlay(img, res.scopes, res.values, model=adapter.model_id, units=res.units,
                              question=res.question, random_weights=adapter.meaningless), overlay,
                 inputs=(image, config))
    if json_out:
        print_json(out)
        return
    for renderable in render.score_view(out, res.scopes, res.values):
        console.print(renderable)
    if adapter.meaningless:
        err.print("[yellow]random weights: these sensitivities describe no trained model[/yellow]")
