"""Qwen3-VL adapter on tiny random checkpoints (CPU): X/M split, deepstack, kept-token feeding, M-RoPE,
and the in-LLM prune loop's deepstack injection.

References: the stock model (``get_image_features``, forward, ``generate``), the stock model fed the kept
features and deepstack rows through its own ``mm_encoder_outputs`` scatter (transformers >= 5.18), and a
hand-written layer-by-layer prefill for in-LLM pruning.
"""

from __future__ import annotations

import inspect
import json
from importlib import resources

import pytest
import torch
from conftest import STOCK_GREEDY, make_image

from zoocli.adapters.decoder import cache_keyword
from zoocli.adapters.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter, build_tiny, offline_tokenizer, tiny_config
from zoocli.errors import UsageError

pytestmark = pytest.mark.slow

Q = "What is on the monitor?"
SIZES = [(300, 200), (200, 300)]  # (w, h): 4x6 and 6x4 merged tokens


_BUILT: dict = {}


def _build(kind, tmp_path_factory):
    if kind not in _BUILT:
        d = tmp_path_factory.mktemp(f"qwen3_vl_{kind}")
        build_tiny(d, second=kind == "second", moe=kind == "moe")
        _BUILT[kind] = (Qwen3VLMoeAdapter if kind == "moe" else Qwen3VLAdapter).load(d, "cpu", torch.float32)
    return _BUILT[kind]


@pytest.fixture(scope="module", params=["tiny", "second", "moe"])
def adapter(request, tmp_path_factory):
    """The tiny config (4 LLM layers, 3 deepstack mergers), a second with other sizes, and the tiny
    config as Qwen3-VL-MoE (sparse-expert MLPs, same vision path)."""
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _build("tiny", tmp_path_factory)


def _case(a, size=SIZES[0], seed=0):
    p = a.prepare(make_image(*size, seed=seed), Q)
    return p, a.encode(p)


def _strip(ids, model):
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out


def _stock_generate(a, p, n=8):
    a.model.model.rope_deltas = None
    L = p.inputs["input_ids"].shape[1]
    return _strip(a.model.generate(**p.inputs, **STOCK_GREEDY, max_new_tokens=n)[0, L:].tolist(), a.model)


# ---- checkpoint, encode ------------------------------------------------------------------------------


def test_tiny_checkpoint_is_consistent(adapter):
    cfg, tok = adapter.model.config, adapter.processor.tokenizer
    assert cfg.model_type == adapter.family and adapter.family in ("qwen3_vl", "qwen3_vl_moe")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert len(adapter.model.model.visual.deepstack_merger_list) == len(cfg.vision_config.deepstack_visual_indexes) >= 2
    assert type(adapter.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


@pytest.mark.parametrize("size", SIZES)
def test_encode_equals_stock_features_and_deepstack(adapter, size):
    p, e = _case(adapter, size)
    stock = adapter.model.model.get_image_features(p.inputs["pixel_values"], p.inputs["image_grid_thw"])
    assert torch.equal(torch.cat(list(stock.pooler_output)), e.features)
    assert torch.equal(adapter.projector(e.vision), e.features)
    assert len(e.state["deepstack"]) == len(stock.deepstack_features)
    for ours, theirs in zip(e.state["deepstack"], stock.deepstack_features):
        # one [N, D] tensor per merger on 5.17; a tuple of per-image tensors on 5.25
        assert torch.equal(ours, theirs if isinstance(theirs, torch.Tensor) else torch.cat(list(theirs)))
    (rows, cols), = [s.grid for s in e.scopes]
    assert rows * cols == e.n_llm_visual == e.features.shape[0] == 24
    assert (cols > rows) == (size[0] > size[1])


# ---- keep-all, pruned -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_keep_all_equals_stock_generate(adapter, size):
    p, e = _case(adapter, size)
    inputs = adapter.build_inputs(p, e, torch.arange(e.n_llm_visual))
    assert inputs.visual_mask.sum() == e.n_llm_visual and len(inputs.deepstack) == len(e.state["deepstack"])
    gen = adapter.generate(inputs, max_new_tokens=8)
    assert gen.ids == _stock_generate(adapter, p)
    assert gen.prefill_ms > 0 and gen.text == adapter.processor.tokenizer.decode(gen.ids, skip_special_tokens=True)


def test_keep_all_prefill_logits_equal_stock_forward(adapter):
    p, e = _case(adapter)
    inputs = adapter.build_inputs(p, e, torch.arange(e.n_llm_visual))
    lm = adapter.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
               position_ids=inputs.position_ids, visual_pos_masks=inputs.visual_mask,
               deepstack_visual_embeds=inputs.deepstack).last_hidden_state
        adapter.model.model.rope_deltas = None
        stock = adapter.model(**p.inputs).logits
    assert torch.equal(adapter.model.lm_head(h), stock)


def test_deepstack_matters(tiny):
    """Without the deepstack rows the answer changes: the tests above would see a dropped injection."""
    p, e = _case(tiny)
    inputs = tiny.build_inputs(p, e, torch.arange(e.n_llm_visual))
    full = tiny.generate(inputs, 8).ids
    inputs.deepstack = [torch.zeros_like(d) for d in inputs.deepstack]
    assert tiny.generate(inputs, 8).ids != full


@pytest.mark.parametrize("kept", [[0, 3, 5, 7, 13, 20], [2, 17, 23]])
def test_pruned_equals_stock_mm_encoder_outputs_route(adapter, kept):
    """The stock forward, fed the kept features AND the kept deepstack rows through its own scatter
    (``mm_encoder_outputs``), the pruned ids and the gathered original positions, gives our tokens."""
    model = adapter.model
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        pytest.skip("mm_encoder_outputs needs transformers >= 5.18")
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    p, e = _case(adapter)
    kept = torch.tensor(kept)
    ours = adapter.generate(adapter.build_inputs(p, e, kept), max_new_tokens=8).ids
    inp = p.inputs
    with torch.no_grad():
        stock = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
        feats = torch.cat(list(stock.pooler_output))
        img_cols = (inp["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        cols = torch.ones(inp["input_ids"].shape[1], dtype=torch.bool)
        cols[img_cols] = False
        cols[img_cols[kept]] = True
        ids = inp["input_ids"][:, cols]
        pos3 = model.model.get_rope_index(inp["input_ids"], mm_token_type_ids=inp["mm_token_type_ids"],
                                          image_grid_thw=inp["image_grid_thw"],
                                          attention_mask=inp["attention_mask"])[0][:, :, cols]
        enc = BaseModelOutputWithDeepstackFeatures(
            pooler_output=[feats[kept]], deepstack_features=[[torch.cat(list(d))[kept]] for d in stock.deepstack_features])
        out = model.generate(input_ids=ids, attention_mask=inp["attention_mask"][:, cols],
                             mm_token_type_ids=inp["mm_token_type_ids"][:, cols],
                             position_ids=torch.cat([torch.arange(ids.shape[1])[None, None], pos3]),
                             mm_encoder_outputs={"image": enc}, **STOCK_GREEDY, max_new_tokens=8)[0, ids.shape[1]:]
    assert ours == _strip(out.tolist(), model)


def test_zoo_prune_25_percent_indexes_every_deepstack_tensor_with_the_kept_set(tiny):
    """ZOO-Prune at 25%: what reaches the language model (its forward's own deepstack arguments) and
    what each decoder layer adds at the visual slots are the kept tokens' rows, in slot order."""
    from zoocli.pipeline import run_one

    lm = tiny.model.model.language_model
    seen: dict = {}
    layer_io: list = []

    def pre(mod, args, kwargs):
        if kwargs.get("deepstack_visual_embeds") is not None:
            seen.update(mask=kwargs["visual_pos_masks"].clone(), ds=[d.clone() for d in kwargs["deepstack_visual_embeds"]],
                        emb=kwargs["inputs_embeds"].clone(), pos=kwargs["position_ids"].clone())
            layer_io.clear()

    hooks = [lm.register_forward_pre_hook(pre, with_kwargs=True)]
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: layer_io.append(("in", i, a[0].clone()))))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: layer_io.append(("out", i, o.clone()))))
    image = make_image(300, 200, seed=3)
    try:
        res = run_one(tiny, image, Q, "zoo", "25%", max_new_tokens=2)
    finally:
        for h in hooks:
            h.remove()
    p, e = _case(tiny, seed=3)
    kept = torch.tensor(res.kept_indices).sort().values
    assert kept.numel() == 6 == res.n_llm_visual_kept  # 25% of 24
    mask = seen["mask"][0]
    assert int(mask.sum()) == 6
    assert torch.equal(seen["emb"][0, mask], e.features[kept])  # main features at the kept slots
    for j, d in enumerate(seen["ds"]):
        assert torch.equal(d, e.state["deepstack"][j][kept])  # every deepstack tensor, same kept set
    # kept tokens keep their original (t, h, w)
    from zoocli.adapters.qwen2_5_vl import rope_index

    pos3 = rope_index(tiny.model.model, p.inputs)[:, 0]
    img_cols = (p.inputs["input_ids"][0] == tiny.image_token_id).nonzero().squeeze(1)
    assert torch.equal(seen["pos"][1:, 0][:, mask], pos3[:, img_cols[kept]])
    # what each decoder layer got: its input = the previous output + deepstack[j] at the kept slots only
    prefill = [x for x in layer_io if x[2].shape[1] > 1]
    outs = {i: t for kind, i, t in prefill if kind == "out"}
    ins = {i: t for kind, i, t in prefill if kind == "in"}
    for j in range(len(seen["ds"])):
        added = ins[j + 1][0] - outs[j][0]
        assert torch.allclose(added[mask], e.state["deepstack"][j][kept], atol=1e-5)
        assert torch.equal(added[~mask], torch.zeros_like(added[~mask]))


def test_batched_rows_equal_single_rows(adapter):
    p1, e1 = _case(adapter, SIZES[0], seed=1)
    p2, e2 = _case(adapter, SIZES[1], seed=2)
    k1, k2 = torch.tensor([0, 4, 9, 11]), torch.arange(0, 24, 2)
    batch = adapter.build_inputs_batch([(p1, e1, k1, None), (p2, e2, k2, None)])
    assert batch.visual_mask.shape == batch.attention_mask.shape and batch.deepstack[0].shape[0] == 4 + 12
    got = [g.ids for g in adapter.generate_batch(batch, 6)]
    want = [adapter.generate(adapter.build_inputs(p, e, k), 6).ids for p, e, k in ((p1, e1, k1), (p2, e2, k2))]
    assert got == want


# ---- the in-LLM prune loop -----------------------------------------------------------------------------


def _loop_inputs(a, seed=0):
    p, e = _case(a, seed=seed)
    inputs = a.build_inputs(p, e, torch.arange(e.n_llm_visual))
    return p, e, inputs, a.visual_positions(p, e)


def test_prune_loop_without_stages_equals_stock_generate(adapter):
    from zoocli.prune_loop import generate_pruned

    p, e, inputs, visual = _loop_inputs(adapter)
    res = generate_pruned(adapter.decoder(), inputs.inputs_embeds, visual, [], attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids, max_new_tokens=8, deepstack=inputs.deepstack)
    assert adapter.answer_ids(res.tokens.tolist()) == _stock_generate(adapter, p)


def _reference_prefill(a, inputs, visual, layer, kept):
    """A slow, obvious prefill: layers < ``layer`` on the full sequence with deepstack at all visual
    rows, then drop the unkept visual rows, layers >= ``layer`` with deepstack at the kept rows only."""
    lm = a.model.model.language_model
    h, pos = inputs.inputs_embeds, inputs.position_ids
    rows = torch.arange(h.shape[1])
    vis_rows = visual.clone()
    cand = torch.arange(visual.numel())
    for i, blk in enumerate(lm.layers):
        if i == layer:
            keep = torch.ones(rows.numel(), dtype=torch.bool)
            keep[vis_rows] = False
            keep[vis_rows[kept]] = True
            h, pos, rows = h[:, keep], pos[..., keep], rows[keep]
            vis_rows, cand = torch.searchsorted(rows, visual[kept]), kept
        pe = lm.rotary_emb(h, pos[1:])
        h = blk(h, attention_mask=None, position_ids=pos[0], position_embeddings=pe)
        h = h[0] if isinstance(h, tuple) else h
        if i < len(inputs.deepstack):
            h = h.clone()
            h[0, vis_rows] = h[0, vis_rows] + inputs.deepstack[i][cand]
    return a.model.lm_head(lm.norm(h[:, -1:]))[0, -1].float()


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_in_llm_stage_injects_deepstack_at_the_surviving_tokens(tiny, layer):
    """A stage below (1, 2) or above (3) the last injection layer (2): the loop's prefill logits equal the
    hand-written reference that indexes every later deepstack tensor by the kept set."""
    from zoocli.prune_loop import PruneStage, generate_pruned

    p, e, inputs, visual = _loop_inputs(tiny, seed=5)
    res = generate_pruned(tiny.decoder(), inputs.inputs_embeds, visual, [PruneStage(layer=layer, n_keep=7)],
                          attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                          max_new_tokens=1, deepstack=inputs.deepstack)
    kept = res.kept[0]
    assert kept.numel() == 7
    with torch.no_grad():
        ref = _reference_prefill(tiny, inputs, visual, layer, kept)
    torch.testing.assert_close(res.prefill_logits, ref, rtol=1e-4, atol=1e-4)
    if layer < len(inputs.deepstack):  # a later injection really depends on the kept set
        wrong = [d.roll(1, dims=0) for d in inputs.deepstack]
        bad = generate_pruned(tiny.decoder(), inputs.inputs_embeds, visual, [PruneStage(layer=layer, n_keep=7)],
                              attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                              max_new_tokens=1, deepstack=[inputs.deepstack[0]] + wrong[1:])
        assert not torch.allclose(bad.prefill_logits, res.prefill_logits)


def test_in_llm_methods_run_through_the_pipeline(tiny):
    from zoocli.pipeline import run_one

    for method in ("fastv", "sparsevlm"):
        res = run_one(tiny, make_image(300, 200), Q, method, "8", max_new_tokens=3)
        assert res.stage == "in_llm" and res.n_llm_visual_kept <= 8 and len(res.kept_indices) <= 8


def test_prune_loop_refuses_misaligned_deepstack(tiny):
    from zoocli.prune_loop import generate_pruned

    _, _, inputs, visual = _loop_inputs(tiny)
    with pytest.raises(UsageError, match="deepstack"):
        generate_pruned(tiny.decoder(), inputs.inputs_embeds, visual, [], attention_mask=inputs.attention_mask,
                        position_ids=inputs.position_ids, max_new_tokens=1, deepstack=[d[:-1] for d in inputs.deepstack])


def test_visionzip_is_refused_in_one_line(tiny):
    from zoocli.pipeline import check_family

    with pytest.raises(UsageError, match="does not support qwen3_vl"):
        check_family(tiny, "visionzip")


# ---- configs, random weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers,hidden,deep,billions", [
    ("qwen3-vl-8b.json", 36, 4096, [8, 16, 24], 8.77), ("qwen3-vl-2b.json", 28, 2048, [5, 11, 17], 2.13)])
def test_full_size_configs(name, layers, hidden, deep, billions):
    from transformers import Qwen3VLConfig

    cfg = Qwen3VLConfig.from_dict(json.loads(resources.files("zoocli").joinpath("data", name).read_text()))
    t, v = cfg.text_config, cfg.vision_config
    assert (t.num_hidden_layers, t.hidden_size, list(v.deepstack_visual_indexes)) == (layers, hidden, deep)
    assert v.out_hidden_size == hidden and v.patch_size == 16 and t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert sum(t.rope_parameters["mrope_section"]) * 2 == t.head_dim
    with torch.device("meta"):
        model = Qwen3VLAdapter.model_class()._from_config(cfg)
    assert round(sum(q.numel() for q in model.parameters()) / 1e9, 2) == billions


def test_from_config_random_weights_runs():
    a = Qwen3VLAdapter.from_config(tiny_config(offline_tokenizer()), "cpu", torch.float32)
    assert a.meaningless and a.processor.image_processor.size["longest_edge"] == 16777216
    p = a.prepare(make_image(300, 260), Q)  # min_pixels 65536 -> at least 64 merged tokens
    e = a.encode(p)
    assert e.n_llm_visual >= 64
    assert len(a.generate(a.build_inputs(p, e, torch.tensor([0, 3])), max_new_tokens=3).ids) <= 3


def test_cache_keyword_of_the_text_model():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    assert cache_keyword(Qwen3VLTextModel) in inspect.signature(Qwen3VLTextModel.forward).parameters
