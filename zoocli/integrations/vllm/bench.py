"""``zoo bench --engine vllm``: each method x budget against the unpruned model inside vLLM's
engine (zoo's plugin), interleaved, timed by vLLM's own request metrics.

One engine for the whole grid: every row sets its method and budget per request
(``mm_processor_kwargs``). A round sends each row's ``concurrency`` requests as one batch, rows in
`zoo bench`'s order (``zoocli.compare.round_orders``: the plan's, then a seeded shuffle each round;
the first ``warmup`` rounds are left out). Each request carries
a fresh ``multi_modal_uuids`` entry and prefix caching is off, so every request encodes its image,
selects and prefills: nothing is served from a cache. Per row: TTFT median and p90 over all its
timed requests (vLLM's ``first_token_latency``), requests/s and output tokens/s per round (the
batch's count over its wall time), and speed-ups against the unpruned row as the median over
rounds of per-round ratios, with their min and max. Rows go to ``--out`` as ``zoo bench`` rows do
(one JSON line per finished row; a rerun skips rows whose key is there).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from zoocli.timing import summarize

BASELINE = "none"


@dataclass
class VllmBenchSpec:
    model: str
    methods: list[str]
    budgets: list[str]
    images: list[str]  # names, for the row keys
    question: str = "Describe the image in one sentence."
    repeats: int = 5
    warmup: int = 1
    max_new_tokens: int = 32
    concurrency: int = 8
    seed: int = 0
    scope: str = "crop"
    dtype: str = "auto"
    vllm_version: str = ""

    def key(self, method: str, budget: str) -> dict[str, Any]:
        return {"engine": "vllm", "vllm": self.vllm_version, "model": self.model, "dtype": self.dtype,
                "method": method, "budget": budget, "images": list(self.images), "question": self.question,
                "repeats": self.repeats, "warmup": self.warmup, "max_new_tokens": self.max_new_tokens,
                "concurrency": self.concurrency, "seed": self.seed, "scope": self.scope}

    def rows(self) -> list[tuple[str, str]]:
        return [(BASELINE, "all")] + [(m, b) for b in self.budgets for m in self.methods if m != BASELINE]


def chat_prompt(source: str, question: str) -> str:
    """One image and the question in the checkpoint's chat template (the processor's, as vLLM's
    chat endpoint renders it), as text with the image placeholder."""
    from transformers import AutoProcessor

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return AutoProcessor.from_pretrained(source).apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)


def run_bench(llm, prompt: str, images: Sequence[Any], spec: VllmBenchSpec, skip: set[str],
              key_str: Callable[[dict], str], progress: Callable[[str], None] | None = None
              ) -> Iterator[dict[str, Any]]:
    """Measure the baseline and every row not in ``skip``; yield rows as they finish (in the last
    round). ``progress(text)`` after every row of every round."""
    from vllm import SamplingParams

    from zoocli.compare import round_orders

    plan = [r for r in spec.rows() if r[0] == BASELINE or key_str(spec.key(*r)) not in skip]
    per: dict[tuple[str, str], list[dict[str, Any]]] = {r: [] for r in plan}
    params = SamplingParams(temperature=0, max_tokens=spec.max_new_tokens, ignore_eos=True)
    rounds = spec.warmup + spec.repeats
    serial = 0
    pending: list[tuple[str, str]] = []
    for rnd, order in enumerate(round_orders(plan, rounds, spec.seed)):
        for method, budget in order:
            reqs = []
            for i in range(spec.concurrency):
                serial += 1
                kw = {"zoo_method": method} if budget == "all" else {"zoo_method": method, "zoo_keep": budget}
                reqs.append({"prompt": prompt, "multi_modal_data": {"image": images[i % len(images)]},
                             "multi_modal_uuids": {"image": f"zoo-bench-{serial}"}, "mm_processor_kwargs": kw})
            t0 = time.perf_counter()
            outs = llm.generate(reqs, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            if rnd >= spec.warmup:
                per[(method, budget)].append({
                    "ttft_s": [o.metrics.first_token_latency for o in outs],
                    "wall_s": wall, "requests": len(outs),
                    "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                    "prompt_tokens": statistics.median(len(o.prompt_token_ids) for o in outs),
                })
            if progress:
                progress(f"round {rnd + 1}/{rounds}: {method} @ {budget}")
            if rnd == rounds - 1:
                pending.append((method, budget))
        if rnd == rounds - 1:
            for row in spec.rows():  # the baseline ran again for the ratios: written only if new
                if row in pending and key_str(spec.key(*row)) not in skip:
                    yield summarize_row(spec, row, per[row], per[(BASELINE, "all")])


def _q(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize_row(spec: VllmBenchSpec, row: tuple[str, str], reps: list[dict], base: list[dict]) -> dict[str, Any]:
    method, budget = row
    ttfts = [t for r in reps for t in r["ttft_s"]]
    out: dict[str, Any] = {
        "method": method, "budget": budget, "key": spec.key(method, budget), "engine": "vllm",
        "concurrency": spec.concurrency, "rounds": len(reps),
        "prompt_tokens": reps[-1]["prompt_tokens"],
        "ttft_ms": {"median": 1000 * statistics.median(ttfts), "p90": 1000 * _q(ttfts, 0.9)},
        "requests_per_s": summarize([r["requests"] / r["wall_s"] for r in reps]),
        "output_tokens_per_s": summarize([r["output_tokens"] / r["wall_s"] for r in reps]),
    }
    if method != BASELINE:  # per-round ratios, in round order (both rows ran in every round)
        ttft = [statistics.median(b["ttft_s"]) / statistics.median(r["ttft_s"]) for r, b in zip(reps, base)]
        rps = [(r["requests"] / r["wall_s"]) / (b["requests"] / b["wall_s"]) for r, b in zip(reps, base)]
        out["speedup"] = {"ttft": summarize(ttft), "requests_per_s": summarize(rps)}
    return out


def start_engine(source: str, model_type: str, *, dtype: str, max_model_len: int | None = None,
                 allow_untested_vllm: bool = False, **engine_kw):
    """vLLM's ``LLM`` on ``source`` with zoo's model class (default: unpruned; rows set their own
    method and budget per request), prefix caching off."""
    from vllm import LLM

    from zoocli.integrations.vllm.serve import vllm_dtype
    from zoocli.integrations.vllm.settings import ZooSettings, engine_overrides

    kw = dict(engine_kw)
    if max_model_len:
        kw["max_model_len"] = max_model_len
    return LLM(model=source, dtype=vllm_dtype(dtype), enable_prefix_caching=False, disable_log_stats=False,
               hf_overrides=engine_overrides(model_type, ZooSettings(method="none", keep="1"), allow_untested_vllm),
               **kw)
