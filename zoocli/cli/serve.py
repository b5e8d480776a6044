"""`zoo serve MODEL`: vLLM's OpenAI-compatible server with zoo's pruning (``zoocli.integrations.vllm``)."""

from __future__ import annotations

from typing import Annotated

import typer

from zoocli.cli.common import (
    ConfigOpt, DtypeOpt, KeepOpt, MethodOptions, console, handle_errors, method_options, note,
)


@handle_errors
@method_options()
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="alias, offline model, HF id or local dir")],
    method: Annotated[str, typer.Option(help=(
        "selection method for every image (zoo, sensitivity, sum, divprune, random, downsample, norm, "
        "none), options as name:key=value"))] = "zoo",
    keep: KeepOpt = "64",
    opts: MethodOptions = MethodOptions(),
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    dtype: DtypeOpt = "auto",
    request_settings: Annotated[bool, typer.Option(
        "--request-settings", help=("let each request set zoo_keep / zoo_method / zoo_budget_scope in "
                                    "mm_processor_kwargs (vLLM's --trust-request-mm-kwargs: any "
                                    "mm_processor_kwargs then pass; for trusted clients)"))] = False,
    allow_untested_vllm: Annotated[bool, typer.Option(
        "--allow-untested-vllm", help="run on a vLLM version zoo's plugin was not tested with")] = False,
    config: ConfigOpt = None,
) -> None:
    """Serve MODEL with vLLM's OpenAI-compatible API, keeping --keep visual tokens per image.

    Any other option (--tensor-parallel-size 2, --max-model-len 4096, ...) goes to vLLM. With
    --request-settings a request may set its own budget or method:
    "mm_processor_kwargs": {"zoo_keep": "32", "zoo_method": "divprune"}.
    """
    from zoocli.adapters import checkpoint_source
    from zoocli.cli.progress import loading
    from zoocli.integrations.vllm import serve as srv
    from zoocli.integrations.vllm.settings import ZooSettings, check_settings
    from zoocli.methods import get_method, parse_method_spec

    name, extra = parse_method_spec(method)
    zoo = {k: v for k, v in opts.zoo().items() if k in get_method(name).options and v is not None}
    spec = ":".join([name] + [f"{k}={v}" for k, v in {**zoo, **extra}.items()])
    settings = check_settings(ZooSettings(method=spec, keep=keep, budget_scope=opts.budget_scope, seed=opts.seed),
                              "zoo serve")
    version = srv.check_vllm()
    with loading(model, False) as on_status:
        source, model_type, meaningless = checkpoint_source(model, on_status=on_status)
    cmd = srv.server_command(source, model_type, model, settings, host=host, port=port, dtype=dtype,
                             allow_untested_vllm=allow_untested_vllm,
                             extra=list(ctx.args) + (["--trust-request-mm-kwargs"] if request_settings else []))
    note(f"vLLM {version}, {model} ({model_type}{', random weights: answers mean nothing' if meaningless else ''}), "
         f"method {spec}, keep {keep} per image; greedy when a request asks for temperature 0")
    console.print(f"serving on http://{host}:{port}/v1 once vLLM has started (its log follows; Ctrl-C stops it)")
    console.print("try:", srv.curl_example(model, host, port, keep if request_settings else None),
                  soft_wrap=True, highlight=False)
    code = srv.run_server(cmd)
    if code:
        raise typer.Exit(code)
