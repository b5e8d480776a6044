"""`zoo bench-kernel`: the sensitivity estimators on a LLaVA-1.5-7B-sized projector."""

from __future__ import annotations

from typing import Annotated

import typer

from zoocli.cli.common import (
    MAX_REPEATS, DeviceOpt, JsonOpt, MOpt, check_int, console, handle_errors, print_json,
)

MAX_KERNEL_TOKENS = 65536  # --n: ~16k visual tokens is the most any supported model makes


@handle_errors
def bench_kernel(
    device: DeviceOpt = "cpu",
    n: Annotated[int, typer.Option("--n", help="tokens")] = 576,
    m: MOpt = 64,
    repeats: Annotated[int, typer.Option(help="timed repeats (median reported)")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs")] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Benchmark the sensitivity estimators on a LLaVA-1.5-7B-sized projector (1024->4096->4096)."""
    from zoocli import render
    from zoocli.adapters import resolve_device
    from zoocli.cli.progress import Steps
    from zoocli.kernel_bench import kernel_steps, sensitivity_bench

    from zoocli.sensitivity import M_MAX

    check_int("--n", n, 1, MAX_KERNEL_TOKENS)
    check_int("--m", m, 1, M_MAX)
    check_int("--repeats", repeats, 1, MAX_REPEATS)
    check_int("--warmup", warmup, 0, MAX_REPEATS)
    with Steps("bench-kernel", kernel_steps(), "stages") as steps:
        rows = sensitivity_bench(device=str(resolve_device(device)), n=n, m=m, repeats=repeats,
                                 warmup=warmup, progress=lambda name: steps.finished(name))
    if json_out:
        print_json(rows)
        return
    console.print(render.kernel_table(rows, n=n, m=m, repeats=repeats, warmup=warmup))
