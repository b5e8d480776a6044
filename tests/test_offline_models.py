"""The offline models' token counts (OFFLINE_MAX_TOKENS against the builders' configs, no weights),
small-llava-next's real LLaVA-NeXT geometry, and suggest_offline."""

from __future__ import annotations

import math

import pytest

from tests.conftest import make_image
from zoocli.adapters import OFFLINE_MAX_TOKENS, OFFLINE_MODELS, load_adapter, suggest_offline


def _llava_max_tokens(config) -> int:
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    pins = getattr(config, "image_grid_pinpoints", None)
    tiles = max((h // vc.image_size) * (w // vc.image_size) for h, w in pins) if pins else 0
    return side * side * (1 + tiles)


def _anyres_max_tokens(config) -> int:
    """LLaVA-OneVision: the base tile plus the largest unpadded stitched grid (one side full) after
    anyres_max_N's downsampling (``ratio = sqrt(h*w / (N*P)) > 1.1`` -> ``(h // ratio, w // ratio)``)."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    n_max = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    best = 0
    for h, w in config.image_grid_pinpoints:
        ch, cw = h // vc.image_size * side, w // vc.image_size * side
        for rows, cols in [(ch, c) for c in range(1, cw + 1)] + [(r, cw) for r in range(1, ch + 1)]:
            ratio = math.sqrt(rows * cols / (n_max * side * side))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
            best = max(best, rows * cols)
    return side * side + best


@pytest.mark.parametrize("name,kw", [("tiny-llava", {}), ("tiny-llava-next", {"next_": True}),
                                     ("small-llava", {"small": True}),
                                     ("small-llava-next", {"next_": True, "small": True}),
                                     ("vllm-tiny-llava", {"vllm": True}),
                                     ("vllm-tiny-llava-next", {"next_": True, "vllm": True})])
def test_declared_token_counts_match_the_llava_configs(name, kw):
    from zoocli.adapters.llava import build_tokenizer
    from zoocli.adapters.offline_llava import tiny_llava_config

    assert OFFLINE_MAX_TOKENS[name] == _llava_max_tokens(tiny_llava_config(build_tokenizer(), **kw))


def test_declared_token_count_matches_the_tiny_qwen_processor():
    from zoocli.adapters.qwen2_5_vl import TINY_IMAGE_PROCESSOR as ip

    side = ip["patch_size"] * ip["merge_size"]
    assert OFFLINE_MAX_TOKENS["tiny-qwen2.5-vl"] == ip["max_pixels"] // (side * side)


def test_declared_token_counts_of_tiny_qwen3_vl_and_tiny_llava_onevision():
    from zoocli.adapters.llava_onevision import build_tokenizer, tiny_config
    from zoocli.adapters.qwen3_vl import TINY_IMAGE_PROCESSOR as ip

    side = ip["patch_size"] * ip["merge_size"]
    assert OFFLINE_MAX_TOKENS["tiny-qwen3-vl"] == OFFLINE_MAX_TOKENS["tiny-qwen3-vl-moe"] == ip["max_pixels"] // (side * side)
    assert OFFLINE_MAX_TOKENS["tiny-llava-onevision"] == _llava_max_tokens(tiny_config(build_tokenizer()))
    assert OFFLINE_MAX_TOKENS["small-llava-onevision"] == _llava_max_tokens(tiny_config(build_tokenizer(), small=True))
    for name, kw in (("tiny-llava-onevision", {}), ("small-llava-onevision", {"small": True}),
                     ("vllm-tiny-llava-onevision", {"vllm": True})):
        assert OFFLINE_MAX_TOKENS[name] == _anyres_max_tokens(tiny_config(build_tokenizer(), **kw)), name
    from zoocli.adapters.qwen3_vl import REAL_IMAGE_PROCESSOR as real

    assert OFFLINE_MAX_TOKENS["small-qwen3-vl"] == real["max_pixels"] // (side * side) == 16384


def test_every_offline_model_has_a_token_count():
    assert set(OFFLINE_MAX_TOKENS) == set(OFFLINE_MODELS)


def test_small_llava_next_has_llava_v16_geometry():
    from zoocli.adapters import load_random_config
    from zoocli.adapters.llava import build_tokenizer
    from zoocli.adapters.offline_llava import tiny_llava_config

    cfg = tiny_llava_config(build_tokenizer(), next_=True, small=True)
    real = load_random_config("llava-next")
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert sorted(map(tuple, cfg.image_grid_pinpoints)) == sorted(map(tuple, real["image_grid_pinpoints"]))
    assert OFFLINE_MODELS["small-llava-next"][0] == "llava_next"


def test_small_llava_next_builds_and_gives_2880_tokens_on_a_square_image(zoo_model_cache):
    """Builds the checkpoint (about 6 s on 2 cores) and encodes one square image: base + 2x2
    tiles of 24x24, no unpadding."""
    from zoocli.pipeline import encode_image

    adapter = load_adapter("small-llava-next", device="cpu", dtype="fp32", cache_dir=zoo_model_cache)
    enc = encode_image(adapter, make_image(700, 700), "q?")
    assert enc.n == 2880 and [s.name for s in enc.encoded.scopes][:2] == ["base", "crop 1"]
    assert len(enc.encoded.scopes) == 5


@pytest.mark.parametrize("family,n,want", [
    ("llava", 1, "tiny-llava"), ("llava", 16, "tiny-llava"), ("llava", 17, "small-llava"),
    ("llava", 576, "small-llava"), ("llava", 5000, "small-llava"),
    ("llava_next", 64, "tiny-llava-next"), ("llava_next", 81, "small-llava-next"),
    ("llava_next", 640, "small-llava-next"), ("llava_next", 10_000, "small-llava-next"),
    ("qwen2_5_vl", 8, "tiny-qwen2.5-vl"), ("qwen2_5_vl", 64, "tiny-qwen2.5-vl"),
    ("llava_onevision", 100, "small-llava-onevision"),  # not vllm-tiny-llava-onevision (184): a vLLM test model
])
def test_suggest_offline_picks_the_smallest_that_fits_else_the_largest(family, n, want):
    assert suggest_offline(family, n) == want


def test_suggest_offline_unknown_family_is_none():
    assert suggest_offline("gemma3", 10) is None


@pytest.mark.parametrize("alias,want", [("llava-1.5", "small-llava"), ("llava-1.5-13b", "small-llava"),
                                        ("llava-next", "small-llava-next"),
                                        ("qwen2.5-vl", "tiny-qwen2.5-vl")])
def test_not_cached_alias_points_at_its_familys_offline_model_with_enough_tokens(alias, want):
    """A --keep 64 example must not be sent to tiny-llava (16 tokens): the alias's family's
    largest offline model comes first; an unknown id lists them all."""
    from zoocli.adapters import _not_available

    msg = str(_not_available(alias))
    assert f"--model {want} (offline, same " in msg and "--random-weights" in msg
    assert "\n" not in msg
    assert "an offline model with random weights: tiny-llava," in str(_not_available("someone/some-vlm"))


def test_too_big_random_model_points_at_its_familys_offline_model(monkeypatch):
    import torch

    import zoocli.adapters as adapters

    monkeypatch.setattr(adapters, "available_bytes", lambda device: 2**30)  # 1 GiB free
    config = adapters.load_random_config("llava-next")
    with pytest.raises(adapters.ZooError, match="--model small-llava-next"):
        adapters.check_memory("llava-next", config, torch.device("cpu"), torch.float32)
