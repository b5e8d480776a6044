"""Model loading: names -> checkpoints -> the family adapter.

``load_adapter(model)`` accepts an alias (``llava-1.5``), an offline model name (``tiny-llava``:
random weights built locally, no download), a Hugging Face id or a local checkpoint directory.
The family is dispatched on ``config.model_type`` (exact key into ``ADAPTERS``). Offline models are
written once as real checkpoints (``save_pretrained``, safetensors) under
``~/.cache/zoo/models/<name>`` and then loaded through the same ``from_pretrained`` path as a real
checkpoint. ``random_weights=True`` builds an alias's full-size architecture from the config
shipped in ``zoocli/data`` with random weights (for timing without downloading weights).

torch and transformers are imported lazily: importing this module is cheap (``zoo models``).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from importlib import resources
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoocli.errors import UnknownNameError, UsageError, ZooError, is_allocation_failure, is_out_of_memory
from zoocli.lazy import torch

MODEL_ALIASES: dict[str, str] = {
    "llava-1.5": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-next": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3-vl": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "llava-onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
}
DEFAULT_MODEL = "llava-1.5"

# alias -> the full-size config shipped in zoocli/data (for --random-weights)
RANDOM_CONFIGS: dict[str, str] = {
    "llava-1.5": "llava-1.5-7b.json",
    "llava-1.5-13b": "llava-1.5-13b.json",
    "llava-next": "llava-next-7b.json",
    "qwen2.5-vl": "qwen2.5-vl-7b.json",
    "qwen3-vl": "qwen3-vl-8b.json",
    "qwen3-vl-2b": "qwen3-vl-2b.json",
    "llava-onevision": "llava-onevision-7b.json",
}

# offline name -> (family, "module:builder"); a builder writes a checkpoint dir: builder(out_dir)
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "tiny-llava": ("llava", "zoocli.adapters.offline_llava:build_tiny_llava"),
    "tiny-llava-next": ("llava_next", "zoocli.adapters.offline_llava:build_tiny_llava_next"),
    "tiny-qwen2.5-vl": ("qwen2_5_vl", "zoocli.adapters.qwen2_5_vl:build_tiny"),
    "small-llava": ("llava", "zoocli.adapters.offline_llava:build_small_llava"),
    "small-llava-next": ("llava_next", "zoocli.adapters.offline_llava:build_small_llava_next"),
    "tiny-qwen3-vl": ("qwen3_vl", "zoocli.adapters.qwen3_vl:build_tiny"),
    "tiny-llava-onevision": ("llava_onevision", "zoocli.adapters.llava_onevision:build_tiny"),
    "small-qwen3-vl": ("qwen3_vl", "zoocli.adapters.qwen3_vl:build_small"),
    "tiny-qwen3-vl-moe": ("qwen3_vl_moe", "zoocli.adapters.qwen3_vl:build_tiny_moe"),
    "small-llava-onevision": ("llava_onevision", "zoocli.adapters.llava_onevision:build_small"),
    # the tiny models with LLM heads vLLM's CPU attention takes (head_dim 32): zoo's vLLM tests
    "vllm-tiny-llava": ("llava", "zoocli.adapters.offline_llava:build_vllm_tiny_llava"),
    "vllm-tiny-llava-next": ("llava_next", "zoocli.adapters.offline_llava:build_vllm_tiny_llava_next"),
    "vllm-tiny-qwen2.5-vl": ("qwen2_5_vl", "zoocli.adapters.qwen2_5_vl:build_vllm_tiny"),
    "vllm-tiny-qwen3-vl": ("qwen3_vl", "zoocli.adapters.qwen3_vl:build_vllm_tiny"),
    "vllm-tiny-llava-onevision": ("llava_onevision", "zoocli.adapters.llava_onevision:build_vllm_tiny"),
}
# the vllm-tiny-* models are the tiny ones with vLLM-ready LLM heads: never suggested in their place
VLLM_TEST_MODELS = frozenset(n for n in OFFLINE_MODELS if n.startswith("vllm-"))
# offline name -> the most visual tokens one image can give it (checked against the builders'
# configs by tests/test_figures_offline.py): for picking the offline model that fits a request
OFFLINE_MAX_TOKENS: dict[str, int] = {
    "tiny-llava": 16,  # 56 px / patch 14: 4x4
    "tiny-llava-next": 80,  # 4x4 per tile, base + up to 2x2 tiles
    "tiny-qwen2.5-vl": 24,  # max_pixels = 24 merged 28x28 tokens
    "small-llava": 576,  # 336 px / patch 14: 24x24
    "small-llava-next": 2880,  # 24x24 per tile, base + up to 2x2 tiles (llava-v1.6)
    "tiny-qwen3-vl": 24,  # max_pixels = 24 merged 32x32 tokens
    "tiny-llava-onevision": 80,  # 4x4 per tile, base + up to 2x2 tiles (newlines not counted)
    "small-qwen3-vl": 16384,
    "tiny-qwen3-vl-moe": 24,  # tiny-qwen3-vl's processor  # the real image processor: max_pixels = 16,384 merged 32x32 tokens
    "small-llava-onevision": 3645,  # 27x27 per tile, base + up to 2x2 tiles (newlines not counted)
    "vllm-tiny-llava": 16, "vllm-tiny-llava-next": 80, "vllm-tiny-qwen2.5-vl": 24, "vllm-tiny-qwen3-vl": 24,
    "vllm-tiny-llava-onevision": 184,  # base 16 + at most 168 (3x6 tiles; anyres_max_9 downsamples above 174)
}
# offline name -> about how long its one-time build takes in seconds (measured on 2 busy CPU
# cores: `time python3 -c "...ensure_offline_model(name, tmpdir)"` less the ~8 s of imports; the
# first build of a process also builds the shared tokenizer, ~5 s): what the build's status says
OFFLINE_BUILD_SECONDS: dict[str, int] = {
    "tiny-llava": 5, "tiny-llava-next": 5, "tiny-qwen2.5-vl": 6, "small-llava": 15,
    "small-llava-next": 15, "tiny-qwen3-vl": 6, "tiny-llava-onevision": 5,
    "small-qwen3-vl": 15, "small-llava-onevision": 15, "tiny-qwen3-vl-moe": 6,
    "vllm-tiny-llava": 5, "vllm-tiny-llava-next": 5, "vllm-tiny-qwen2.5-vl": 6, "vllm-tiny-qwen3-vl": 6,
    "vllm-tiny-llava-onevision": 5,
}
# alias -> visual tokens per image, as `zoo models` shows them (README's table: the real processors'
# settings, counted with zoo's processors on blank images)
ALIAS_TOKENS: dict[str, str] = {
    "llava-1.5": "576", "llava-1.5-13b": "576", "llava-next": "≤2,880",
    "qwen2.5-vl": "4-16,384", "qwen3-vl": "64-16,384", "qwen3-vl-2b": "64-16,384",
    "llava-onevision": "2,929-8,073",
}
SLOW_STEP_S = 10  # a loading step expected to take longer is reported even off a terminal
# shipped trained checkpoint -> (family, its directory under zoocli/data): loaded like a real
# checkpoint, no download, meaningful answers (demo-llava: trained on the synthetic world of zoocli.demo)
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "demo-llava": ("llava", "demo-llava"),
}
OFFLINE_BUILD_VERSION = "2"  # bump when a builder changes: cached copies are rebuilt (2: Qwen video processor config)

# config.model_type -> "module:AdapterClass"
ADAPTERS: dict[str, str] = {
    "llava": "zoocli.adapters.llava:LlavaAdapter",
    "llava_next": "zoocli.adapters.llava:LlavaNextAdapter",
    "qwen2_5_vl": "zoocli.adapters.qwen2_5_vl:Qwen25VLAdapter",
    "qwen3_vl": "zoocli.adapters.qwen3_vl:Qwen3VLAdapter",
    "qwen3_vl_moe": "zoocli.adapters.qwen3_vl:Qwen3VLMoeAdapter",
    "llava_onevision": "zoocli.adapters.llava_onevision:LlavaOnevisionAdapter",
}

DTYPE_NAMES = {  # name -> torch dtype attribute (resolved when used: importing this module skips torch)
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "zoo" / "models"


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (symlinks not followed: an HF snapshot's links
    point at its blobs, counted once)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def catalog() -> list[dict[str, Any]]:
    """What `zoo models` lists: every known model with its HF id or family, where it comes from,
    whether it is the default, its visual tokens per image, whether it is on this machine and its
    size on disk there (bytes; None when not). Reads directories only (no torch, no Hub)."""
    rows = []
    hub = None
    try:
        from huggingface_hub import constants

        hub = Path(constants.HF_HUB_CACHE)
    except ImportError:
        pass
    for name, repo in MODEL_ALIASES.items():
        d = hub / ("models--" + repo.replace("/", "--")) if hub is not None else None
        here = d is not None and (d / "snapshots").is_dir() and any((d / "snapshots").iterdir())
        rows.append({"name": name, "target": repo, "source": "Hugging Face", "default": name == DEFAULT_MODEL,
                     "visual_tokens": ALIAS_TOKENS.get(name, "?"), "cached": here,
                     "size_bytes": _tree_bytes(d / "blobs") if here else None})
    for name, (family, sub) in SHIPPED_MODELS.items():
        d = shipped_model_dir(name)
        here = (d / "config.json").is_file()
        rows.append({"name": name, "target": family, "source": "shipped, trained (shapes world only)",
                     "default": False, "visual_tokens": "144", "cached": here,
                     "size_bytes": _tree_bytes(d) if here else None})
    root = default_cache_dir()
    for name, (family, _) in OFFLINE_MODELS.items():
        d = root / name
        here = (d / ".zoo-offline-version").is_file()
        n = OFFLINE_MAX_TOKENS[name]
        fixed = family == "llava"  # one fixed grid; the others depend on the image size
        rows.append({"name": name, "target": family, "source": "built offline, random weights", "default": False,
                     "visual_tokens": f"{n:,}" if fixed else f"≤{n:,}", "cached": here,
                     "size_bytes": _tree_bytes(d) if here else None})
    return rows


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UsageError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ZooError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ZooError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` (bf16 on CUDA, fp32 elsewhere), ``bf16``, ``fp16`` or ``fp32``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    spec = str(dtype).strip().lower()
    if spec == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if spec not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype '{dtype}'; use auto, bf16, fp16 or fp32")
    return getattr(torch, DTYPE_NAMES[spec])


def _import_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def adapter_class(family: str):
    """The adapter class for a ``config.model_type``; ``UnknownNameError`` if no adapter handles it."""
    if family not in ADAPTERS:
        raise UnknownNameError("model family", family, ADAPTERS)
    try:
        return _import_ref(ADAPTERS[family])
    except (ImportError, AttributeError) as e:
        raise ZooError(f"the adapter for model family '{family}' is not available: {e}") from None


StatusFn = Callable[..., None]  # on_status(text, slow=False): what the loader is doing now


def _no_status(text: str, slow: bool = False) -> None:
    pass


def ensure_offline_model(name: str, cache_dir: str | Path | None = None,
                         on_status: StatusFn | None = None) -> Path:
    """The checkpoint dir of offline model ``name``, building it (once, atomically) if needed.
    ``on_status(text, slow=True)`` is told before a build starts (nothing is printed here)."""
    if name not in OFFLINE_MODELS:
        raise UnknownNameError("offline model", name, OFFLINE_MODELS)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / name
    marker = ".zoo-offline-version"
    if (target / marker).is_file() and (target / marker).read_text().strip() == OFFLINE_BUILD_VERSION:
        return target
    try:
        builder = _import_ref(OFFLINE_MODELS[name][1])
    except (ImportError, AttributeError) as e:
        raise ZooError(f"offline model '{name}' cannot be built: {e}") from None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ZooError(f"the offline model cache {root} is not a folder (a file is in the way); "
                       "move it or give another cache folder") from None
    except OSError as e:
        raise ZooError(f"the offline model cache {root} cannot be created ({e.strerror or e})") from None
    eta = OFFLINE_BUILD_SECONDS.get(name, 30)
    (on_status or _no_status)(f"building {name} (one time, ~{eta} s) in {root}",
                              slow=eta >= SLOW_STEP_S)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=root))
    try:
        builder(tmp)
        (tmp / marker).write_text(OFFLINE_BUILD_VERSION)
        if target.exists():  # stale version: move it aside, then swap in the new build
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=root))
            try:
                os.rename(target, old / "m")
            except OSError:
                pass  # another process swapped it meanwhile
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def suggest_offline(family: str, n_tokens_needed: int) -> str | None:
    """The offline model of ``family`` (a ``config.model_type``) with the fewest visual tokens that
    still gives at least ``n_tokens_needed`` (a budget that really prunes needs fewer than that),
    else the family's largest; None if the family has no offline model."""
    mine = sorted((OFFLINE_MAX_TOKENS[n], n) for n, (fam, _) in OFFLINE_MODELS.items()
                  if fam == family and n not in VLLM_TEST_MODELS)
    if not mine:
        return None
    fits = [name for tokens, name in mine if tokens >= n_tokens_needed]
    return fits[0] if fits else mine[-1][1]


def family_hint(family: str | None, n_tokens: int = 10**9) -> str:
    """``"--model small-llava (offline, same llava family, up to 576 visual tokens)"``: the
    offline model of ``family`` with enough tokens for ``n_tokens`` (default: its largest), for
    "not cached" / "too big" messages; empty if the family has none."""
    name = suggest_offline(family, n_tokens) if family else None
    if name is None:
        return ""
    return (f"--model {name} (offline, same {family} family, up to {OFFLINE_MAX_TOKENS[name]} "
            "visual tokens)")


def _alias_family(model: str) -> str | None:
    try:
        return load_random_config(model)["model_type"] if model in RANDOM_CONFIGS else None
    except (ZooError, ValueError, KeyError):
        return None


def known_models() -> list[str]:
    """Every model name zoo knows: the aliases, the shipped model, the offline models."""
    return [*MODEL_ALIASES, *SHIPPED_MODELS, *OFFLINE_MODELS]


def looks_like_a_checkpoint(model: str) -> bool:
    """An HF id (``org/name``) or a path that exists: zoo tries to load it rather than calling it
    an unknown name."""
    return "/" in model or Path(model).expanduser().exists()


def check_model_name(model: str) -> None:
    """A ``UsageError`` for a name that is no alias, shipped or offline model, HF id (``org/name``)
    or existing path, with the closest known names (``--model demo-lava`` -> demo-llava)."""
    import difflib

    if model in MODEL_ALIASES or model in SHIPPED_MODELS or model in OFFLINE_MODELS or looks_like_a_checkpoint(model):
        return
    known = known_models()
    close = difflib.get_close_matches(model.lower(), known, n=3, cutoff=0.6)
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    raise UsageError(f"unknown model '{model}': {guess}known: {', '.join(known)}; or an HF id (org/name) "
                     "or a checkpoint directory (`zoo models` lists them)")


QUICK_MODEL = "demo-llava"  # offline, trained here: the model an error points a newcomer at


def _not_available(model: str, why: str = "offline?") -> ZooError:
    """A one-line error for a model that is neither in the local Hugging Face cache nor
    downloadable now: what it is (the default? which HF id?), how to get its weights, and what
    runs offline instead (demo-llava, which answers; the offline model of its family, for timing)."""
    repo = MODEL_ALIASES.get(model)
    family = _alias_family(model)
    hint = family_hint(family)
    if repo is not None:
        what = f"model '{model}'{' (the default --model)' if model == DEFAULT_MODEL else ''} is {repo} on the Hugging Face Hub"
        get = (f"get its weights with `huggingface-cli download {repo}` (or run once online); "
               f"offline, try --model {QUICK_MODEL} (trained here, real answers about shapes)")
        rest = f", {hint.removesuffix(')')}; random weights)" if hint else ""
        return ZooError(f"{what}, not in the local cache and cannot be downloaded ({why}); {get}{rest}, "
                        f"or --random-weights (full size, random weights, for timing)")
    others = ", ".join(OFFLINE_MODELS)
    return ZooError(f"model '{model}' is not in the local cache and cannot be downloaded ({why}); get it with "
                    f"`huggingface-cli download {model}` (or run once online); offline, try --model {QUICK_MODEL} "
                    f"(trained here, real answers about shapes) or an offline model with random weights: {others}")


def hub_offline() -> bool:
    """Whether the Hugging Face offline switch is on (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE``, as huggingface_hub reads them): then zoo opens no connection."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _quiet_transformers() -> None:
    """zoo reports loading itself: transformers' own info logging and progress bars stay off."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_adapter(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    random_weights: bool = False,
    cache_dir: str | Path | None = None,
    on_status: StatusFn | None = None,
):
    """An ``Adapter`` for ``model`` (alias, offline name, HF id or local dir) on ``device``.

    ``random_weights``: the alias's full-size architecture with random weights (no download).
    ``cache_dir``: where offline models are built (default ``~/.cache/zoo/models``).
    ``on_status(text, slow=False)``: told what is happening (``slow``: a step of more than a few
    seconds: an offline model's first build, a full-size random init); the loader prints nothing.
    """
    status = on_status or _no_status
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _quiet_transformers()
    try:
        return _load(model, dev, dt, random_weights, cache_dir, status)
    except (MemoryError, RuntimeError) as e:
        if not is_allocation_failure(e):
            raise
        smaller = family_hint(_family_of(model)) or f"--model {QUICK_MODEL}"
        bf16 = " --dtype bf16," if dt == torch.float32 else ""
        raise ZooError(f"out of memory on {dev} while loading {model} ({_one_line(e)[:120]}); "
                       f"try{bf16} a device with more free memory, or {smaller}") from None


def _family_of(model: str) -> str | None:
    if model in OFFLINE_MODELS:
        return OFFLINE_MODELS[model][0]
    if model in SHIPPED_MODELS:
        return SHIPPED_MODELS[model][0]
    return _alias_family(model)


def _load(model: str, dev, dt, random_weights: bool, cache_dir, status: StatusFn):
    if random_weights:
        return _load_random(model, dev, dt, status)
    if model in SHIPPED_MODELS:
        return _load_shipped(model, dev, dt)
    if model in OFFLINE_MODELS:
        return _load_offline(model, cache_dir, dev, dt, status)
    return _load_checkpoint(model, dev, dt, status)


def wrap_model(model, processor, name: str | None = None, *, random_weights: bool = False):
    """The ``Adapter`` for a transformers model and processor already loaded (LLaVA-1.5 / NeXT /
    OneVision, Qwen2.5-VL, Qwen3-VL), chosen by ``model.config.model_type``: the same adapter
    ``load_adapter`` gives for that checkpoint. ``name`` (default: the config's ``_name_or_path``)
    names it in results; ``random_weights``: its answers mean nothing (said in results). The model
    is put in eval mode and stays where it is (device, dtype)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if not isinstance(family, str):
        raise UsageError(f"wrap_model needs a transformers model (with a config.model_type), "
                         f"not {type(model).__name__}")
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise UsageError(f"wrap_model needs the model's multimodal processor (AutoProcessor: "
                         f"tokenizer + image processor), not {type(processor).__name__}")
    cls = adapter_class(family)
    return cls(model, processor, name or getattr(config, "_name_or_path", "") or family,
               meaningless=random_weights)


def _load_random(model: str, dev: torch.device, dt: torch.dtype, status: StatusFn):
    """The alias's full-size architecture with random weights (after a memory check)."""
    if model not in MODEL_ALIASES:
        raise UsageError(
            f"--random-weights needs a model alias, not '{model}'; aliases: {', '.join(MODEL_ALIASES)}"
        )
    config = load_random_config(model)
    check_memory(model, config, dev, dt)
    status(f"building {model}'s full-size architecture with random weights "
           f"(no download; minutes on a CPU)", slow=True)
    return adapter_class(config["model_type"]).from_config(config, dev, dt)


def _load_offline(model: str, cache_dir, dev: torch.device, dt: torch.dtype, status: StatusFn):
    """An offline model (``OFFLINE_MODELS``), built into ``cache_dir`` on first use."""
    from zoocli.adapters.checkpoint import check_checkpoint_dir, require_weights

    family = OFFLINE_MODELS[model][0]
    path = ensure_offline_model(model, cache_dir, status)
    status(f"loading {model} from {path}")
    try:  # a cached copy damaged since it was built (truncated or missing weights, ...)
        check_checkpoint_dir(path)
        require_weights(path)
    except ZooError as e:
        raise ZooError(f"{e}; the cached offline model {model} is damaged: delete {path} and zoo "
                       "builds it again") from None
    cls = adapter_class(family)
    try:
        adapter = cls.load(path, dev, dt, meaningless=True)
        adapter.model_id = model
        return adapter
    except OSError as e:
        raise ZooError(f"offline model '{model}' at {path} cannot be loaded: {_one_line(e)}") from None


def _checkpoint(model: str) -> tuple[str, str]:
    """(local dir or HF snapshot / id, ``config.model_type``) of an alias, HF id or local directory:
    an unknown name, a model that cannot be had, or a broken file is one line first."""
    check_model_name(model)
    repo = MODEL_ALIASES.get(model, model)
    local = Path(repo).expanduser()
    source = str(local) if local.is_dir() else _cached_or_reachable(model, repo)
    if Path(source).is_dir():  # a broken file is one line naming it (zoocli.adapters.checkpoint)
        from zoocli.adapters.checkpoint import check_checkpoint_dir

        check_checkpoint_dir(source)
    return source, _model_type(model, source)


def _load_checkpoint(model: str, dev: torch.device, dt: torch.dtype, status: StatusFn):
    """An alias, HF id or local directory; a load failure is one line naming the cause."""
    source, family = _checkpoint(model)
    local = Path(MODEL_ALIASES.get(model, model)).expanduser()
    cls = adapter_class(family)
    if Path(source).is_dir():  # before anything is allocated: weights there, and they must fit
        from zoocli.adapters.checkpoint import read_json, require_weights

        require_weights(source)
        check_memory(model, read_json(Path(source) / "config.json"), dev, dt, what=f"model '{model}'",
                     source=Path(source) / "config.json")
    status(f"loading {model} ({family}) from {source}", slow=not local.is_dir())
    try:
        return cls.load(source, dev, dt)
    except OSError as e:
        if local.is_dir():
            raise ZooError(f"model directory '{local}' cannot be loaded: {_one_line(e)}") from None
        raise _not_available(model) from None
    except ZooError:  # already one line (a UsageError is also a ValueError)
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # not out-of-memory: that is the CLI's
        if not Path(source).is_dir() or is_out_of_memory(e):  # the CLI's one line for it
            raise
        from zoocli.adapters.checkpoint import load_error

        raise load_error(source, e) from None


def shipped_model_dir(name: str) -> Path:
    """The checkpoint directory of a shipped model (``zoocli/data/<dir>``)."""
    if name not in SHIPPED_MODELS:
        raise UnknownNameError("shipped model", name, SHIPPED_MODELS)
    return Path(str(resources.files("zoocli").joinpath("data", SHIPPED_MODELS[name][1])))


def _load_shipped(model: str, device: torch.device, dtype: torch.dtype):
    path = shipped_model_dir(model)
    if not (path / "config.json").is_file():
        raise ZooError(f"the shipped model '{model}' is missing from {path} (a broken install?)")
    try:
        adapter = adapter_class(SHIPPED_MODELS[model][0]).load(path, device, dtype, meaningless=False)
    except OSError as e:
        raise ZooError(f"shipped model '{model}' at {path} cannot be loaded: {_one_line(e)}") from None
    adapter.model_id = model
    return adapter


def parameter_count(config_dict: dict[str, Any]) -> int:
    """Parameters of the architecture a config dict describes (built on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "_name_or_path"})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def available_bytes(device: torch.device, cgroup_root: Path = Path("/sys/fs/cgroup"),
                    proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Memory this process can still allocate on ``device``: CUDA free memory; on CPU the smaller
    of the system's MemAvailable and what the process's cgroup (v2 ``memory.max`` less
    ``memory.current``, or v1 ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``, along its
    path up to the root) still allows. None if nothing can be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if (free := cgroup_free_bytes(cgroup_root, proc_cgroup)) is not None:
        found.append(free)
    return min(found) if found else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace").strip()  # pseudo-files of a few bytes
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def cgroup_free_bytes(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """What the memory cgroups of this process still allow (the least over its cgroup and every
    parent up to ``root``: the limit less the usage, reclaimable page cache not counted), or None
    where no limit is set or readable."""
    try:
        lines = proc_cgroup.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    v2 = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    v1 = next((ln.split(":", 2)[2] for ln in lines
               if len(ln.split(":", 2)) == 3 and "memory" in ln.split(":", 2)[1].split(",")), None)
    frees = []
    for base, rel, limit_name, usage_name, cache_key in (
            (root, v2, "memory.max", "memory.current", "inactive_file"),
            (root / "memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        parts = [p for p in (rel or "/").split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:depth])
            limit, usage = _read_int(d / limit_name), _read_int(d / usage_name) or 0
            if limit is not None and limit < 1 << 60:  # v1 writes "unlimited" as a huge number
                # the usage counts the page cache; its inactive part is given back on demand
                # (the "working set" of container tools is usage less inactive_file)
                frees.append(max(limit - max(usage - _stat(d / "memory.stat", cache_key), 0), 0))
    return min(frees) if frees else None


def _stat(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup ``memory.stat`` file (0 if absent)."""
    try:
        for line in path.read_text(errors="replace").splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def check_memory(model: str, config_dict: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 what: str | None = None, source: Path | None = None) -> None:
    """Refuse, with the numbers, a model whose weights alone would not fit in what this process
    can allocate (rather than letting the system kill it half way through the build). ``what``
    names the model in the message (default: ``--random-weights MODEL``); ``source``, the config
    file an unusable config is blamed on."""
    try:
        n = parameter_count(config_dict)
    except Exception as e:  # noqa: BLE001 - transformers rejects a broken config in many ways
        if source is None:
            raise
        raise ZooError(f"checkpoint file {source}: not a configuration transformers can build "
                       f"({_one_line(e)[:200]})") from None
    need = n * torch.finfo(dtype).bits // 8
    free = available_bytes(device)
    if free is not None and need > 0.9 * free:
        gib = 2**30
        hint = " --dtype bf16," if dtype == torch.float32 else ""
        raise ZooError(
            f"{what or f'--random-weights {model}'}: its weights alone need {need / gib:.1f} GiB in "
            f"{str(dtype).replace('torch.', '')} ({n:,} parameters), but only {free / gib:.1f} GiB "
            f"is free on {device} for this process; try{hint} a GPU, or "
            f"{family_hint(config_dict.get('model_type')) or 'an offline model'}"
        )


def load_random_config(alias: str) -> dict[str, Any]:
    """The shipped full-size config dict of an alias (``zoocli/data/<...>.json``)."""
    fname = RANDOM_CONFIGS.get(alias)
    if fname is None:
        raise UsageError(f"no shipped config for '{alias}'; aliases: {', '.join(MODEL_ALIASES)}")
    try:
        text = resources.files("zoocli").joinpath("data", fname).read_text()
    except (FileNotFoundError, OSError):
        raise ZooError(f"the shipped config zoocli/data/{fname} for '{alias}' is missing") from None
    return json.loads(text)


def _cached_or_reachable(model: str, repo: str) -> str:
    """The local snapshot of ``repo`` if the HF cache has it (no network touched); else ``repo``
    for a download, but only when the Hub answers: offline, fail at once rather than after the
    hub client's retries. With the offline switch on (``hub_offline``) not even the probe is made."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError and friends), or not a valid repo id
        pass
    if hub_offline():
        raise _not_available(model, "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set")
    if not _hub_reachable():
        raise _not_available(model)
    return repo


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _model_type(model: str, source: str) -> str:
    from transformers import AutoConfig

    try:  # a directory's config.json was checked by check_checkpoint_dir before this
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except OSError:
        if Path(source).is_dir():
            raise ZooError(f"model directory '{source}' has no readable config.json") from None
        raise _not_available(model) from None
    except ValueError as e:  # an unknown model_type in config.json
        raise ZooError(f"model '{model}': {_one_line(e)}") from None
    return config.model_type


def checkpoint_source(model: str, cache_dir: str | Path | None = None,
                      on_status: StatusFn | None = None) -> tuple[str, str, bool]:
    """Where ``model`` (alias, offline or shipped name, HF id or local dir) is, for an engine that
    loads checkpoints itself (``zoo serve``): (local dir or HF id, ``config.model_type``, whether
    its answers are meaningless). An offline model is built first if needed."""
    if model in SHIPPED_MODELS:
        return str(shipped_model_dir(model)), SHIPPED_MODELS[model][0], False
    if model in OFFLINE_MODELS:
        return str(ensure_offline_model(model, cache_dir, on_status)), OFFLINE_MODELS[model][0], True
    return (*_checkpoint(model), False)


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:300] or type(e).__name__


__all__ = [
    "ADAPTERS", "DEFAULT_MODEL", "MODEL_ALIASES", "OFFLINE_MODELS", "RANDOM_CONFIGS", "SHIPPED_MODELS", "adapter_class",
    "check_model_name", "checkpoint_source", "default_cache_dir", "ensure_offline_model", "known_models",
    "load_adapter", "load_random_config", "resolve_device", "resolve_dtype", "shipped_model_dir", "suggest_offline",
    "wrap_model",
]
