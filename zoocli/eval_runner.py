"""The model-facing half of ``zoo eval``: run questions through the unpruned model and each
method x budget, in batches, scoring and storing every prediction as its batch finishes.

    spec = EvalSpec(model="tiny-llava", methods=["zoo"], budgets=["64"], batch_size=8)
    stats = run_eval(adapter, [Dataset("pope", samples)], spec, writer, done=done_keys(paths),
                     rank=0, world_size=1, progress=lambda n, what: ...)

No printing here. Loop order: per dataset, the rank's share of the samples (``shard``) in chunks of
``batch_size``; each sample of a chunk is prepared and encoded once (vision per sample), then for
every configuration (the baseline ``none`` first, then each method x budget) the samples of the
chunk whose key ``(dataset, id, method, budget)`` is not in ``done`` are selected per sample,
built as one left-padded batch (``Adapter.build_inputs_batch``) and answered by one batched
greedy ``generate_batch``; their records are appended (flushed + fsynced) before the next
configuration starts. A crash therefore loses at most the batch being generated.

Methods that prune inside the LLM (FastV, SparseVLM) run one sample at a time through
``pipeline.run_method`` (the in-LLM driver is batch size 1); their records say ``"batch_rows": 1``
and their selection is not added again (it runs inside the prefill). Methods are named by spec: ``"zoo"`` or
``"zoo:estimator=jvp"`` (``methods.parse_method_spec``); the spec as written is the record's
``method``, so variants of one method are separate rows.

Per-record fields on top of ``make_record``: ``model`` (the name given), ``settings`` (the
decoding / method settings that must match on resume), ``n_visual_tokens`` (candidates before
pruning), ``batch_rows`` (rows of the generate batch it was in), ``meaningless`` (random
weights). ``kept_tokens``: visual
candidates kept (all of them for the baseline). ``timings_ms``: ``preprocess``, ``vision`` and
``selection`` are the sample's own; ``build``, ``prefill`` and ``decode`` are the batch's time
divided by its rows (each row's share); ``ttft`` and ``e2e`` follow ``timing.add_ttft_e2e`` (e2e
is the sum of the stages), so ``n / sum(e2e)`` is the
samples-per-second of that configuration with encoding counted for every configuration (as if
each ran alone). Budgets are stored as ints for counts (``64``) and as written for shares
(``"11%"``); the baseline's budget is None.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from zoocli.errors import UsageError, ZooError
from zoocli.evaluation import BASELINE, RecordWriter, Sample, make_record, shard
from zoocli.evaluation.store import record_key
from zoocli.methods import get_method, parse_method_spec
from zoocli.timing import Timer, add_ttft_e2e, device_sync



@dataclass
class Dataset:
    name: str
    samples: list[Sample]


@dataclass
class EvalSpec:
    model: str  # the model name as given (stored in records; a resume must match it)
    methods: list[str]  # method specs ("zoo", "zoo:estimator=jvp"), without the baseline
    budgets: list[str]  # counts ("64") or shares ("11%")
    batch_size: int = 8
    max_new_tokens: int = 16
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # method options (zoo: m, h, ...)
    scope: str = "crop"

    def configs(self) -> list[tuple[str, Any]]:
        """(method, budget) pairs: the baseline ``("none", None)`` first, then methods x budgets."""
        out: list[tuple[str, Any]] = [(BASELINE, None)]
        for m in self.methods:
            if m == BASELINE:
                continue
            for b in self.budgets:
                out.append((m, budget_value(b)))
        return list(dict.fromkeys(out))

    def settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "seed": self.seed, "scope": self.scope,
                **{k: self.options[k] for k in sorted(self.options)}}


@dataclass
class EvalStats:
    predictions: int = 0  # made by this call (resumed ones not counted)
    skipped: int = 0  # already in ``done``
    seconds: float = 0.0  # wall time of this call
    warnings: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float | None:
        return self.predictions / self.seconds if self.predictions and self.seconds > 0 else None


def budget_value(spec) -> int | str:
    """``"64"`` -> 64; ``"11%"`` -> ``"11%"`` (validated like ``--keep``)."""
    from zoocli.pipeline import parse_keep

    text = str(spec).strip()
    parse_keep(text, 10**9, "--budgets")  # syntax and sign
    return int(text) if text.lstrip("-").isdigit() else text.replace(" ", "")


def check_resumable(records: Sequence[dict], spec: EvalSpec, where: str) -> None:
    """Refuse to mix predictions of another model or other settings into one output file."""
    settings = spec.settings()
    for r in records:
        if "settings" in r and "estimator" not in r["settings"]:  # written before eval took it: fd
            r = {**r, "settings": {**r["settings"], "estimator": "fd"}}
        if "model" in r and r["model"] != spec.model:
            raise ZooError(f"{where} holds predictions of model '{r['model']}', not '{spec.model}'; "
                           f"use another --out")
        if "settings" in r and r["settings"] != settings:
            diff = sorted(k for k in set(settings) | set(r["settings"])
                          if settings.get(k) != r["settings"].get(k))
            raise ZooError(f"{where} holds predictions made with other settings ({', '.join(diff)}); "
                           f"use the same options or another --out")


def todo_count(datasets: Sequence[Dataset], spec: EvalSpec, done: set, rank: int = 0,
               world_size: int = 1) -> int:
    """Predictions still to make on this rank."""
    configs = spec.configs()
    return sum(1 for d in datasets for s in shard(d.samples, rank, world_size)
               for m, b in configs if (d.name, str(s.id), m, b) not in done)


def _image(adapter, load_image: Callable[[str], Any] | None, sample: Sample):
    """The sample's image (inside its image folder, checked again as it is opened), checked
    against the family's limits with the file named in the error (``adapter.prepare`` would
    refuse it too, without the name)."""
    if load_image is None:
        from zoocli.images import load_image as load

        im = load(sample.image, root=sample.image_root)
    else:
        im = load_image(sample.image)
    adapter.check_image(im.size, sample.image)
    return im


def run_eval(
    adapter, datasets: Sequence[Dataset], spec: EvalSpec, writer: RecordWriter, *,
    done: set | None = None, rank: int = 0, world_size: int = 1,
    progress: Callable[[int, str], None] | None = None,
    load_image: Callable[[str], Any] | None = None,
) -> EvalStats:
    """Make every missing prediction of this rank's share and append its record to ``writer``."""
    from zoocli.pipeline import check_family

    if spec.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {spec.batch_size}")
    if spec.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {spec.max_new_tokens}")
    for m in spec.methods:
        check_family(adapter, parse_method_spec(m)[0])
    done = set(done or ())
    configs = spec.configs()
    stats = EvalStats()
    t_start = time.perf_counter()
    warned: set[str] = set()
    for ds in datasets:
        mine = shard(ds.samples, rank, world_size)
        pending = []
        for s in mine:
            missing = [(m, b) for m, b in configs if (ds.name, str(s.id), m, b) not in done]
            stats.skipped += len(configs) - len(missing)
            if missing:
                pending.append((s, missing))
        for start in range(0, len(pending), spec.batch_size):
            chunk = pending[start:start + spec.batch_size]
            encs = [_encode(adapter, _image(adapter, load_image, s), s.question,
                            f"{ds.name}, question {s.id}") for s, _ in chunk]
            for m, b in configs:
                rows = [(s, e) for (s, missing), e in zip(chunk, encs) if (m, b) in missing]
                if not rows:
                    continue
                recs = _run_config(adapter, ds.name, rows, m, b, spec, warned)
                for r in recs:
                    writer.write(r)
                    done.add(record_key(r))
                stats.predictions += len(recs)
                if progress is not None:
                    progress(len(recs), f"{ds.name} · {m}" + ("" if b is None else f"@{b}"))
    stats.seconds = time.perf_counter() - t_start
    stats.warnings = sorted(warned)
    return stats


def _encode(adapter, image, question: str, where: str):
    """The sample encoded; a refusal (a question longer than the model's context, ...) names the
    sample (``where``)."""
    from zoocli.pipeline import encode_image

    try:
        return encode_image(adapter, image, question)
    except ZooError as e:
        e.args = (f"{where}: {e}",) + tuple(e.args[1:])
        raise


def _batchable(method) -> bool:
    return method.stage == "pre_llm"


def _run_config(adapter, dataset: str, rows, method_name: str, budget, spec: EvalSpec,
                warned: set[str]) -> list[dict]:
    """Predictions of one (method, budget) for ``rows`` = [(sample, EncodedImage)]."""
    extra = {"model": spec.model, "settings": spec.settings(), "meaningless": bool(adapter.meaningless)}
    answers = answer_batch(adapter, [enc for _s, enc in rows], method_name, budget, spec, warned)
    return [make_record(s, dataset, method_name, budget, a.text, kept_tokens=a.kept,
                        timings_ms=_round(a.timings_ms), n_visual_tokens=enc.n,
                        batch_rows=a.batch_rows, **extra)
            for (s, enc), a in zip(rows, answers)]


@dataclass
class Answer:
    """One row's answer from ``answer_batch``: the generated text (as the adapter decoded it),
    visual candidates kept / total, the timings (ms, see the module docstring) and the rows of
    the generate batch it was in."""

    text: str
    kept: int
    n_visual: int
    timings_ms: dict[str, float]
    batch_rows: int


def answer_batch(adapter, encs, method_name: str, budget, spec: EvalSpec, warned: set[str],
                 option: str = "--budgets") -> list[Answer]:
    """Answers of one method spec (``"zoo"``, ``"zoo:estimator=jvp"``, or the baseline ``"none"``)
    at ``budget`` (a count or ``"11%"``; ignored for the baseline) for already encoded images
    ``encs`` (``pipeline.EncodedImage``, each with its question), in order: the one batched path
    of ``zoo eval`` and the lmms-eval backend. Decoding and method settings come from ``spec``
    (``max_new_tokens``, ``seed``, ``scope``, ``options``); clamp warnings are added to ``warned``
    and name ``option``."""
    keeps = _keeps(encs, method_name, budget, option, warned)
    name, spec_opts = parse_method_spec(method_name)
    options = {**spec.options, **spec_opts}
    if method_name != BASELINE and not _batchable(get_method(name)):  # one at a time, through the pipeline
        return _answer_one_by_one(adapter, encs, keeps, name, options, spec)
    items, per = _select_batch(adapter, encs, keeps, method_name, name, options, spec)
    gens, shares, n_rows = _generate_batch(adapter, items, spec.max_new_tokens)
    out = []
    for enc, p, g, share in zip(encs, per, gens, shares):
        t = {"preprocess": p["preprocess"], "vision": p["vision"], "selection": p["selection"], **share}
        add_ttft_e2e(t)
        out.append(Answer(g.text, p["kept"], enc.n, t, n_rows))
    return out


def _keeps(encs, method_name: str, budget, option: str, warned: set[str]) -> list[int]:
    """Tokens kept per image: all for the baseline, else ``budget`` resolved (clamp warnings to ``warned``)."""
    from zoocli.pipeline import parse_keep

    keeps = []
    for enc in encs:
        if method_name == BASELINE:
            keeps.append(enc.n)
            continue
        k, warn = parse_keep(budget, enc.n, option)
        if warn:
            warned.add(warn)
        keeps.append(k)
    return keeps


def _answer_one_by_one(adapter, encs, keeps, name: str, options: dict, spec: EvalSpec) -> list[Answer]:
    """A method that cannot batch: each image through ``pipeline.run_method``."""
    from zoocli.pipeline import run_method

    out = []
    for enc, k in zip(encs, keeps):
        res = run_method(adapter, enc, name, k, scope=spec.scope, seed=spec.seed,
                         options=options, max_new_tokens=spec.max_new_tokens)
        t = add_ttft_e2e({key: res.timings_ms.get(key, 0.0) for key in
                          ("preprocess", "vision", "selection", "build", "prefill", "decode")},
                         selection_in_prefill=True)
        out.append(Answer(res.answer, len(res.kept_indices), enc.n, t, 1))
    return out


def _select_batch(adapter, encs, keeps, method_name: str, name: str, options: dict, spec: EvalSpec):
    """The kept tokens of every image (timed one by one): the batch items and per-image timings."""
    from zoocli.pipeline import select_tokens

    items, per = [], []
    for enc, k in zip(encs, keeps):
        timer = Timer(sync=lambda: device_sync(adapter.device))
        with timer("selection"):
            if method_name == BASELINE:
                kept, tokens = torch.arange(enc.n, device=enc.encoded.features.device), None
            else:
                sel = select_tokens(adapter, enc.prepared, enc.encoded, name, k,
                                    scope=spec.scope, seed=spec.seed, options=options)
                kept, tokens = sel.kept, sel.tokens
        items.append((enc.prepared, enc.encoded, kept, tokens))
        per.append({**enc.timings_ms, "selection": 0.0 if method_name == BASELINE else timer.ms["selection"],
                    "kept": int(kept.numel())})
    return items, per


def _generate_batch(adapter, items, max_new_tokens: int):
    """One batched generate call (each row gets its share of the time), or one row at a time for
    inputs this family cannot batch. Returns (generations, per-row build/prefill/decode ms, rows per call)."""
    n = len(items)
    try:
        timer = Timer(sync=lambda: device_sync(adapter.device))
        with timer("build"):
            inputs = adapter.build_inputs_batch(items)
        gens = adapter.generate_batch(inputs, max_new_tokens)
        # every row of one generate call carries the whole batch's time: give each row its share
        shares = [{"build": timer.ms["build"] / n, "prefill": gens[0].prefill_ms / n,
                   "decode": gens[0].decode_ms / n}] * n
        return gens, shares, n
    except NotImplementedError:  # inputs this family cannot batch: one row at a time
        gens, shares = [], []
        for it in items:
            timer = Timer(sync=lambda: device_sync(adapter.device))
            with timer("build"):
                one = adapter.build_inputs_batch([it])
            g = adapter.generate_batch(one, max_new_tokens)[0]
            gens.append(g)
            shares.append({"build": timer.ms["build"], "prefill": g.prefill_ms, "decode": g.decode_ms})
        return gens, shares, 1


def _round(t: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 3) for k, v in t.items()}
