"""zoo's settings inside vLLM: what an engine is started with and what a request may change.

One language with the CLI: a method spec (``zoo``, ``zoo:estimator=fd``, ``divprune``), a keep
(``64`` or ``11%``), a budget scope (``crop`` / ``global``) and a seed.

- Engine defaults travel in ``hf_overrides``, merged into the model's HF config by vLLM:
  ``{"architectures": ["ZooLlavaForConditionalGeneration"], "zoo": {"method": "zoo", "keep": "64"}}``
  (``engine_overrides`` builds it).
- Per request, ``mm_processor_kwargs`` with ``zoo_`` keys: ``{"zoo_keep": "32", "zoo_method": "divprune"}``.
  vLLM folds ``mm_processor_kwargs`` into each image's cache hash, so two budgets on one image never
  share an encoder-cache or prefix-cache entry.

Only methods that need nothing but the image fit vLLM's seam (the processor fixes each image's
placeholder count before the encoder runs, and ``embed_multimodal`` sees the image, not the
prompt): ``VLLM_METHODS``. Importing this module imports neither torch nor vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from zoocli.errors import UsageError

# pre-LLM methods that read only the image (features, pre-projector tokens, the projector)
VLLM_METHODS = ("none", "zoo", "sensitivity", "sum", "divprune", "random", "downsample", "norm")
# why the others do not fit, for the refusal
_WHY = {
    "visionzip": "it needs the vision tower's attention weights, which vLLM's fused encoder attention does not return",
    "vispruner": "it needs the vision tower's [CLS] attention, which vLLM's fused encoder attention does not return",
}
ENGINE_KEYS = ("method", "keep", "budget_scope", "seed", "allow_untested_vllm")
REQUEST_PREFIX = "zoo_"
REQUEST_KEYS = tuple(REQUEST_PREFIX + k for k in ("method", "keep", "budget_scope", "seed"))
SPEC_BYTES = 512  # the settings travel to the model as a fixed-size byte field per image

# model_type -> zoo's vLLM architecture (a subclass of vLLM's class of the same name without "Zoo")
ARCHITECTURES: dict[str, str] = {
    "llava": "ZooLlavaForConditionalGeneration",
    "llava_next": "ZooLlavaNextForConditionalGeneration",
    "llava_onevision": "ZooLlavaOnevisionForConditionalGeneration",
    "qwen2_5_vl": "ZooQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "ZooQwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "ZooQwen3VLMoeForConditionalGeneration",
}


@dataclass(frozen=True)
class ZooSettings:
    method: str = "zoo"  # a method spec, options included
    keep: str = "64"  # "64" or "11%"
    budget_scope: str = "crop"
    seed: int = 0

    def to_bytes(self) -> list[int]:
        raw = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        if len(raw) > SPEC_BYTES:
            raise UsageError(f"zoo settings too long ({len(raw)} bytes > {SPEC_BYTES}): {raw[:60]!r}…")
        return list(raw) + [0] * (SPEC_BYTES - len(raw))

    @classmethod
    def from_bytes(cls, data) -> ZooSettings:
        raw = bytes(int(b) for b in data).rstrip(b"\0")
        return cls(**json.loads(raw))

    def keep_for(self, n: int) -> int:
        """The visual tokens one image of ``n`` candidates keeps (``none``: all)."""
        from zoocli.pipeline import parse_keep

        return n if self.method == "none" else parse_keep(self.keep, n, "keep")[0]

    def method_name_options(self) -> tuple[str, dict[str, Any]]:
        from zoocli.methods import parse_method_spec

        return parse_method_spec(self.method)


def check_settings(s: ZooSettings, where: str) -> ZooSettings:
    """Validate every field (one-line ``UsageError`` naming ``where``); returns ``s``."""
    from zoocli.methods import parse_method_spec
    from zoocli.pipeline import BUDGET_SCOPES, parse_keep

    try:
        name, _ = parse_method_spec(s.method)
        if name not in VLLM_METHODS:
            why = _WHY.get(name, "it is prompt-aware or prunes inside the LLM, and vLLM's seam sees only the "
                                 "image before the LLM")
            raise UsageError(f"method '{name}' does not run inside vLLM: {why}; methods that do: "
                             f"{', '.join(VLLM_METHODS)}")
        parse_keep(s.keep, 10**9, "keep")
        if s.budget_scope not in BUDGET_SCOPES:
            raise UsageError(f"budget_scope {s.budget_scope!r}: choose one of {', '.join(BUDGET_SCOPES)}")
        if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed < 2**63:
            raise UsageError(f"seed {s.seed!r}: give a whole number >= 0")
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    return s


def engine_settings(config_zoo: Any) -> tuple[ZooSettings, bool]:
    """The engine's defaults from the HF config's ``zoo`` entry (``hf_overrides``), checked, and
    whether an untested vLLM version is allowed."""
    if config_zoo is None:
        config_zoo = {}
    if not isinstance(config_zoo, Mapping):
        raise UsageError(f"hf_overrides 'zoo' must be a mapping of {', '.join(ENGINE_KEYS)}, "
                         f"got {type(config_zoo).__name__}")
    unknown = sorted(set(config_zoo) - set(ENGINE_KEYS))
    if unknown:
        raise UsageError(f"hf_overrides 'zoo': unknown key(s) {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(ENGINE_KEYS)})")
    kw = {k: _text(k, v) for k, v in config_zoo.items() if k not in ("seed", "allow_untested_vllm")}
    if "seed" in config_zoo:
        kw["seed"] = config_zoo["seed"]
    allow = config_zoo.get("allow_untested_vllm", False)
    if not isinstance(allow, bool):
        raise UsageError(f"hf_overrides 'zoo': allow_untested_vllm must be true or false, got {allow!r}")
    return check_settings(ZooSettings(**kw), "hf_overrides 'zoo'"), allow


def request_settings(default: ZooSettings, mm_kwargs: Mapping[str, Any]) -> ZooSettings:
    """``default`` with a request's ``zoo_*`` keys applied, checked (``UsageError``: a 400)."""
    given = {k: v for k, v in mm_kwargs.items() if k.startswith(REQUEST_PREFIX)}
    unknown = sorted(set(given) - set(REQUEST_KEYS))
    if unknown:
        raise UsageError(f"mm_processor_kwargs: unknown zoo key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(REQUEST_KEYS)})")
    if not given:
        return default
    kw = asdict(default)
    for key, value in given.items():
        field = key[len(REQUEST_PREFIX):]
        if field == "seed":
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            kw[field] = value
        else:
            kw[field] = _text(key, value)
    return check_settings(ZooSettings(**kw), "mm_processor_kwargs")


def strip_request_keys(mm_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``mm_kwargs`` without zoo's keys (what the HF processor is called with)."""
    return {k: v for k, v in mm_kwargs.items() if not k.startswith(REQUEST_PREFIX)}


def engine_overrides(model_type: str, settings: ZooSettings, allow_untested_vllm: bool = False) -> dict[str, Any]:
    """The ``hf_overrides`` that start vLLM with zoo's model class for ``model_type`` and these
    defaults (for ``vllm serve --hf-overrides``, ``LLM(hf_overrides=...)`` and ``zoo serve``)."""
    if model_type not in ARCHITECTURES:
        raise UsageError(f"zoo's vLLM plugin serves {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}")
    check_settings(settings, "zoo settings")
    zoo: dict[str, Any] = asdict(settings)
    if allow_untested_vllm:
        zoo["allow_untested_vllm"] = True
    return {"architectures": [ARCHITECTURES[model_type]], "zoo": zoo}


def _text(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"zoo setting {key}: give text or a number, got {type(value).__name__}")
    text = str(value).strip()
    if not text or len(text) > 200:
        raise UsageError(f"zoo setting {key}: give 1 to 200 characters, got {len(text)}")
    return text
