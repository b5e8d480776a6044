"""`zoo bench`: latency of every (method, budget) against the unpruned baseline, in one run.

Every clock read is device-synchronised (``zoocli.timing.Timer``). Rows are interleaved: each round
runs every row once on every image before the next round, so a load spike on a shared machine
hits all rows alike. The first round runs the rows in plan order (baseline first); every later
round in a fresh order, a shuffle seeded by ``spec.seed``. The first ``warmup`` rounds are left out
of the figures; each stage figure is the median (with min and max) over ``repeats`` x images.
Speed-ups are the median over repeats of the per-repeat ratio (times summed over the images)
against the unpruned row *of the same repeat*, with their min-max spread (``speedup_spread``).
When the baseline's own per-repeat TTFT spreads by more than ``NOISE_LIMIT`` ((max - min) /
median), every row says ``noisy: true``.

Resuming (``--out``): a row is *finished* when all its rounds are measured and the baseline has
finished too (its ratios need the baseline's last repeat). With interleaving, rows finish during
the last round, each as soon as its last run (and the baseline's) is done; it is yielded then, so
the caller can append it at once. A crash before the last round loses that run's measurements (no
row is written half-measured). Rows whose key is already in that file are skipped on a rerun (the
baseline is always re-measured, since the ratios need it, but written only once).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoocli.errors import UsageError, ZooError
from zoocli.methods import parse_method_spec
from zoocli.pipeline import check_family, encode_image, parse_keep, run_method
from zoocli.compare import BASELINE, NOISE_LIMIT, relative_spread, repeat_speedups, round_orders  # noqa: F401
from zoocli.timing import peak_memory_mb, reset_peak_memory, summarize

STAGES = ("preprocess", "vision", "selection", "prefill", "ttft", "decode", "e2e")
SPEEDUP_STAGES = ("prefill", "ttft", "e2e")


@dataclass
class BenchSpec:
    model: str
    methods: list[str]
    budgets: list[str]
    images: list[str]
    question: str = "Describe the image in one sentence."
    repeats: int = 5
    warmup: int = 1
    max_new_tokens: int = 32
    seed: int = 0
    scope: str = "crop"
    options: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    dtype: str = ""
    random_weights: bool = False

    def key(self, method: str, budget: str) -> dict[str, Any]:
        """What identifies a row: a rerun skips rows whose key is already in --out."""
        opts = self.method_options(method)
        return {
            "model": self.model, "device": self.device, "dtype": self.dtype,
            "random_weights": self.random_weights, "method": method, "budget": budget,
            "images": list(self.images), "question": self.question, "repeats": self.repeats,
            "warmup": self.warmup, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
            "scope": self.scope, "options": opts,
        }

    def method_options(self, spec: str) -> dict[str, Any]:
        """The options a method spec runs with: the command's, overridden by the spec's own."""
        from zoocli.methods import get_method

        name, extra = parse_method_spec(spec)
        known = get_method(name).options
        return {k: v for k, v in {**self.options, **extra}.items() if k in known}


def key_str(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def planned_rows(spec: BenchSpec) -> list[tuple[str, str]]:
    """(method, budget) of every row of a full bench, in measuring order: the baseline first."""
    return [(BASELINE, "all")] + [(m, b) for b in spec.budgets for m in spec.methods if m != BASELINE]


def planned_runs(spec: BenchSpec) -> int:
    """Model runs of a full bench (warm-up included): the progress bar's total."""
    rows = 1 + len(spec.budgets) * len([m for m in spec.methods if m != BASELINE])
    return rows * (spec.repeats + spec.warmup) * len(spec.images)


def done_keys(path: Path | None) -> set[str]:
    """Keys of the rows already in an --out file; a torn last line (a crash) is ignored. The file
    must be new, empty or zoo's own bench rows: anything else (another file, a FIFO, a device) is
    refused with one line, before anything is measured (``zoocli.outfile.check_jsonl``)."""
    from zoocli.outfile import BENCH_HEADS, BENCH_KEYS, check_jsonl, check_regular

    if path is None or not check_regular(path):  # a FIFO or device is refused, never opened
        return set()
    keys = set()
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZooError(f"cannot read --out {path}: {getattr(e, 'strerror', None) or e}") from None
    check_jsonl(path, BENCH_KEYS, BENCH_HEADS)
    for line in text.split("\n"):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # the torn last line (check_jsonl vetted the others)
            continue
        if isinstance(row, dict) and "key" in row:
            keys.add(key_str(row["key"]))
    return keys


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk before going on; a torn last line is repaired
    first (never appended after), the file is checked and locked (``zoocli.outfile.JsonlOut``)."""
    from zoocli.outfile import BENCH_HEADS, BENCH_KEYS, JsonlOut

    with JsonlOut(path, BENCH_KEYS, BENCH_HEADS, make_parents=False) as out:
        out.append(row)


def llm_flops(cfg: Any, n_params: int, seq: int, new_tokens: int,
              layer_seqs: Sequence[float] | None = None) -> tuple[float, float]:
    """Analytic FLOPs of the language model: (prefill, decode). 2 FLOPs per multiply-add of every
    non-embedding weight per token, plus causal attention scores and values: 2·layers·d·L² for the
    prefill of L tokens and 4·layers·d·ctx per decoded token. ``layer_seqs``: the sequence length
    each layer runs on (in-LLM pruning: full length before the prune layer), else ``seq`` in all."""
    d = cfg.hidden_size
    layers = cfg.num_hidden_layers
    if layer_seqs is None:
        prefill = 2.0 * n_params * seq + 2.0 * layers * d * seq * seq
        decode = sum(2.0 * n_params + 4.0 * layers * d * (seq + t) for t in range(max(0, new_tokens - 1)))
        return prefill, decode
    per = n_params / layers
    prefill = sum(2.0 * per * s + 2.0 * d * s * s for s in layer_seqs)
    decode = sum(2.0 * per + 4.0 * d * (s + t) for t in range(max(0, new_tokens - 1)) for s in layer_seqs)
    return prefill, decode


def layer_lengths(full_len: int, n_candidates: int, n_layers: int, stages: Sequence[dict]) -> list[int]:
    """The sequence length each LLM layer runs on for an in-LLM run (``RunResult.llm_stages``)."""
    out, cur = [], full_len
    by_layer = {s["layer"]: s for s in stages}
    for i in range(n_layers):
        if i in by_layer:
            cur -= by_layer[i]["before"] - by_layer[i]["kept"]
        out.append(cur)
    return out


def selection_flops(method: str, n: int, keep: int, dims: dict[str, int], options: dict) -> float:
    """Analytic FLOPs of the selection: greedy cosine updates k·N·D·2; ZOO adds the sensitivity
    (fd/jvp: one second-Linear product per (token, direction), 2·N·m·d_hidden·d, or with rank r
    2·N·m·d_hidden·r, plus the first Linear once per token and once per direction)."""
    d = dims["d"]
    greedy = 2.0 * keep * n * d if method in ("zoo", "divprune", "sum") else 0.0
    if method not in ("zoo", "sensitivity", "sum"):
        return greedy
    m = options.get("m", 64)
    dh, dv = dims["d_hidden"], dims["d_in"]
    second = options.get("rank") or d
    zoo = 2.0 * n * m * dh * second + 2.0 * (n + m) * dv * dh
    if options.get("estimator") == "naive":
        zoo = 2 * 2.0 * n * m * (dv * dh + dh * d)
    return greedy + zoo


def bench_rows(
    adapter, images: Sequence[Any], spec: BenchSpec, skip: set[str] | None = None,
    progress: Callable[[str], None] | None = None,
    row_done: Callable[[str, str], None] | None = None,
    round_done: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Measure the baseline and every (budget, method) not in ``skip``, interleaved (module
    docstring); yield each row once it is finished (during the last round). ``progress(what)``
    after every model run; ``row_done(method, budget)`` when a row's last run is done (the
    baseline too, also when --out already holds it and it is not yielded); ``round_done(i, n)``
    when round i of n (1-based; warm-up rounds first) is done."""
    skip = skip or set()
    for name in spec.methods:
        check_family(adapter, parse_method_spec(name)[0])
    cfg = adapter.llm_dims()  # the LLM's sizes (hidden_size, layers...), parameters, projector dims
    n_llm, dims = cfg.n_params, dict(cfg.projector)
    plan = [(m, b) for m, b in planned_rows(spec) if m == BASELINE or key_str(spec.key(m, b)) not in skip]
    reps: dict[tuple[str, str], list[list[dict]]] = {row: [] for row in plan}  # per repeat, per image
    orders = round_orders(plan, spec.warmup + spec.repeats, spec.seed)
    pending, base_done = [], False
    for rnd, order in enumerate(orders):
        for row in order:
            runs = []
            for img in images:
                runs.append(_run_once(adapter, img, spec, *row, cfg))
                if progress:
                    progress(f"{row[0]}@{row[1]}")
            if rnd >= spec.warmup:  # warm-up rounds never reach the figures
                reps[row].append(runs)
            if rnd < len(orders) - 1:
                continue
            pending.append(row)  # the last round: this row is measured
            if row_done:
                row_done(*row)
            base_done |= row == (BASELINE, "all")
            if not base_done:  # its ratios wait for the baseline's last repeat
                continue
            for method, budget in pending:
                if method == BASELINE and key_str(spec.key(method, budget)) in skip:
                    continue
                yield _build(method, budget, reps[(method, budget)], reps[(BASELINE, "all")],
                             spec, adapter, cfg, n_llm, dims)
            pending = []
        if round_done:
            round_done(rnd + 1, len(orders))


def _repeat_ms(runs: list[dict], stage: str) -> float:
    """One repeat's time for a stage: summed over the images."""
    return sum(r["ms"][stage] for r in runs)


def _build(method, budget, row_reps, base_reps, spec, adapter, cfg, n_llm, dims) -> dict[str, Any]:
    """A finished row: stage summaries over all timed runs, FLOPs, and (not for the baseline) the
    median and min-max of the per-repeat speed-ups against the baseline of the same repeat."""
    runs = [r for rep in row_reps for r in rep]
    row = _row(method, budget, runs, adapter)
    name = parse_method_spec(method)[0]
    _add_flops(row, runs, cfg, n_llm, dims, name, spec.method_options(method))
    row["key"] = spec.key(method, budget)
    row["baseline_ttft_spread"] = relative_spread([_repeat_ms(rep, "ttft") for rep in base_reps])
    row["noisy"] = row["baseline_ttft_spread"] > NOISE_LIMIT
    if method != BASELINE:
        row.update(repeat_speedups([{s: _repeat_ms(rep, s) for s in SPEEDUP_STAGES} for rep in base_reps],
                                   [{s: _repeat_ms(rep, s) for s in SPEEDUP_STAGES} for rep in row_reps],
                                   SPEEDUP_STAGES))
    return row


def _run_once(adapter, img, spec: BenchSpec, method: str, budget: str, cfg) -> dict[str, Any]:
    """One run of ``method`` at ``budget`` on one image: what it contributes to its row."""
    reset_peak_memory(adapter.device)
    enc = encode_image(adapter, img, spec.question)
    keep = enc.n if budget == "all" else parse_keep(budget, enc.n, "--budgets")[0]
    res = run_method(adapter, enc, parse_method_spec(method)[0], keep, scope=spec.scope,
                     seed=spec.seed, options=spec.method_options(method),
                     max_new_tokens=spec.max_new_tokens)
    return _observe(adapter, enc, res, cfg)


def _observe(adapter, enc, res, cfg) -> dict[str, Any]:
    """What one timed run contributes to its row."""
    full_len = int(enc.prepared.inputs["input_ids"].shape[1])
    return {
        "ms": {s: res.timings_ms.get(s, 0.0) for s in STAGES}, "peak": peak_memory_mb(adapter.device),
        "kept": len(res.kept_indices), "candidates": res.n_visual_tokens,
        "llm_visual": res.n_llm_visual_kept, "stage": res.stage, "new_tokens": res.new_tokens,
        "seq": full_len - res.n_llm_visual_full + res.n_llm_visual_kept,
        # in-LLM methods: the sequence length each layer runs on
        "layer_seqs": (layer_lengths(full_len, res.n_visual_tokens, cfg.num_hidden_layers, res.llm_stages)
                       if res.llm_stages else None),
    }


def _median(runs: list[dict], key: str) -> float:
    return summarize([float(r[key]) for r in runs])["median"]


def _row(method: str, budget: str, runs: list[dict], adapter) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "budget": budget,
                           "stage": runs[-1]["stage"] if runs else "pre_llm"}
    for s in STAGES:
        row[s] = summarize([r["ms"][s] for r in runs])
    row["selection_share_of_ttft"] = row["selection"]["median"] / row["ttft"]["median"]
    row["kept_tokens"] = _median(runs, "kept")
    row["visual_tokens"] = _median(runs, "candidates")
    row["llm_visual_tokens"] = _median(runs, "llm_visual")
    row["new_tokens"] = _median(runs, "new_tokens")
    row["peak_memory_mb"] = max(r["peak"] for r in runs)
    row["peak_memory_kind"] = "cuda_max_allocated" if adapter.device.type == "cuda" else "process_peak_rss"
    return row


def _add_flops(row: dict[str, Any], runs: list[dict], cfg, n_llm: int, dims: dict[str, int],
               name: str, opts: dict) -> None:
    """``row["est_tflops"]``: analytic LLM prefill / decode and selection FLOPs (``llm_flops``,
    ``selection_flops``) at the median sequence length (per layer for in-LLM pruning)."""
    seq = int(_median(runs, "seq"))
    layer_seqs = [r["layer_seqs"] for r in runs if r["layer_seqs"] is not None]
    per_layer = None
    if layer_seqs:  # in-LLM pruning: early layers run at full length (median per layer over runs)
        per_layer = [summarize([float(r[i]) for r in layer_seqs])["median"] for i in range(len(layer_seqs[0]))]
    pre, dec = llm_flops(cfg, n_llm, seq, int(row["new_tokens"]), per_layer)
    sel = selection_flops(name, int(row["visual_tokens"]), int(row["kept_tokens"]), dims, opts)
    row["est_tflops"] = {"llm_prefill": pre / 1e12, "llm_decode": dec / 1e12,
                         "selection": sel / 1e12, "total": (pre + dec + sel) / 1e12}


SAMPLE_IMAGE = "two_cats_couch_remotes.jpg"  # `zoo compare` / `zoo score` without an image
SAMPLE_QUESTION = "How many remote controls are on the couch?"


# a model that knows only its own world gets a sample from it: demo-llava answers about shapes
SAMPLE_FOR_MODEL: dict[str, tuple[str, str]] = {
    "demo-llava": ("shapes/shapes_1.png", "What color is the circle?"),
}


def sample_example(model: str | None = None) -> tuple[Path, str]:
    """(the shipped sample image, its question): what `compare` and `score` run without an image;
    for demo-llava a shapes image and a question it can answer."""
    rel, question = SAMPLE_FOR_MODEL.get(model or "", (SAMPLE_IMAGE, SAMPLE_QUESTION))
    path = Path(__file__).resolve().parent.parent / "sample_images" / rel
    if not path.is_file():
        raise UsageError(f"the shipped sample image sample_images/{rel} is missing; give an image")
    return path, question


def shipped_images() -> list[Path]:
    """The sample images shipped next to the package (a source checkout)."""
    root = Path(__file__).resolve().parent.parent / "sample_images"
    imgs = sorted(p for p in root.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not imgs:
        raise UsageError("no shipped sample images found next to the package; pass --images")
    return imgs


def budget_warnings(adapter, images: Sequence[Any], spec: BenchSpec) -> list[str]:
    """One message per budget that keeps every visual token of an image (nothing is pruned
    there), naming the offline model of the same family that has enough tokens to prune. Costs
    one encoder pass per image (the token count of LLaVA-NeXT / Qwen depends on the image)."""
    from zoocli.adapters import OFFLINE_MAX_TOKENS, suggest_offline

    counts = [encode_image(adapter, img, spec.question).n for img in images]
    out = []
    for b in spec.budgets:
        kept = [(parse_keep(b, n, "--budgets")[0], n) for n in counts]
        full = [n for k, n in kept if k >= n]
        if not full:
            continue
        where = "" if len(full) == len(counts) else f" on {len(full)} of {len(counts)} images"
        msg = (f"--budgets {b} keeps all {max(full)} visual tokens of {adapter.model_id}{where}: "
               "nothing is pruned at that budget")
        other = suggest_offline(adapter.family, max(k for k, _ in kept) + 1)
        if other and other != adapter.model_id and OFFLINE_MAX_TOKENS[other] > max(full):
            msg += f"; try a smaller budget or --model {other} (up to {OFFLINE_MAX_TOKENS[other]} tokens)"
        out.append(msg)
    return out
