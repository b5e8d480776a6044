"""`zoo bench-kernel`: the sensitivity estimators on a LLaVA-1.5-7B-sized projector, and the
greedy selection per backend."""

from __future__ import annotations

from typing import Annotated

import typer

from zoocli.errors import UsageError

from zoocli.cli.common import (
    MAX_REPEATS, DeviceOpt, JsonOpt, MOpt, check_int, console, handle_errors, print_json,
)

PARTS = ("all", "sensitivity", "selection")
MAX_KERNEL_TOKENS = 65536  # --n: ~16k visual tokens is the most any supported model makes


@handle_errors
def bench_kernel(
    device: DeviceOpt = "cpu",
    n: Annotated[int, typer.Option("--n", help="tokens")] = 576,
    m: MOpt = 64,
    repeats: Annotated[int, typer.Option(help="timed repeats (median reported)")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs")] = 1,
    part: Annotated[str, typer.Option(help=(
        "sensitivity (the estimators) | selection (the greedy per backend: ops, syncs, ms) | all"))] = "all",
    json_out: JsonOpt = False,
) -> None:
    """Benchmark the sensitivity estimators on a LLaVA-1.5-7B-sized projector (1024->4096->4096)
    and ZOO-Prune's greedy selection per backend at LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL shapes."""
    from zoocli import render
    from zoocli.adapters import resolve_device
    from zoocli.cli.progress import Steps
    from zoocli.kernel_bench import kernel_steps, sensitivity_bench

    from zoocli.sensitivity import M_MAX

    check_int("--n", n, 1, MAX_KERNEL_TOKENS)
    check_int("--m", m, 1, M_MAX)
    check_int("--repeats", repeats, 1, MAX_REPEATS)
    check_int("--warmup", warmup, 0, MAX_REPEATS)
    if part not in PARTS:
        raise UsageError(f"--part {part!r}: choose {', '.join(PARTS)}")
    from zoocli import selection_bench as sb

    dev = str(resolve_device(device))
    sens = part in ("sensitivity", "all")
    sel = part in ("selection", "all")
    rows, sel_rows = [], []
    with Steps("bench-kernel", kernel_steps() * sens + len(sb.SHAPES) * sel, "stages") as steps:
        if sens:
            rows = sensitivity_bench(device=dev, n=n, m=m, repeats=repeats, warmup=warmup,
                                     progress=lambda name: steps.finished(name))
        if sel:
            sel_rows = sb.selection_bench(device=dev, repeats=repeats, warmup=warmup,
                                       progress=lambda name: steps.finished(name))
    if json_out:
        print_json(rows + [{"part": "selection", **r} for r in sel_rows])
        return
    if rows:
        console.print(render.kernel_table(rows, n=n, m=m, repeats=repeats, warmup=warmup))
    if sel_rows:
        console.print(render.selection_table(sel_rows, repeats=repeats, warmup=warmup))
