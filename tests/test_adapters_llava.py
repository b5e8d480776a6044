"""LLaVA-1.5 / LLaVA-NeXT adapters and the model loader, on the offline tiny models (CPU).

The reference for every pruning route is the stock transformers model: keep-all must give exactly
stock ``generate``'s tokens, and a pruned run must equal the stock model fed pruned embeddings that
the test splices together itself (``get_image_features`` output, rows dropped, ``torch.cat``).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STOCK_GREEDY, make_image

from zoocli.adapters import (
    ADAPTERS,
    MODEL_ALIASES,
    OFFLINE_MODELS,
    adapter_class,
    ensure_offline_model,
    load_adapter,
    load_random_config,
    resolve_device,
    resolve_dtype,
)
from zoocli.adapters.base import Adapter, Encoded, Generation, LLMInputs
from zoocli.adapters.llava import LlavaAdapter, LlavaNextAdapter, build_tokenizer
from zoocli.adapters.offline_llava import tiny_llava_config
from zoocli.errors import UnknownNameError, UsageError, ZooError

pytestmark = pytest.mark.slow
Q = "What is on the monitor?"
NEXT_SIZES = [(200, 30), (30, 200), (32, 32)]  # wide (rows unpadded), tall (cols unpadded), square


def _stock_new_tokens(adapter, prepared, n=8):
    out = adapter.model.generate(**prepared.inputs, **STOCK_GREEDY, max_new_tokens=n)
    return _strip_eos(adapter, out[0, prepared.inputs["input_ids"].shape[1]:].tolist())


def _strip_eos(adapter, ids):
    eos = adapter.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def _stock_features(adapter, prepared):
    inp = prepared.inputs
    kw = {"image_sizes": inp["image_sizes"]} if "image_sizes" in inp else {}
    with torch.no_grad():
        return adapter.model.model.get_image_features(pixel_values=inp["pixel_values"], **kw).pooler_output[0]


# ---------------------------------------------------------------------------------------------
# LLaVA-1.5


def test_tiny_llava_is_a_real_checkpoint(tiny_llava, zoo_model_cache):
    d = zoo_model_cache / "tiny-llava"
    assert tiny_llava.model_id == "tiny-llava"  # the name the user gave, not the cache path
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (d / f).is_file(), f
    assert isinstance(tiny_llava, LlavaAdapter) and tiny_llava.family == "llava"
    assert tiny_llava.meaningless and tiny_llava.dtype == torch.float32
    assert tiny_llava.projector is tiny_llava.model.model.multi_modal_projector


def test_llava_prepare(tiny_llava):
    img = make_image(70, 40)
    p = tiny_llava.prepare(img, Q)
    ids = p.inputs["input_ids"]
    assert ids.shape[0] == 1 and p.inputs["attention_mask"].shape == ids.shape
    assert int((ids == tiny_llava.model.config.image_token_id).sum()) == 16
    assert tiny_llava.processor.tokenizer.decode(p.question_ids) == Q
    assert p.image is img and p.question == Q


def test_llava_encode_matches_get_image_features(tiny_llava):
    p = tiny_llava.prepare(make_image(70, 40), Q)
    e = tiny_llava.encode(p)
    assert isinstance(e, Encoded)
    assert torch.equal(e.features, _stock_features(tiny_llava, p))
    torch.testing.assert_close(tiny_llava.projector(e.vision), e.features)
    assert e.vision.shape == (16, 32) and e.n_llm_visual == 16
    (s,) = e.scopes
    assert s.name == "image" and s.grid == (4, 4)
    assert torch.equal(s.index, torch.arange(16))
    assert s.cells[5].tolist() == [1, 1]
    # shortest edge 40 -> 56 px, centre crop 56: covers the middle 40x40 of the 70x40 image
    assert s.box == (15.0, 0.0, 55.0, 40.0)


def test_llava_keep_all_equals_stock_generate(tiny_llava):
    p = tiny_llava.prepare(make_image(70, 40, seed=1), Q)
    e = tiny_llava.encode(p)
    li = tiny_llava.build_inputs(p, e, torch.arange(16))
    assert isinstance(li, LLMInputs) and li.position_ids is None and li.n_visual == 16
    assert li.inputs_embeds.shape[:2] == p.inputs["input_ids"].shape == li.attention_mask.shape
    g = tiny_llava.generate(li, 8)
    assert isinstance(g, Generation)
    assert g.ids == _stock_new_tokens(tiny_llava, p)
    assert isinstance(g.text, str) and g.prefill_ms > 0 and g.decode_ms >= 0


def _hand_pruned_generate(adapter, prepared, kept_rows, n=8):
    """Independent route: stock features, rows dropped, spliced with torch.cat, stock generate."""
    ids = prepared.inputs["input_ids"][0]
    vis = _stock_features(adapter, prepared)[kept_rows]
    ph = (ids == adapter.model.config.image_token_id).nonzero().squeeze(1)
    start, end = int(ph[0]), int(ph[-1]) + 1
    assert end - start == ph.numel()  # one contiguous span
    emb = adapter.model.get_input_embeddings()
    with torch.no_grad():
        x = torch.cat([emb(ids[:start]), vis, emb(ids[end:])])[None]
        out = adapter.model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                     **STOCK_GREEDY, max_new_tokens=n)
    return _strip_eos(adapter, out[0, -n:].tolist() if out.shape[1] > n else out[0].tolist())


def test_llava_pruned_equals_hand_spliced_stock(tiny_llava):
    p = tiny_llava.prepare(make_image(50, 60, seed=2), Q)
    e = tiny_llava.encode(p)
    kept = torch.tensor([0, 3, 4, 9, 15])
    li = tiny_llava.build_inputs(p, e, kept)
    assert li.n_visual == 5 and li.inputs_embeds.shape[1] == p.inputs["input_ids"].shape[1] - 11
    assert tiny_llava.generate(li, 8).ids == _hand_pruned_generate(tiny_llava, p, kept)


def test_llava_tokens_replace_kept_rows(tiny_llava):
    p = tiny_llava.prepare(make_image(56, 56), Q)
    e = tiny_llava.encode(p)
    kept = torch.tensor([1, 2, 7])
    base = tiny_llava.build_inputs(p, e, kept)
    same = tiny_llava.build_inputs(p, e, kept, tokens=e.features[kept].clone())
    assert torch.equal(base.inputs_embeds, same.inputs_embeds)
    z = tiny_llava.build_inputs(p, e, kept, tokens=torch.zeros(3, e.features.shape[1]))
    diff = (z.inputs_embeds != base.inputs_embeds).any(-1)[0]
    assert int(diff.sum()) == 3  # exactly the three visual rows changed
    with pytest.raises(ValueError):
        tiny_llava.build_inputs(p, e, torch.tensor([3, 1]))
    with pytest.raises(ValueError):
        tiny_llava.build_inputs(p, e, torch.tensor([16]))


# ---------------------------------------------------------------------------------------------
# LLaVA-NeXT


@pytest.fixture(scope="module", params=NEXT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def next_case(request, tiny_llava_next):
    w, h = request.param
    p = tiny_llava_next.prepare(make_image(w, h, seed=w + h), Q)
    return p, tiny_llava_next.encode(p)


def test_next_encode_matches_get_image_features(tiny_llava_next, next_case):
    a, (p, e) = tiny_llava_next, next_case
    packed = _stock_features(a, p)  # [S, D] incl. newline rows
    assert packed.shape[0] == e.n_llm_visual == int((p.inputs["input_ids"] == a.model.config.image_token_id).sum())
    is_nl = (packed == a.model.model.image_newline).all(-1)
    assert torch.equal(e.features, packed[~is_nl])
    assert torch.equal(e.state["slot_src"] < 0, is_nl)
    torch.testing.assert_close(a.projector(e.vision), e.features)


def test_next_scopes_and_newlines(tiny_llava_next, next_case):
    a, (p, e) = tiny_llava_next, next_case
    n = e.features.shape[0]
    h, w = p.inputs["image_sizes"][0].tolist()
    assert e.scopes[0].name == "base" and e.scopes[0].index.tolist() == list(range(16))
    assert e.scopes[0].box == (0.0, 0.0, float(w), float(h))
    assert [s.name for s in e.scopes[1:]] == [f"crop {k}" for k in range(1, len(e.scopes))]
    assert sum(s.index.numel() for s in e.scopes) == n
    assert torch.equal(torch.cat([s.index for s in e.scopes]).sort().values, torch.arange(n))
    for s in e.scopes:
        assert s.grid == (4, 4) and s.cells.shape == (s.index.numel(), 2)
        assert (s.cells >= 0).all() and (s.cells < 4).all()
        assert torch.equal(s.index, s.index.sort().values)
        x0, y0, x1, y1 = s.box
        assert x0 < x1 and y0 < y1 and x0 < w and y0 < h and x1 > 0 and y1 > 0
        # every candidate (a patch that survived unpadding) has its cell centre inside the image
        cw, ch = (x1 - x0) / 4, (y1 - y0) / 4
        cx = x0 + (s.cells[:, 1].double() + 0.5) * cw
        cy = y0 + (s.cells[:, 0].double() + 0.5) * ch
        assert ((cx > 0) & (cx < w) & (cy > 0) & (cy < h)).all(), s.name
    # crops are one resized image cut into equal tiles: every crop cell has the same size
    sizes = {(round((s.box[2] - s.box[0]) / 4, 3), round((s.box[3] - s.box[1]) / 4, 3)) for s in e.scopes[1:]}
    assert len(sizes) == 1, sizes
    # newline count = rows of the unpadded grid, from the processor's own arithmetic
    proc = a.processor
    from transformers.image_processing_utils import select_best_resolution

    bh, bw = select_best_resolution((h, w), proc.image_processor.image_grid_pinpoints)
    unpadded, newlines = proc._get_unpadded_features(h, w, 4, 4, bh // 56, bw // 56)
    assert e.n_llm_visual - n == newlines
    assert n == 16 + unpadded


@pytest.mark.parametrize("size", [(200, 30), (30, 200), (32, 32)])
def test_next_unpadding_removes_candidates(tiny_llava_next, size):
    p = tiny_llava_next.prepare(make_image(*size), Q)
    e = tiny_llava_next.encode(p)
    n_tiles = e.state["n_tiles"]
    assert e.features.shape[0] < 16 * n_tiles  # some tile rows / cols were padding only


def test_next_keep_all_equals_stock_generate(tiny_llava_next, next_case):
    a, (p, e) = tiny_llava_next, next_case
    li = a.build_inputs(p, e, torch.arange(e.features.shape[0]))
    assert li.n_visual == e.n_llm_visual
    assert a.generate(li, 8).ids == _stock_new_tokens(a, p)


def test_next_pruned_equals_hand_spliced_stock(tiny_llava_next, next_case):
    a, (p, e) = tiny_llava_next, next_case
    n = e.features.shape[0]
    kept = torch.arange(0, n, 3)
    li = a.build_inputs(p, e, kept)
    n_nl = e.n_llm_visual - n
    assert li.n_visual == kept.numel() + n_nl  # newlines always kept, not counted in the budget
    # independent: slots of the packed stock features that are newline rows or kept candidates
    packed = _stock_features(a, p)
    is_nl = (packed == a.model.model.image_newline).all(-1)
    cand_slots = (~is_nl).nonzero().squeeze(1)
    keep_slots = torch.cat([cand_slots[kept], is_nl.nonzero().squeeze(1)]).sort().values
    assert a.generate(li, 8).ids == _hand_pruned_generate(a, p, keep_slots)


# ---------------------------------------------------------------------------------------------
# loader


def test_aliases_and_registries():
    assert MODEL_ALIASES["llava-1.5"] == "llava-hf/llava-1.5-7b-hf"
    assert MODEL_ALIASES["llava-next"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert set(OFFLINE_MODELS) == {"tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl", "small-llava",
                                   "small-llava-next", "tiny-qwen3-vl", "tiny-llava-onevision", "small-qwen3-vl",
                                   "small-llava-onevision", "tiny-qwen3-vl-moe", "vllm-tiny-llava",
                                   "vllm-tiny-llava-next", "vllm-tiny-qwen2.5-vl", "vllm-tiny-qwen3-vl",
                                   "vllm-tiny-llava-onevision"}
    assert set(ADAPTERS) == {"llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision"}
    assert MODEL_ALIASES["qwen3-vl"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert MODEL_ALIASES["llava-onevision"] == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    assert adapter_class("llava") is LlavaAdapter and adapter_class("llava_next") is LlavaNextAdapter
    assert issubclass(LlavaNextAdapter, Adapter)


def test_unknown_family(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown model family 'bert'; known: llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl"):
        adapter_class("bert")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnknownNameError, match="known: llava, llava_next"):
        load_adapter(str(tmp_path), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match="has no config.json"):
        load_adapter(str(tmp_path / "empty"), device="cpu")


def test_resolve_device_and_dtype(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("fp16") == torch.float16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")
    with pytest.raises(UsageError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ZooError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_offline_model_cached_and_loaded_like_a_checkpoint(tiny_llava, zoo_model_cache):
    d = ensure_offline_model("tiny-llava", zoo_model_cache)
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert ensure_offline_model("tiny-llava", zoo_model_cache) == d  # no rebuild
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp
    again = load_adapter(str(d), device="cpu")  # as a local checkpoint dir
    assert not again.meaningless and type(again) is LlavaAdapter
    for (k, v), (k2, v2) in zip(tiny_llava.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_offline_build_is_deterministic_and_rebuilds_stale(tmp_path):
    d = ensure_offline_model("tiny-llava", tmp_path)
    first = (d / "model.safetensors").read_bytes()
    (d / ".zoo-offline-version").write_text("stale")
    d2 = ensure_offline_model("tiny-llava", tmp_path)
    assert d2 == d and (d / ".zoo-offline-version").read_text() != "stale"
    assert (d / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llava"]  # no temp dirs left
    with pytest.raises(UnknownNameError):
        ensure_offline_model("tiny-gpt", tmp_path)


def test_not_cached_hf_id_is_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ZooError) as info:
        load_adapter("zoo-test-nonexistent/no-such-model", device="cpu")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("model 'zoo-test-nonexistent/no-such-model' is not in the local cache")
    assert "random weights: " + ", ".join(OFFLINE_MODELS) in msg and "--model demo-llava" in msg
    assert "huggingface-cli download zoo-test-nonexistent/no-such-model" in msg


def test_random_weights_needs_an_alias():
    with pytest.raises(UsageError, match="aliases: llava-1.5, llava-1.5-13b, llava-next, qwen2.5-vl"):
        load_adapter("tiny-llava", device="cpu", random_weights=True)


@pytest.mark.parametrize("alias,params", [("llava-1.5", 7.06e9), ("llava-1.5-13b", 13.35e9), ("llava-next", 7.06e9)])
def test_shipped_configs_are_full_size(alias, params):
    from transformers import AutoConfig

    d = load_random_config(alias)
    assert d["_name_or_path"] == MODEL_ALIASES[alias]
    cfg = AutoConfig.for_model(**{k: v for k, v in d.items() if k != "_name_or_path"})
    cls = adapter_class(cfg.model_type).model_class()
    with torch.device("meta"):
        model = cls(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14


def test_small_llava_geometry_and_projector_ratio():
    cfg = tiny_llava_config(build_tokenizer(), small=True)
    with torch.device("meta"):
        model = LlavaAdapter.model_class()(cfg)
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    llm = sum(p.numel() for p in model.model.language_model.parameters())
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == 576
    assert 80e6 < llm < 130e6
    assert 0.002 < proj / llm < 0.006  # real LLaVA-1.5-7B: ~0.3%


@pytest.mark.parametrize("alias", ["llava-1.5", "llava-next"])
def test_from_config_random_weights_runs(alias):
    d = load_random_config(alias)  # full geometry, shrunk widths / depths so it runs on CPU
    d["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    d["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=1024)
    a = adapter_class(d["model_type"]).from_config(d, torch.device("cpu"), torch.float32)
    assert a.meaningless and a.model_id.startswith(MODEL_ALIASES[alias])
    p = a.prepare(make_image(300, 200), Q)
    e = a.encode(p)
    assert e.features.shape[0] >= 576
    assert a.generate(a.build_inputs(p, e, torch.arange(e.features.shape[0])), 3).ids == _stock_new_tokens(a, p, 3)


@pytest.mark.parametrize("size", [(80, 60), (60, 80), (200, 30), (30, 200)])
def test_next_crop_cells_have_equal_size_when_tiles_cover_padding(tiny_llava_next, size):
    """The overlay splits each crop's box evenly into its grid: boxes must be whole tiles (reaching
    past the image where a tile covers padding), not tiles clipped to the image."""
    e = tiny_llava_next.encode(tiny_llava_next.prepare(make_image(*size), Q))
    for s in e.scopes[1:]:
        cw, ch = (s.box[2] - s.box[0]) / 4, (s.box[3] - s.box[1]) / 4
        # the anyres resize keeps the aspect ratio, so a patch is square in original pixels
        assert abs(cw / ch - 1) < 0.05, (s.name, s.box)
