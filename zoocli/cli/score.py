"""`zoo score IMAGE [QUESTION]`: a sensitivity heatmap laid out like the image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zoocli.cli.common import (
    MAX_TOP, check_images, check_int, check_out_file, ConfigOpt, console, DeviceOpt, DtypeOpt, err,
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
    from zoocli.score import encoder_agreement, norm_agreement, score_image, summary

    if image is None:
        from zoocli.cli.compare import with_sample

        image, question = with_sample(image, question, model)
    q = question_text(question) if question is not None else "Describe the image."
    zoo = opts.zoo()
    check_int("--top", top, 0, MAX_TOP)
    check_out_file(overlay, "--overlay")
    img = load_image(image)
    adapter = load_model(model, device, dtype, random_weights)
    check_images(adapter, [image], [img])
    scored = score_image(adapter, img, q, seed=opts.seed, zoo=zoo)
    out = {"model": adapter.model_id, "n_visual_tokens": len(scored.values), "m": zoo.get("m"),
           "h": zoo.get("h"), "seed": opts.seed, "estimator": zoo.get("estimator") or "exact", "rank": zoo.get("rank"),
           **summary(scored.values, scored.layout, top), **norm_agreement(scored)}
    if vs_encoder:
        from zoocli.cli.progress import Steps

        with Steps("vs-encoder", None, "encoder passes", min_interval_s=5.0) as steps:
            out |= encoder_agreement(adapter, scored, m=opts.m, h=opts.h, seed=opts.seed,
                                     progress=lambda done, total: steps.set_progress(done, total))
    if overlay is not None:
        from zoocli.figures import heat_overlay

        save_png(heat_overlay(img, scored.layout, scored.values, model=adapter.model_id,
                              units=scored.units), overlay)
    if json_out:
        print_json(out)
        return
    for renderable in render.score_view(out, scored.layout, scored.values):
        console.print(renderable)
    if adapter.meaningless:
        err.print("[yellow]random weights: these sensitivities describe no trained model[/yellow]")
