"""Qwen2.5-VL adapter on a tiny random checkpoint (CPU): X/M split, kept-token feeding, M-RoPE positions."""

from __future__ import annotations

import importlib.util
import inspect
import json
from importlib import resources

import numpy as np
import pytest
import torch
from conftest import STOCK_GREEDY
from PIL import Image

from zoocli.adapters.qwen2_5_vl import (
    QWEN_CHAT_TEMPLATE,
    Qwen25VLAdapter,
    build_tiny,
    load_processor,
    offline_tokenizer,
    tiny_config,
)

pytestmark = pytest.mark.slow

QUESTION = "What is on the monitor?"
SIZES = [(300, 200), (200, 300)]  # (w, h): landscape 4x6 merged tokens, portrait 6x4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2_5_vl_tiny")
    build_tiny(d)
    return d


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return Qwen25VLAdapter.load(tiny_dir, "cpu", torch.float32)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def case(request, adapter):
    prepared = adapter.prepare(_image(*request.param), QUESTION)
    return prepared, adapter.encode(prepared)


def _rope(model, inputs):
    kw = {"image_grid_thw": inputs["image_grid_thw"], "attention_mask": inputs["attention_mask"]}
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        kw["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    return model.model.get_rope_index(inputs["input_ids"], **kw)[0]  # [3, B, L]


def _strip(ids: list[int], model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out


# ---- checkpoint and processor ----------------------------------------------------------------------


def test_tiny_checkpoint_is_consistent(tiny_dir, adapter):
    cfg = adapter.model.config
    tok = adapter.processor.tokenizer
    assert cfg.text_config.vocab_size >= len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) * 2 == head_dim
    assert (tiny_dir / "chat_template.jinja").is_file()
    assert json.loads((tiny_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_tiny_build_is_deterministic(tiny_dir, tmp_path):
    build_tiny(tmp_path)
    from safetensors.torch import load_file

    a, b = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_processor_without_torchvision_or_autoprocessor(tiny_dir):
    assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed next to +cpu torch"
    proc = load_processor(tiny_dir)  # AutoTokenizer + AutoImageProcessor + the no-video processor
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert proc.chat_template == QWEN_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    out = proc(text=[prompt], images=[_image(300, 200)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 12]]  # 4x6 merged tokens
    assert int((out["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 24
    assert set(out) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}


def test_prepare(adapter, case):
    prepared, _ = case
    ids = prepared.inputs["input_ids"]
    assert ids.shape[0] == 1 and prepared.inputs["attention_mask"].shape == ids.shape
    tok = adapter.processor.tokenizer
    assert tok.decode(prepared.question_ids) == QUESTION
    # the question's ids appear verbatim in the prompt, after the image
    q = prepared.question_ids.tolist()
    row = ids[0].tolist()
    starts = [i for i in range(len(row) - len(q) + 1) if row[i : i + len(q)] == q]
    assert starts and starts[0] > max(i for i, t in enumerate(row) if t == adapter.image_token_id)


# ---- encode: X, M, scopes ------------------------------------------------------------------------------


def test_encode_projector_equals_stock_features(adapter, case):
    prepared, enc = case
    stock = adapter.model.model.get_image_features(prepared.inputs["pixel_values"], prepared.inputs["image_grid_thw"])
    ref = torch.cat(list(stock.pooler_output))  # [N, D], raster order
    n_pad = int((prepared.inputs["input_ids"] == adapter.image_token_id).sum())
    d_v = adapter.model.config.vision_config.hidden_size
    assert enc.vision.shape == (n_pad, 4 * d_v) and enc.features.shape == ref.shape
    assert enc.n_llm_visual == n_pad
    assert torch.equal(adapter.projector(enc.vision), ref)
    assert torch.equal(enc.features, ref)
    # row-wise: any subset of rows projects to the same rows (up to BLAS blocking)
    sub = torch.tensor([0, 5, n_pad - 1])
    with torch.no_grad():
        torch.testing.assert_close(adapter.projector(enc.vision[sub]), ref[sub], rtol=1e-5, atol=1e-5)
        assert adapter.projector(enc.vision[None, :2]).shape == (1, 2, ref.shape[1])
    assert adapter.projector.merger is adapter.model.model.visual.merger


def test_encode_unpermutes_window_order(adapter):
    """The landscape image spans two ViT windows, so window order != raster order; without the
    argsort(window_index) the merger output would not match the stock features."""
    prepared = adapter.prepare(_image(300, 200), QUESTION)
    enc = adapter.encode(prepared)
    wi = enc.state["window_index"]
    assert not torch.equal(wi, torch.arange(len(wi)))
    in_window_order = enc.vision[torch.argsort(torch.argsort(wi))]  # back to the ViT's order
    assert not torch.allclose(adapter.projector(in_window_order), enc.features)


def test_encode_scope(adapter, case):
    prepared, enc = case
    (scope,) = enc.scopes
    _, h, w = prepared.inputs["image_grid_thw"][0].tolist()
    rows, cols = h // 2, w // 2
    assert scope.name == "image" and scope.grid == (rows, cols)
    assert torch.equal(scope.index, torch.arange(rows * cols))
    assert scope.cells.tolist() == [[r, c] for r in range(rows) for c in range(cols)]
    assert scope.box == (0.0, 0.0, float(prepared.image.size[0]), float(prepared.image.size[1]))
    # landscape image -> more columns than rows, portrait the reverse
    assert (cols > rows) == (prepared.image.size[0] > prepared.image.size[1])


# ---- build_inputs / generate ------------------------------------------------------------------------


def test_keep_all_equals_stock_generate(adapter, case):
    prepared, enc = case
    n = enc.n_llm_visual
    inputs = adapter.build_inputs(prepared, enc, torch.arange(n))
    assert inputs.n_visual == n and inputs.position_ids.shape == (4, 1, prepared.inputs["input_ids"].shape[1])
    gen = adapter.generate(inputs, max_new_tokens=8)

    L = prepared.inputs["input_ids"].shape[1]
    stock = adapter.model.generate(**prepared.inputs, **STOCK_GREEDY, max_new_tokens=8)[0, L:].tolist()
    assert gen.ids == _strip(stock, adapter.model)
    assert gen.text == adapter.processor.tokenizer.decode(gen.ids, skip_special_tokens=True)
    assert gen.prefill_ms > 0 and gen.decode_ms >= 0


def test_keep_all_logits_equal_stock_forward(adapter, case):
    prepared, enc = case
    inputs = adapter.build_inputs(prepared, enc, torch.arange(enc.n_llm_visual))
    with torch.no_grad():
        ours = adapter.model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
        ).logits
        adapter.model.model.rope_deltas = None
        stock = adapter.model(**prepared.inputs).logits
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("kept", [[0, 3, 5, 7, 13, 20], [1], [2, 17, 23]])
def test_pruned_equals_independent_stock_route(adapter, case, kept):
    """The adapter's pruned inputs give the same tokens as the stock model fed the same kept features
    through its own placeholder scatter (mm_encoder_outputs, transformers >= 5.18) or through
    inputs_embeds built here, with gathered original M-RoPE positions."""
    prepared, enc = case
    model, inp = adapter.model, prepared.inputs
    kept = torch.tensor(kept)
    ours = adapter.generate(adapter.build_inputs(prepared, enc, kept), max_new_tokens=8)

    with torch.no_grad():
        stock = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
        feats = torch.cat(list(stock.pooler_output))  # [N, D]
        img_cols = (inp["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        cols = torch.ones(inp["input_ids"].shape[1], dtype=torch.bool)
        cols[img_cols] = False
        cols[img_cols[kept]] = True
        ids = inp["input_ids"][:, cols]
        mask = inp["attention_mask"][:, cols]
        pos3 = _rope(model, inp)[:, :, cols]
        position_ids = torch.cat([torch.arange(ids.shape[1])[None, None], pos3])  # [4, 1, k_len]
        common = dict(attention_mask=mask, position_ids=position_ids, **STOCK_GREEDY, max_new_tokens=8)
        if "mm_encoder_outputs" in inspect.signature(model.forward).parameters:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            out = model.generate(
                input_ids=ids,
                mm_token_type_ids=inp["mm_token_type_ids"][:, cols],
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats[kept]])},
                **common,
            )[0, ids.shape[1] :]
        else:
            embeds = model.get_input_embeddings()(ids)
            mask3 = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
            out = model.generate(inputs_embeds=embeds.masked_scatter(mask3, feats[kept]), **common)[0]
    assert ours.ids == _strip(out.tolist(), model)


def test_kept_tokens_keep_original_mrope_positions(adapter, case):
    prepared, enc = case
    inp = prepared.inputs
    kept = torch.tensor([0, 2, 7, 11, enc.n_llm_visual - 1])
    inputs = adapter.build_inputs(prepared, enc, kept)
    full = _rope(adapter.model, inp)[:, 0]  # [3, L] unpruned
    ids = inp["input_ids"][0]
    img_cols = (ids == adapter.image_token_id).nonzero().squeeze(1)
    first, last = int(img_cols[0]), int(img_cols[-1])
    n_after = ids.shape[0] - last - 1
    K, L = len(kept), first + len(kept) + n_after
    pos = inputs.position_ids[:, 0]  # [4, L]
    assert pos.shape == (4, L) and inputs.inputs_embeds.shape[1] == L and inputs.attention_mask.shape == (1, L)
    assert inputs.n_visual == K
    assert torch.equal(pos[0], torch.arange(L))  # text row: sequential over the pruned sequence
    assert torch.equal(pos[1:, :first], full[:, :first])  # text before the image
    assert torch.equal(pos[1:, first : first + K], full[:, img_cols[kept]])  # kept image tokens: their (t, h, w)
    assert torch.equal(pos[1:, first + K :], full[:, last + 1 :])  # later text keeps its original positions
    # and the (h, w) rows are the token's grid cell offset by the image start
    cells = enc.scopes[0].cells[kept]
    assert torch.equal(pos[2, first : first + K] - first, cells[:, 0])
    assert torch.equal(pos[3, first : first + K] - first, cells[:, 1])
    # kept rows carry the kept features, the text around them the text embeddings
    assert torch.equal(inputs.inputs_embeds[0, first : first + K], enc.features[kept])
    emb = adapter.model.get_input_embeddings()
    assert torch.equal(inputs.inputs_embeds[0, :first], emb(ids[:first]))


def test_tokens_override_and_unsorted_kept(adapter, case):
    prepared, enc = case
    kept = torch.tensor([9, 1, 4])
    tokens = torch.randn(3, enc.features.shape[1])
    inputs = adapter.build_inputs(prepared, enc, kept, tokens=tokens)
    first = int((prepared.inputs["input_ids"][0] == adapter.image_token_id).nonzero()[0])
    # sorted order 1, 4, 9 -> tokens rows 1, 2, 0
    assert torch.equal(inputs.inputs_embeds[0, first : first + 3], tokens[[1, 2, 0]])


def test_generate_positions_extend_and_rope_deltas_unused(adapter, case):
    """generate extends the 4-row positions correctly (a teacher-forced pass without cache over prompt +
    generated tokens reproduces every token) and, with explicit position_ids, ignores model.rope_deltas."""
    prepared, enc = case
    model = adapter.model
    inputs = adapter.build_inputs(prepared, enc, torch.tensor([0, 3, 8, 12, 17]))
    kw = dict(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask)
    kw["position_ids"] = inputs.position_ids
    with torch.no_grad():
        model.model.rope_deltas = torch.tensor([[1000]])  # garbage: must not matter
        new = model.generate(**kw, **STOCK_GREEDY, max_new_tokens=6, min_new_tokens=6)[0, -6:]
        model.model.rope_deltas = torch.tensor([[-1000]])
        again = model.generate(**kw, **STOCK_GREEDY, max_new_tokens=6, min_new_tokens=6)[0, -6:]
        assert torch.equal(new, again)

        L = inputs.inputs_embeds.shape[1]
        embeds = torch.cat([inputs.inputs_embeds, model.get_input_embeddings()(new[None, :-1])], dim=1)
        steps = torch.arange(1, 6).view(1, 1, -1)
        pos = torch.cat([inputs.position_ids, inputs.position_ids[..., -1:] + steps], dim=-1)  # [4, 1, L+5]
        ones = torch.ones(1, L + 5, dtype=torch.long)
        logits = model(inputs_embeds=embeds, attention_mask=ones, position_ids=pos, use_cache=False).logits
    assert torch.equal(logits[0, L - 1 :].argmax(-1), new)
    # the stock model continues text after the image at max position + 1, like the extension does
    assert int(inputs.position_ids[1:, 0, -1].max()) + 1 == int(pos[1:, 0, L].min())
    assert adapter.generate(inputs, 6).ids == _strip(new.tolist(), model)


# ---- config / random weights --------------------------------------------------------------------------


def test_full_size_config_matches_qwen2_5_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = json.loads(resources.files("zoocli").joinpath("data/qwen2.5-vl-7b.json").read_text())
    cfg = Qwen2_5_VLConfig.from_dict(d)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert sum(t.rope_parameters["mrope_section"]) * 2 == t.hidden_size // t.num_attention_heads
    assert (v.depth, v.hidden_size, v.out_hidden_size, v.window_size) == (32, 1280, 3584, 112)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151655,
        151656,
        151652,
        151653,
    )
    assert not cfg.tie_word_embeddings
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.29


def test_from_config_random_weights_runs():
    """Random weights + offline tokenizer + the real image-processor settings; special ids follow the tokenizer."""
    a = Qwen25VLAdapter.from_config(tiny_config(offline_tokenizer()), "cpu", torch.float32)
    assert a.meaningless and a.family == "qwen2_5_vl"
    assert a.processor.image_processor.size["longest_edge"] == 12845056
    assert a.model.config.image_token_id == a.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prepared = a.prepare(_image(64, 56), QUESTION)  # min_pixels 3136 -> 56x56 -> 2x2 merged tokens
    enc = a.encode(prepared)
    assert enc.n_llm_visual == enc.features.shape[0] == 4
    gen = a.generate(a.build_inputs(prepared, enc, torch.tensor([0, 3])), max_new_tokens=3)
    assert len(gen.ids) <= 3
