"""The in-LLM pruning loop against stock transformers on tiny random models (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from zoocli.errors import UsageError
from zoocli.prune_loop import PruneStage, StageContext, generate_pruned, last_token_scorer, rows_scorer

pytestmark = pytest.mark.slow

N_LAYERS, VOCAB = 4, 96


def _llava(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                max_position_embeddings=256, eos_token_id=VOCAB - 1),
        image_token_id=VOCAB - 2,
    )
    cfg.text_config._attn_implementation = attn
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a less flat random model: distinct greedy tokens, peaky attention
        for p in model.model.language_model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def models():
    sdpa = _llava("sdpa")
    eager = _llava("eager")
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def _inputs(length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, length, 64, generator=g)
    return emb, torch.ones(1, length, dtype=torch.long), torch.arange(4, 4 + 12)  # visual span 4..15


def test_no_stages_equals_stock_forward_and_generate(models):
    model, _ = models
    emb, mask, vis = _inputs()
    stock_logits = model(inputs_embeds=emb, attention_mask=mask).logits[0, -1]
    stock = model.generate(inputs_embeds=emb, attention_mask=mask, do_sample=False, max_new_tokens=8,
                           eos_token_id=None, pad_token_id=0)[0]
    seen = []
    res = generate_pruned(model, emb, vis, [], attention_mask=mask, max_new_tokens=8, eos_token_id=[],
                          on_prefill_end=lambda: seen.append("prefill"), on_token=lambda s, t: seen.append(s))
    torch.testing.assert_close(res.prefill_logits, stock_logits.float(), rtol=0, atol=1e-5)
    assert res.tokens.tolist() == stock.tolist()
    assert seen == ["prefill", *range(8)]
    assert len(set(res.tokens.tolist())) > 1  # the check is not vacuous


def test_eos_stops_generation(models):
    model, _ = models
    emb, mask, vis = _inputs()
    first = generate_pruned(model, emb, vis, [], attention_mask=mask, max_new_tokens=5, eos_token_id=[]).tokens
    res = generate_pruned(model, emb, vis, [], attention_mask=mask, max_new_tokens=5, eos_token_id=int(first[1]))
    assert res.tokens.tolist() == first[:2].tolist()


def _reference_pruned_logits(model, emb, mask, vis, k_layer, kept_vis):
    """Layers < K stock on the full sequence, layers >= K stock on the sliced states at original positions."""
    lm = model.model.language_model
    full = lm(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True)
    h_k = full.hidden_states[k_layer]  # input of layer K
    keep = torch.ones(emb.shape[1], dtype=torch.bool)
    keep[vis] = False
    keep[vis[kept_vis]] = True
    rows = keep.nonzero().squeeze(1)
    tcfg = LlamaConfig(**{**lm.config.to_dict(), "num_hidden_layers": N_LAYERS - k_layer})
    tcfg._attn_implementation = lm.config._attn_implementation
    tail = LlamaModel(tcfg).eval()
    for j in range(N_LAYERS - k_layer):
        tail.layers[j].load_state_dict(lm.layers[k_layer + j].state_dict())
    tail.norm.load_state_dict(lm.norm.state_dict())
    out = tail(inputs_embeds=h_k[:, rows], attention_mask=torch.ones(1, rows.numel(), dtype=torch.long),
               position_ids=rows[None], use_cache=False).last_hidden_state
    return model.lm_head(out)[0, -1]


@pytest.mark.parametrize("k_layer", [1, 2, 3])
def test_stage_prefill_equals_independent_reference(models, k_layer):
    model, eager = models
    emb, mask, vis = _inputs()
    n_keep = 5
    res = generate_pruned(model, emb, vis, [PruneStage(k_layer, n_keep)], attention_mask=mask, max_new_tokens=1)
    (rec,) = res.stages
    # FastV's selection, from stock eager attention of layer K-1: last row, mean over heads, top-k
    att = eager(inputs_embeds=emb, attention_mask=mask, output_attentions=True).attentions[k_layer - 1]
    score = att[0, :, -1, vis].mean(0)
    want = torch.sort(torch.sort(score, descending=True, stable=True).indices[:n_keep]).values
    assert rec.kept.tolist() == want.tolist()
    torch.testing.assert_close(rec.scores, score, rtol=0, atol=1e-6)
    ref = _reference_pruned_logits(model, emb, mask, vis, k_layer, rec.kept)
    torch.testing.assert_close(res.prefill_logits, ref.float(), rtol=0, atol=1e-5)


def test_recomputed_attention_rows_equal_eager_output_attentions(models):
    model, eager = models
    emb, mask, vis = _inputs()
    rows = torch.tensor([0, 5, 17, 23])
    captured = {}

    def scorer(ctx: StageContext):
        captured["att"] = ctx.attention(rows)
        return last_token_scorer(ctx)

    generate_pruned(model, emb, vis, [PruneStage(3, 4, scorer)], attention_mask=mask, max_new_tokens=1)
    ref = eager(inputs_embeds=emb, attention_mask=mask, output_attentions=True).attentions[2][0][:, rows]
    torch.testing.assert_close(captured["att"], ref.float(), rtol=0, atol=1e-6)


def test_two_stages_decode_matches_teacher_forced_recompute(models):
    """Decoding with a pruned cache == re-running the whole pruned prefill on prompt + generated tokens."""
    model, _ = models
    emb, mask, vis = _inputs()
    stages = [PruneStage(1, 8), PruneStage(3, 3, rows_scorer(torch.tensor([18, 20, 23])))]
    res = generate_pruned(model, emb, vis, stages, attention_mask=mask, max_new_tokens=4, eos_token_id=[],
                          return_step_logits=True)
    assert [r.kept.numel() for r in res.stages] == [8, 3]
    assert set(res.stages[1].kept.tolist()) <= set(res.stages[0].kept.tolist())
    embed = model.get_input_embeddings()

    def fixed(kept):  # a scorer that re-selects exactly ``kept`` (visual-span indices)
        return lambda ctx: torch.isin(torch.searchsorted(vis, ctx.orig[ctx.visual]), kept).float()

    forced = [PruneStage(s.layer, s.n_keep, fixed(r.kept)) for s, r in zip(stages, res.stages)]
    for t in range(1, 4):
        ext = torch.cat([emb, embed(res.tokens[:t])[None]], dim=1)
        again = generate_pruned(model, ext, vis, forced, attention_mask=torch.ones(1, ext.shape[1]),
                                max_new_tokens=1)
        assert [r.kept.tolist() for r in again.stages] == [r.kept.tolist() for r in res.stages]
        torch.testing.assert_close(again.prefill_logits, res.step_logits[t], rtol=0, atol=1e-4)


def test_left_padding_mask_is_respected(models):
    model, _ = models
    emb, mask, vis = _inputs()
    pad = torch.randn(1, 3, 64)
    emb_p = torch.cat([pad, emb], dim=1)
    mask_p = torch.cat([torch.zeros(1, 3, dtype=torch.long), mask], dim=1)
    pos = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(emb.shape[1])])[None]
    a = generate_pruned(model, emb, vis, [PruneStage(2, 4)], attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    b = generate_pruned(model, emb_p, vis + 3, [PruneStage(2, 4)], attention_mask=mask_p, position_ids=pos,
                        max_new_tokens=3, eos_token_id=[])
    assert a.stages[0].kept.tolist() == b.stages[0].kept.tolist()
    torch.testing.assert_close(a.prefill_logits, b.prefill_logits, rtol=0, atol=1e-4)
    assert a.tokens.tolist() == b.tokens.tolist()


def test_bad_stages_are_refused(models):
    model, _ = models
    emb, mask, vis = _inputs()
    for stages in ([PruneStage(0, 3)], [PruneStage(N_LAYERS, 3)], [PruneStage(2, 3), PruneStage(2, 4)]):
        with pytest.raises(UsageError):
            generate_pruned(model, emb, vis, stages, attention_mask=mask, max_new_tokens=1)


# ---------------------------------------------------------------- Qwen2.5-VL text model (M-RoPE, 4-row positions)


@pytest.fixture(scope="module")
def qwen_models():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    def build(attn):
        torch.manual_seed(0)
        cfg = Qwen2_5_VLConfig(
            vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
                               fullatt_block_indexes=[0]),
            text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                             max_position_embeddings=256, eos_token_id=VOCAB - 1,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3]}),
            image_token_id=VOCAB - 2, video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 4,
            vision_end_token_id=VOCAB - 5,
        )
        cfg.text_config._attn_implementation = attn
        cfg._attn_implementation = attn
        m = Qwen2_5_VLForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            for p in m.model.language_model.parameters():
                if p.ndim == 2:
                    p.mul_(4.0)
        return m

    sdpa, eager = build("sdpa"), build("eager")
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def _qwen_inputs():
    """4 text tokens, a 3x4 merged-token image (t=4, h=4+r, w=4+c), 6 text tokens resuming at 8."""
    g = torch.Generator().manual_seed(2)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    img = torch.stack([torch.full((12,), 4), 4 + rows.flatten(), 4 + cols.flatten()])  # [3, 12]
    pre, post = torch.arange(4).expand(3, -1), (8 + torch.arange(6)).expand(3, -1)
    pos3 = torch.cat([pre, img, post], dim=1)[:, None]  # [3, 1, 22]
    pos4 = torch.cat([torch.arange(22)[None, None], pos3])  # [4, 1, 22]
    return torch.randn(1, 22, 64, generator=g), torch.ones(1, 22, dtype=torch.long), pos4, torch.arange(4, 16)


def test_qwen_no_stages_equals_stock(qwen_models):
    model, _ = qwen_models
    emb, mask, pos4, vis = _qwen_inputs()
    stock_logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos4).logits[0, -1]
    stock = model.generate(inputs_embeds=emb, attention_mask=mask, position_ids=pos4, do_sample=False,
                           max_new_tokens=6, eos_token_id=None, pad_token_id=0)[0]
    res = generate_pruned(model, emb, vis, [], attention_mask=mask, position_ids=pos4, max_new_tokens=6,
                          eos_token_id=[])
    torch.testing.assert_close(res.prefill_logits, stock_logits.float(), rtol=0, atol=1e-5)
    assert res.tokens.tolist() == stock.tolist()


def test_qwen_stage_matches_eager_attention_and_reference(qwen_models):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    model, eager = qwen_models
    emb, mask, pos4, vis = _qwen_inputs()
    k_layer, n_keep = 2, 5
    captured = {}

    def scorer(ctx):
        captured["att"] = ctx.attention(torch.arange(22))
        return last_token_scorer(ctx)

    res = generate_pruned(model, emb, vis, [PruneStage(k_layer, n_keep, scorer)], attention_mask=mask,
                          position_ids=pos4, max_new_tokens=1)
    lm = model.model.language_model
    att = eager.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos4,
                                     output_attentions=True).attentions[k_layer - 1][0]
    torch.testing.assert_close(captured["att"], att.float(), rtol=0, atol=1e-6)
    score = att[:, -1, vis].mean(0)
    kept = torch.sort(torch.sort(score, descending=True, stable=True).indices[:n_keep]).values
    assert res.stages[0].kept.tolist() == kept.tolist()
    # reference: stock layers >= K on the sliced states with the original (sliced) M-RoPE positions
    h_k = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos4, output_hidden_states=True).hidden_states[k_layer]
    keep = torch.ones(22, dtype=torch.bool)
    keep[vis] = False
    keep[vis[kept]] = True
    rows = keep.nonzero().squeeze(1)
    tcfg = Qwen2_5_VLTextConfig(**{**lm.config.to_dict(), "num_hidden_layers": N_LAYERS - k_layer,
                                   "layer_types": None})
    tcfg._attn_implementation = "sdpa"
    tail = Qwen2_5_VLTextModel(tcfg).eval()
    for j in range(N_LAYERS - k_layer):
        tail.layers[j].load_state_dict(lm.layers[k_layer + j].state_dict())
    tail.norm.load_state_dict(lm.norm.state_dict())
    pos_k = torch.cat([torch.arange(rows.numel())[None, None], pos4[1:, :, rows]])
    out = tail(inputs_embeds=h_k[:, rows], attention_mask=torch.ones(1, rows.numel(), dtype=torch.long),
               position_ids=pos_k, use_cache=False).last_hidden_state
    torch.testing.assert_close(res.prefill_logits, model.lm_head(out)[0, -1].float(), rtol=0, atol=1e-5)


def test_pruned_generate_raises_no_deprecation_warning(models):
    """The layers get their KV cache by the keyword the installed transformers names (``cache``
    from 5.2x, ``past_key_values`` in 5.17): no FutureWarning / DeprecationWarning either way."""
    import warnings

    from zoocli.adapters.decoder import cache_keyword

    model, _ = models
    layer_cls = type(model.model.language_model.layers[0])
    import inspect

    assert cache_keyword(layer_cls) in inspect.signature(layer_cls.forward).parameters
    emb, mask, vis = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        generate_pruned(model, emb, vis, [PruneStage(2, 4)], attention_mask=mask, max_new_tokens=3,
                        eos_token_id=[])
