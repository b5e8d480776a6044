"""`zoo methods` and `zoo models`: what can be run. They import only the two registries
(``zoocli.methods``, ``zoocli.adapters``) and the rendering, never a model."""

from __future__ import annotations

from zoocli.cli.common import JsonOpt, console, handle_errors, print_json


@handle_errors
def methods(json_out: JsonOpt = False) -> None:
    """List the registered token-selection methods."""
    from zoocli import render
    from zoocli.methods import METHODS

    if json_out:
        print_json([
            {"name": m.name, "stage": m.stage, "families": sorted(m.families), "summary": m.summary,
             "paper": m.paper, "deviation": m.deviation, "needs": sorted(m.needs),
             "options": dict(m.options)}
            for m in METHODS.values()
        ])
        return
    console.print(render.methods_table(METHODS.values()))


@handle_errors
def models(json_out: JsonOpt = False) -> None:
    """List model aliases, the shipped demo model and the offline models: the default, visual
    tokens per image, whether each is on this machine and its size on disk."""
    from zoocli import render
    from zoocli.adapters import catalog

    rows = catalog()
    if json_out:
        print_json(rows)
        return
    console.print(render.models_table(rows))
