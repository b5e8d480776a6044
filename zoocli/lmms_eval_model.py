"""zoo as an lmms-eval (0.7.x) model: every lmms-eval task, answered with pruned visual tokens.

    pip install "zoo-prune[lmms]"
    python -m lmms_eval --model zoo --model_args pretrained=llava-1.5,method=zoo,keep=64 \\
        --tasks pope,gqa --batch_size 8 --output_path out

lmms-eval finds the model through the entry point ``zoo`` of the group ``lmms_eval.models``
(``manifest``). ``--model_args`` takes what ``zoo ask`` takes (``MODEL_ARGS``); an unknown key
is refused with the list of known ones. Each ``generate_until`` request is one image and its
prompt (lmms-eval's context, stripped as ``zoo ask`` strips a question): requests are encoded
one by one, then answered in batches of ``batch_size`` by ``eval_runner.answer_batch``, the
batched path of ``zoo eval``; requests with different ``max_new_tokens`` go in different
batches. An answer is the stripped generated text cut at the first of the task's ``until``
strings, so it equals what ``zoo ask`` prints for the same image, prompt, model and settings
whenever that answer holds no ``until`` string. Decoding is greedy only. ``stats=PATH`` writes
one JSON line per request (task, doc_id, visual tokens kept / total, timings in ms: selection,
prefill, ...) and the run's start time (``run``); like ``zoo eval --out`` it is only ever
appended to, and only when it is new, empty or zoo's own statistics (``zoocli.outfile``: an
existing file of anything else, a FIFO or a device is refused in one line and left alone); with
several processes each rank writes ``PATH`` with ``.rankN`` before its suffix.

Several processes (``accelerate launch -m lmms_eval`` or ``torchrun -m lmms_eval``): lmms-eval
shards the documents by ``RANK`` / ``WORLD_SIZE``; the model builds an ``accelerate.Accelerator``
(as lmms-eval's own models do) for ``rank`` / ``world_size`` and, on CUDA, uses the GPU of its
local rank.

This module imports lmms-eval: zoo itself never imports it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms

from zoocli.errors import UsageError, ZooError

MODEL_ID = "zoo"

# model_args key -> (default, type): "str", "int", "float", "bool", "keep", and "int?" / "float?" /
# "str?" (also none). Defaults are `zoo ask`'s; None for the method-option group means the
# default of `zoo ask`'s group (``cli.common.MethodOptions``, through which these keys go).
METHOD_GROUP = ("m", "h", "seed", "estimator", "rank", "select_backend", "budget_scope")
MODEL_ARGS: dict[str, tuple[Any, str]] = {
    "pretrained": ("llava-1.5", "str"),  # alias, offline model, HF id or local dir
    "method": ("zoo", "str"),  # a method spec: zoo, zoo:estimator=jvp, fastv:K=3, none
    "keep": ("64", "keep"),  # a count (64) or a share (11%)
    "m": (None, "int?"), "h": (None, "float?"), "seed": (None, "int?"), "estimator": (None, "str?"),
    "rank": (None, "int?"), "select_backend": (None, "str?"), "budget_scope": (None, "str?"),
    "dtype": ("auto", "str"), "device": ("auto", "str"),
    "random_weights": (False, "bool"),
    "max_new_tokens": (64, "int"),  # used when a task gives none
    "cache_dir": (None, "str?"),  # where offline models are built (load_adapter's cache_dir)
    "stats": (None, "str?"),  # JSON Lines file of per-request pruning statistics
    "batch_size": (8, "int"),  # lmms-eval's --batch_size
    "max_batch_size": (None, "int?"),  # lmms-eval passes it; only for --batch_size auto: unused
}

MAX_ARG_CHARS = 10_000  # a model_args value (a path, a method spec) is far shorter
MAX_UNTIL = 256  # stop strings of one request
MAX_UNTIL_CHARS = 10_000  # characters of one stop string


def _shown(value: Any) -> str:
    """A value for a message, shortened (a 20,000-character path)."""
    s = repr(value)
    return s if len(s) <= 80 else s[:60] + "..." + s[-10:]


NEEDS_LOGLIKELIHOOD = ("multiple-choice tasks scored by log-probabilities (output_type "
                       "multiple_choice, e.g. the *_ppl variants)")


def manifest():
    """The entry point lmms-eval loads (group ``lmms_eval.models``): a ``ModelManifest``.
    (Imported here: ``lmms_eval.models`` loads the entry points when it is first imported, and
    importing it at the top would do that while this module is half initialised.)"""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="zoocli.lmms_eval_model.ZooLMM")


@dataclasses.dataclass(frozen=True)
class ZooArgs:
    """Validated model_args (see ``MODEL_ARGS``). ``method_options``: `zoo ask`'s option group
    (m, h, seed, estimator, rank, budget_scope); ``zoo_options``: what it gives the methods."""

    pretrained: str
    method: str
    keep: str
    dtype: str
    device: str
    random_weights: bool
    max_new_tokens: int
    cache_dir: str | None
    stats: str | None
    batch_size: int
    max_batch_size: int | None
    method_options: Any
    zoo_options: dict[str, Any]


def _coerce(key: str, value: Any, kind: str) -> Any:
    """A model_args value (typed by lmms-eval: "64" -> 64, "0.5" -> 0.5, "true" -> True) as
    ``kind``; ``UsageError`` naming the key otherwise."""
    if kind.endswith("?"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        kind = kind[:-1]
    ok = True
    if isinstance(value, str) and len(value) > MAX_ARG_CHARS:
        raise UsageError(f"zoo model_args: {key} is {len(value):,} characters long; at most "
                         f"{MAX_ARG_CHARS:,} are taken")
    if kind == "int":
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            try:
                value = int(value)
            except ValueError:  # over Python's digit limit: far out of any range below
                raise UsageError(f"zoo model_args: {key} is a number of {len(value.strip()):,} "
                                 "digits, far out of range") from None
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                ok = False
        ok = ok and isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        ok = isinstance(value, bool)
    elif kind == "keep":
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        value = str(value).strip()
    else:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value)
    if not ok:
        raise UsageError(f"zoo model_args: {key}={_shown(value)} is not a valid {kind}")
    return value


def parse_model_args(**kwargs: Any) -> ZooArgs:
    """Check and type ``--model_args`` (plus lmms-eval's batch_size / max_batch_size / device,
    None meaning not given) before anything loads. Method spec, budget and ZOO options go
    through the validators ``zoo ask`` uses."""
    from zoocli.cli.common import MethodOptions
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import parse_keep

    unknown = sorted(set(kwargs) - set(MODEL_ARGS))
    if unknown:
        raise UsageError(f"zoo model_args: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; known: {', '.join(sorted(MODEL_ARGS))}")
    values = {k: default for k, (default, _) in MODEL_ARGS.items()}
    for key, value in kwargs.items():
        if value is not None:
            values[key] = _coerce(key, value, MODEL_ARGS[key][1])
    from zoocli.cli.common import MAX_BATCH, MAX_NEW_TOKENS, check_int

    for key, high in (("batch_size", MAX_BATCH), ("max_batch_size", MAX_BATCH),
                      ("max_new_tokens", MAX_NEW_TOKENS)):  # zoo's own limits (the CLI's)
        if values[key] is not None:
            check_int(f"zoo model_args: {key}", values[key], 1, high)
    if values["cache_dir"] is not None:
        cache = Path(values["cache_dir"]).expanduser()
        if cache.exists() and not cache.is_dir():
            raise UsageError(f"zoo model_args: cache_dir={values['cache_dir']} is not a folder (a file is "
                             "there); give the folder where offline models are built")
    parse_keep(values["keep"], 10**9, "keep")  # syntax and sign; clamped per image later
    parse_method_spec(values["method"])
    group = MethodOptions(**{k: values.pop(k) for k in METHOD_GROUP if values[k] is not None})
    return ZooArgs(**{k: v for k, v in values.items() if k not in METHOD_GROUP},
                   method_options=group, zoo_options=group.zoo())


def _gen_number(gen_kwargs: dict, key: str, kind: type, low: float, high: float, default):
    """gen_kwargs[key] as a number of ``kind`` in [low, high] (None: ``default``)."""
    import math

    v = gen_kwargs.get(key)
    if v is None:
        return default
    ok = isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)
    if not ok or (isinstance(v, float) and not math.isfinite(v)) or not low <= v <= high:
        what = "an integer" if kind is int else "a number"
        raise UsageError(f"gen_kwargs: {key} must be {what} from {low:g} to {high:g}, got {_shown(v)}")
    return v


def generation_settings(gen_kwargs: Any, default_max_new_tokens: int) -> tuple[int, list[str]]:
    """(max_new_tokens, until strings) of one request, every field zoo reads type-checked and
    bounded (max_new_tokens as the CLI's --max-new-tokens); sampling and beam search are refused."""
    from zoocli.cli.common import MAX_NEW_TOKENS

    if gen_kwargs is None:
        gen_kwargs = {}
    if not isinstance(gen_kwargs, dict):
        raise UsageError(f"gen_kwargs must be a table of generation settings, got a "
                         f"{type(gen_kwargs).__name__}")
    temperature = _gen_number(gen_kwargs, "temperature", float, 0, 1e6, 0)
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise UsageError(f"gen_kwargs: do_sample must be true or false, got {_shown(do_sample)}")
    if temperature > 0 or do_sample:
        raise UsageError(f"zoo decodes greedily only; this task asks for sampling (temperature="
                         f"{temperature}, do_sample={do_sample}): set "
                         f"--gen_kwargs temperature=0,do_sample=false")
    num_beams = _gen_number(gen_kwargs, "num_beams", int, 1, 10**6, 1)
    if num_beams > 1:
        raise UsageError(f"zoo decodes greedily only; this task asks for num_beams="
                         f"{num_beams}: set --gen_kwargs num_beams=1")
    max_new = _gen_number(gen_kwargs, "max_new_tokens", int, 1, MAX_NEW_TOKENS, default_max_new_tokens)
    until = gen_kwargs.get("until")
    until = [] if until is None else [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise UsageError(f"gen_kwargs: until must be a string or a list of strings, got {_shown(until)}")
    if len(until) > MAX_UNTIL or any(len(u) > MAX_UNTIL_CHARS for u in until):
        raise UsageError(f"gen_kwargs: until takes at most {MAX_UNTIL} strings of at most "
                         f"{MAX_UNTIL_CHARS:,} characters")
    return max_new, [u for u in until if u]


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` (stripped) up to the first occurrence of any of ``until``, stripped."""
    text = text.strip()
    cuts = [i for i in (text.find(u) for u in until) if i >= 0]
    return (text[:min(cuts)] if cuts else text).strip()


def single_image(visuals: Any, task: str, doc_id: Any):
    """The one PIL image of a request; a clear error for none, several, or a video."""
    from PIL import Image

    visuals = [] if visuals is None else list(visuals)
    where = f"task {task}, doc {doc_id}"
    if not visuals:
        raise UsageError(f"{where}: the request has no image; zoo prunes visual tokens and answers "
                         f"questions about one image (text-only tasks are not supported)")
    if len(visuals) > 1:
        raise UsageError(f"{where}: the request has {len(visuals)} images; zoo answers about one "
                         f"image per request (multi-image tasks are not supported)")
    if not isinstance(visuals[0], Image.Image):
        raise UsageError(f"{where}: the request's visual is a {type(visuals[0]).__name__}, not an "
                         f"image (video and audio tasks are not supported)")
    return visuals[0].convert("RGB")


class ZooLMM(lmms):
    """lmms-eval's simple model over a zoo adapter and one method at one budget."""

    is_simple = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.args = args = parse_model_args(**kwargs)
        from accelerate import Accelerator

        from zoocli.adapters import load_adapter
        from zoocli.eval_runner import EvalSpec
        from zoocli.methods import parse_method_spec
        from zoocli.pipeline import check_family

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        device = args.device
        if self._world_size > 1 and device.startswith(("auto", "cuda")):
            import torch

            if torch.cuda.is_available():  # one GPU per process
                device = f"cuda:{self.accelerator.local_process_index}"
        if args.stats is not None:
            _check_stats(args.stats, self._rank, self._world_size)
        self.adapter = load_adapter(args.pretrained, device=device, dtype=args.dtype,
                                    random_weights=args.random_weights, cache_dir=args.cache_dir)
        check_family(self.adapter, parse_method_spec(args.method)[0])
        self.batch_size = args.batch_size
        group = args.method_options
        self.spec = EvalSpec(model=args.pretrained, methods=[args.method], budgets=[args.keep],
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             seed=group.seed, options=args.zoo_options, scope=group.budget_scope)
        self._stats = None
        self._run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # tells reruns apart in stats
        self._warned: set[str] = set()

    @property
    def device(self):
        return self.adapter.device

    # ------------------------------------------------------------------ not supported

    def loglikelihood(self, requests) -> list:
        tasks = sorted({str(r.task_name) for r in requests})
        raise NotImplementedError(
            f"zoo generates answers (generate_until) and does not compute log-likelihoods, which "
            f"{', '.join(tasks) or 'these tasks'} need: {NEEDS_LOGLIKELIHOOD} are not supported")

    def generate_until_multi_round(self, requests) -> list:
        tasks = sorted({str(r.task_name) for r in requests})
        raise NotImplementedError(
            f"zoo answers one round per request; multi-round generation, which "
            f"{', '.join(tasks) or 'these tasks'} need, is not supported")

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests) -> list[str]:
        """Answers in request order, batched per ``max_new_tokens`` in chunks of batch_size."""
        from tqdm import tqdm

        jobs: dict[int, list[tuple[int, Any, list[str]]]] = {}
        for i, req in enumerate(requests):
            try:
                max_new, until = generation_settings(req.args[1], self.args.max_new_tokens)
            except UsageError as e:
                e.args = (f"task {req.task_name}: {e}",) + tuple(e.args[1:])
                raise
            jobs.setdefault(max_new, []).append((i, req, until))
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="zoo answering")
        for max_new, group in jobs.items():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                for (i, _req, _until), text in zip(chunk, self._answer_chunk(chunk, max_new)):
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out

    def _answer_chunk(self, chunk, max_new: int) -> list[str]:
        from zoocli.eval_runner import answer_batch
        from zoocli.pipeline import encode_image

        encs = []
        for _i, req, _until in chunk:
            ctx, _gen, doc_to_visual, doc_id, task, split = req.args
            image = single_image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)
            if not str(ctx).strip():
                raise UsageError(f"task {task}, doc {doc_id}: the prompt is empty")
            try:
                encs.append(encode_image(self.adapter, image, str(ctx).strip()))  # as `zoo ask` sends it
            except ZooError as e:  # a prompt longer than the model's context, ...
                e.args = (f"task {task}, doc {doc_id}: {e}",) + tuple(e.args[1:])
                raise
        spec = dataclasses.replace(self.spec, max_new_tokens=max_new)
        warned: set[str] = set()
        answers = answer_batch(self.adapter, encs, self.args.method, self.args.keep, spec, warned,
                               option="keep")
        self._warn(warned)
        texts = []
        for (_i, req, until), a in zip(chunk, answers):
            texts.append(cut_at(a.text, until))
            self._write_stats(req, a, max_new)
        return texts

    def _warn(self, warned: set[str]) -> None:
        from loguru import logger

        for w in sorted(warned - self._warned):
            logger.warning(f"zoo: {w}")
        self._warned |= warned

    # ------------------------------------------------------------------ statistics

    def _write_stats(self, req, answer, max_new: int) -> None:
        if self.args.stats is None:
            return
        if self._stats is None:
            self._stats = _open_stats(self.args.stats, self.rank, self.world_size)
        _ctx, _gen, _vis, doc_id, task, split = req.args
        record = {
            "task": task, "split": split, "doc_id": doc_id, "model": self.args.pretrained,
            "method": self.args.method,
            "keep": None if self.args.method == "none" else self.args.keep,
            "kept_tokens": answer.kept, "n_visual_tokens": answer.n_visual,
            "selection_ms": round(float(answer.timings_ms["selection"]), 3),
            "prefill_ms": round(float(answer.timings_ms["prefill"]), 3),
            "timings_ms": {k: round(float(v), 3) for k, v in answer.timings_ms.items()},
            "batch_rows": answer.batch_rows, "max_new_tokens": max_new,
            "meaningless": bool(self.adapter.meaningless), "run": self._run,
        }
        self._stats.append(record)

    def clean(self):
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        super().clean()


STATS_WHAT = "zoo model_args stats"


def _stats_path(path: str, rank: int, world_size: int) -> Path:
    """The stats file of this process: ``path``, or its ``.rankN`` shard with several."""
    from zoocli.evaluation import shard_path

    return Path(path) if world_size == 1 else shard_path(path, rank)


def _check_stats(path: str, rank: int, world_size: int) -> None:
    """Refuse, before the model loads, a stats file zoo must not append to (``zoocli.outfile``)."""
    from zoocli.outfile import STATS_HEADS, STATS_KEYS, check_jsonl

    check_jsonl(_stats_path(path, rank, world_size), STATS_KEYS, STATS_HEADS, STATS_WHAT)


def _open_stats(path: str, rank: int, world_size: int):
    """The stats file of this process opened for appending under ``zoocli.outfile``'s rule
    (checked again, locked while open)."""
    from zoocli.outfile import STATS_HEADS, STATS_KEYS, JsonlOut

    p = _stats_path(path, rank, world_size)
    return JsonlOut(p, STATS_KEYS, STATS_HEADS, what=STATS_WHAT)
