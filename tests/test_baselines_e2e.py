"""The paper's baselines end to end through the adapters on the offline tiny models (CPU).

VisionZip's signals against eager ``output_attentions`` of the vision tower, FastV / SparseVLM kept
sets against eager attention of the LLM and the ``llm_loop`` reference, ZSPAPrune's relevance, and
the CLI surface (ask / compare / bench / methods).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from zoocli.adapters.decoder import language_model
from zoocli.prune_loop import generate_pruned
from zoocli.methods.fastv import fastv_stage
from zoocli.methods.sparsevlm import sparsevlm_raters
from zoocli.pipeline import encode_image, prompt_embeddings, run_method, run_one, select_tokens
from cli_helpers import run as _run

REPO = Path(__file__).resolve().parent.parent
CUP = str(REPO / "sample_images" / "coffee_cup.jpg")
Q = "What is in the cup?"

SUPPORT = {
    "tiny_llava": ["visionzip", "fastv", "sparsevlm", "zspaprune"],
    "tiny_llava_next": ["visionzip", "fastv", "sparsevlm", "zspaprune"],
    "tiny_qwen": ["fastv", "sparsevlm", "zspaprune"],
}
CASES = [(m, meth) for m, meths in SUPPORT.items() for meth in meths]


@pytest.fixture(scope="module")
def image():
    from zoocli.images import load_image

    return load_image(CUP)


def _eager(adapter):
    model = copy.deepcopy(adapter.model)
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("fixture,method", CASES)
def test_each_method_runs_end_to_end_within_budget(request, image, fixture, method):
    adapter = request.getfixturevalue(fixture)
    keep = 6
    res = run_one(adapter, image, Q, method, keep, max_new_tokens=2)
    kept = res.kept_indices
    assert 0 < len(kept) <= keep
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < res.n_visual_tokens
    # the kept-token grid shows exactly the picks (of the last stage, for in-LLM methods)
    shown = {i for s in res.scopes for i, k in zip(s["index"], s["kept"]) if k}
    assert shown == set(kept)
    assert res.n_llm_visual_kept == res.n_llm_visual_full - res.n_visual_tokens + len(kept)
    assert res.stage == ("in_llm" if method in ("fastv", "sparsevlm") else "pre_llm")
    if res.stage == "in_llm":
        assert res.llm_stages and res.llm_stages[-1]["kept"] == len(kept)
        t = res.timings_ms  # selection is inside prefill, and ttft does not count it twice
        assert t["selection"] <= t["prefill"]
        assert t["ttft"] == pytest.approx(t["preprocess"] + t["vision"] + t["build"] + t["prefill"], abs=0.01)


# ------------------------------------------------------------------------------------ VisionZip


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_visionzip_signals_equal_eager_output_attentions(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    sig = adapter.vision_signals(enc.prepared, enc.encoded)
    eager = _eager(adapter)
    tower = eager.model.vision_tower
    pv = enc.prepared.inputs["pixel_values"]
    if pv.dim() == 5:  # LLaVA-NeXT: the tiles encode used
        pv = pv[0, :enc.encoded.state["n_tiles"]]
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    keys = []
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    try:
        with torch.no_grad():
            att = tower(pv, output_attentions=True).attentions[-2]  # [T, H, S, S]
    finally:
        hook.remove()
    heads = att.shape[1]
    ref_cls = att[:, :, 0, 1:].sum(1).reshape(-1)  # [T*P]
    k = keys[0]
    ref_keys = k.view(k.shape[0], k.shape[1], heads, -1).mean(2)[:, 1:].reshape(-1, k.shape[-1] // heads)
    slot_row = enc.encoded.state.get("slot_row")
    rows = slot_row[slot_row >= 0] if slot_row is not None else torch.arange(ref_cls.numel())
    assert sig["cls_attn"].shape == (enc.n,) and sig["vision_keys"].shape[0] == enc.n
    torch.testing.assert_close(sig["cls_attn"], ref_cls[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sig["vision_keys"], ref_keys[rows], rtol=1e-5, atol=1e-6)


def test_visionzip_keeps_argmax_cls_attn_and_feeds_merged_tokens(tiny_llava, image):
    enc = encode_image(tiny_llava, image, Q)
    cls_attn = tiny_llava.vision_signals(enc.prepared, enc.encoded)["cls_attn"]
    sel = select_tokens(tiny_llava, enc.prepared, enc.encoded, "visionzip", 5)
    top = int(torch.argmax(cls_attn))
    assert top in sel.kept.tolist()
    assert sel.tokens is not None and sel.tokens.shape == (5, enc.encoded.features.shape[1])
    row = sel.kept.tolist().index(top)  # a dominant token is its own feature
    torch.testing.assert_close(sel.tokens[row], enc.encoded.features[top])
    merged = ~torch.isclose(sel.tokens, enc.encoded.features[sel.kept]).all(dim=1)
    assert merged.any()  # the contextual (merged) tokens are what the LLM gets
    res = run_method(tiny_llava, enc, "visionzip", 5, max_new_tokens=2)
    assert top in res.kept_indices and res.scores is not None


# ------------------------------------------------------------------------------ FastV / SparseVLM


def _llm_inputs(adapter, enc):
    inputs = adapter.build_inputs(enc.prepared, enc.encoded, torch.arange(enc.n))
    visual = adapter.visual_positions(enc.prepared, enc.encoded)
    return inputs, visual


def _eager_attentions(adapter, inputs):
    lm = language_model(_eager(adapter))
    pos = inputs.position_ids
    with torch.no_grad():
        return lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                  position_ids=pos, output_attentions=True).attentions


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen", "tiny_llava_next"])
def test_fastv_keeps_topk_of_eager_last_token_attention_and_answers_like_llm_loop(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    keep, K = 5, 1  # the tiny LLMs have 2 layers: prune before layer 1, scored on layer 0
    res = run_method(adapter, enc, "fastv", keep, options={"K": K}, max_new_tokens=4)
    inputs, visual = _llm_inputs(adapter, enc)
    att = _eager_attentions(adapter, inputs)[K - 1][0]  # [H, L, L]
    score = att[:, -1, visual].mean(0)
    ref = torch.sort(torch.sort(score, descending=True, stable=True).indices[:keep]).values
    assert res.kept_indices == ref.tolist()
    assert res.llm_stages == [{"layer": K, "scored_layer": K - 1, "before": enc.n, "kept": keep}]
    loop = generate_pruned(adapter.model, inputs.inputs_embeds, visual, [fastv_stage(keep, K)],
                           attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                           max_new_tokens=4)
    ids = loop.tokens.tolist()
    assert [s.kept.tolist() for s in loop.stages] == [res.kept_indices]
    eos = adapter.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = ids[:next((i for i, t in enumerate(ids) if t in eos), len(ids))]
    assert res.answer == adapter.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_fastv_default_K_is_clamped_on_a_shallow_llm(tiny_llava, image):
    res = run_one(tiny_llava, image, Q, "fastv", 4, max_new_tokens=1)
    assert [s["layer"] for s in res.llm_stages] == [1]  # K=2 does not fit 2 layers


def test_sparsevlm_keeps_topk_of_eager_rater_attention(tiny_llava, image):
    enc = encode_image(tiny_llava, image, Q)
    keep = 8
    res = run_method(tiny_llava, enc, "sparsevlm", keep, max_new_tokens=2)
    inputs, visual = _llm_inputs(tiny_llava, enc)
    ids = enc.prepared.inputs["input_ids"][0]
    after = torch.arange(ids.numel())[torch.arange(ids.numel()) > visual.max()]
    emb = inputs.inputs_embeds[0]
    raters = after[sparsevlm_raters(emb[visual], emb[after])]
    att = _eager_attentions(tiny_llava, inputs)[0][0]  # layer 0: [H, L, L]
    score = att[:, raters][:, :, visual].mean(dim=(0, 1))
    n_keep = res.llm_stages[-1]["kept"]
    assert n_keep <= keep
    ref = torch.sort(torch.sort(score, descending=True, stable=True).indices[:n_keep]).values
    assert res.kept_indices == ref.tolist()


# ------------------------------------------------------------------------------------ ZSPAPrune


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen"])
def test_zspaprune_keeps_most_relevant_token_for_both_prompt_scopes(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    feats = enc.encoded.features.float()
    kept, rel = {}, {}
    for scope in ("question", "all_text"):
        prompt = prompt_embeddings(adapter, enc.prepared, scope).float()
        r = torch.nn.functional.normalize(feats, dim=-1) @ torch.nn.functional.normalize(prompt.mean(0), dim=0)
        res = run_method(adapter, enc, "zspaprune", 4, options={"prompt_scope": scope}, max_new_tokens=1)
        assert int(torch.argmax(r)) in res.kept_indices
        torch.testing.assert_close(torch.tensor(res.scores), r, rtol=1e-4, atol=1e-5)
        kept[scope], rel[scope] = res.kept_indices, r
    q = prompt_embeddings(adapter, enc.prepared, "question")
    a = prompt_embeddings(adapter, enc.prepared, "all_text")
    assert a.shape[0] > q.shape[0]  # the scopes really differ
    assert not torch.allclose(rel["question"], rel["all_text"])


# ------------------------------------------------------------------------------------------ CLI


def test_methods_lists_stage_and_families():
    rows = {r["name"]: r for r in json.loads(_run("methods", "--json").stdout)}
    assert rows["visionzip"]["families"] == ["llava", "llava_next"]
    assert rows["fastv"]["stage"] == rows["sparsevlm"]["stage"] == "in_llm"
    assert rows["zspaprune"]["stage"] == "pre_llm"
    assert {"fastv", "sparsevlm", "zspaprune"} <= {n for n, r in rows.items() if "qwen2_5_vl" in r["families"]}


@pytest.mark.usefixtures("offline_models")
def test_ask_visionzip_on_qwen_is_a_one_line_usage_error():
    res = _run("ask", CUP, Q, "--model", "tiny-qwen2.5-vl", "--method", "visionzip", code=2)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "visionzip" in err and "Traceback" not in res.stdout + err


@pytest.mark.usefixtures("offline_models")
def test_ask_fastv_with_option_notes_selection_inside_prefill():
    out = _run("ask", CUP, Q, "--model", "tiny-llava", "--method", "fastv:K=1", "--keep", "5",
               "--max-new-tokens", "2").stdout
    assert "inside the LLM" in out and "█" in out
    d = json.loads(_run("ask", CUP, Q, "--model", "tiny-llava", "--method", "fastv", "--keep", "5",
                        "--max-new-tokens", "2", "--json").stdout)
    assert d["stage"] == "in_llm" and len(d["kept_indices"]) == 5 and d["llm_stages"][0]["layer"] == 1


@pytest.mark.usefixtures("offline_models")
def test_compare_and_bench_mark_in_llm_methods():
    methods = "visionzip,fastv,sparsevlm,zspaprune"
    d = json.loads(_run("compare", CUP, Q, "--model", "tiny-llava-next", "--methods", methods,
                        "--keep", "10", "--max-new-tokens", "2", "--json").stdout)
    stages = {r["method"]: r["stage"] for r in d["rows"]}
    assert stages == {"none": "pre_llm", "visionzip": "pre_llm", "fastv": "in_llm",
                      "sparsevlm": "in_llm", "zspaprune": "pre_llm"}
    assert all(r["kept"] <= 10 for r in d["rows"][1:])
    out = _run("compare", CUP, Q, "--model", "tiny-llava", "--methods", "fastv", "--keep", "5",
               "--max-new-tokens", "2").stdout
    assert "fastv*" in out and "inside the" in out
    bench = ["bench", "--model", "tiny-llava", "--budgets", "6", "--methods", "fastv,sparsevlm,visionzip",
             "--images", CUP, "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2"]
    rows = json.loads(_run(*bench, "--json").stdout)
    assert [(r["method"], r["stage"]) for r in rows] == [
        ("none", "pre_llm"), ("fastv", "in_llm"), ("sparsevlm", "in_llm"), ("visionzip", "pre_llm")]
    out = _run(*bench).stdout
    assert "fastv*" in out and "inside the" in out
