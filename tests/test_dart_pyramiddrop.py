"""DART and PyramidDrop: the official arithmetic re-expressed here in float64 against zoo's fp32
implementation (random tensors, then a tiny random LLaVA through the prune loop, then every family
through the adapters), the budget rules, and the CLI / eval / lmms-eval surface."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlamaModel, LlavaConfig, LlavaForConditionalGeneration

from zoocli.adapters.decoder import decoder_of, language_model
from zoocli.errors import UsageError
from zoocli.methods import LLMView, get_method, parse_method_spec
from zoocli.methods.dart import dart_keep, dart_scorer, pick_scores
from zoocli.methods.pyramiddrop import (
    average_tokens,
    pdrop_counts,
    pdrop_layers,
    pdrop_schedule,
    pdrop_stages,
)
from zoocli.pipeline import encode_image, run_method
from zoocli.prune_loop import PruneStage, generate_pruned, last_token_scorer
from cli_helpers import run as _run

REPO = Path(__file__).resolve().parent.parent
CUP = str(REPO / "sample_images" / "coffee_cup.jpg")
Q = "What is in the cup?"


# ------------------------------------------------------------------ DART: the official arithmetic


def official_dart(keys, states, image_pos, text_pos, budget, p_img=4, p_txt=4) -> list[int]:
    """``get_retained_image_token`` (ZichenWen1/DART@5a19452) re-expressed in float64: ``keys`` [S, Dk]
    layer K-1 post-RoPE keys, ``states`` [S, D] the final-normed layer-K inputs, positions into the
    sequence; ``budget`` is ``max_num_trunction``. Returns the kept image positions, sorted."""
    keys, states = keys.double(), states.double()
    per_pivot = math.ceil(budget // (p_img + p_txt))
    img_l1 = keys[image_pos].abs().sum(-1)
    txt_l1 = keys[text_pos].abs().sum(-1)
    img_piv = [image_pos[i] for i in img_l1.topk(p_img).indices.tolist()]
    txt_piv = [text_pos[i] for i in txt_l1.topk(p_txt).indices.tolist()]
    kept = set(img_piv + txt_piv)
    free = set(image_pos) - set(img_piv)
    for pivot in list(kept):
        pool = list(free)
        sim = F.cosine_similarity(states[pivot], states[pool], dim=-1)
        taken = [pool[i] for i in (-sim).topk(per_pivot).indices.tolist()]
        kept.update(taken)
        free.difference_update(taken)
    return sorted(kept - set(txt_piv))


def _random_seq(seed, n_img=96, start=35, n_txt=20, dk=32, d=48):
    g = torch.Generator().manual_seed(seed)
    s = start + n_img + n_txt
    keys, states = torch.randn(s, dk, generator=g), torch.randn(s, d, generator=g)
    return keys, states, list(range(start, start + n_img)), list(range(start + n_img, s))


def _zoo_dart(keys, states, image_pos, text_pos, keep, p_img=4, p_txt=4) -> list[int]:
    picks = dart_keep(keys[image_pos].float(), keys[text_pos].float(), states[image_pos].float(),
                      states[text_pos].float(), keep, image_pos, text_pos, p_img, p_txt)
    assert picks.numel() == min(keep, len(image_pos)) == len(set(picks.tolist()))
    return sorted(image_pos[i] for i in picks.tolist())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget,p_img,p_txt", [(64, 4, 4), (32, 4, 4), (40, 2, 6), (24, 3, 0)])
def test_dart_kept_set_equals_official_float64_arithmetic(seed, budget, p_img, p_txt):
    """At keep = p_img + pivots * (budget // pivots) zoo's fp32 DART keeps exactly the official set."""
    keys, states, img, txt = _random_seq(seed, start=35 + seed)
    keep = p_img + (p_img + p_txt) * (budget // (p_img + p_txt))
    assert _zoo_dart(keys, states, img, txt, keep, p_img, p_txt) == official_dart(
        keys, states, img, txt, budget, p_img, p_txt)


def test_dart_visit_order_is_the_official_set_order():
    """The pivots' visit order changes the kept set (so the parity above is not vacuous): visiting
    them in ascending position instead of the official set order keeps a different set."""
    differs = 0
    for seed in range(6):
        keys, states, img, txt = _random_seq(seed)
        pivots = [img[i] for i in keys[img].abs().sum(-1).topk(4).indices.tolist()]
        pivots += [txt[i] for i in keys[txt].abs().sum(-1).topk(4).indices.tolist()]
        kept, free = set(pivots), set(img) - set(pivots[:4])
        for p in sorted(pivots):
            pool = sorted(free)
            sim = F.cosine_similarity(states[p].double(), states[pool].double(), dim=-1)
            taken = [pool[i] for i in (-sim).topk(8).indices.tolist()]
            kept.update(taken)
            free.difference_update(taken)
        differs += sorted(kept - set(pivots[4:])) != official_dart(keys, states, img, txt, 64)
    assert differs > 0


@pytest.mark.parametrize("keep", [1, 3, 4, 5, 11, 12, 13, 50, 95, 96, 200])
def test_dart_keeps_exactly_keep_with_the_image_pivots_first(keep):
    keys, states, img, txt = _random_seq(0)
    picks = dart_keep(keys[img], keys[txt], states[img], states[txt], keep, img, txt)
    assert picks.numel() == min(keep, 96) == len(set(picks.tolist()))
    norms = keys[img].abs().sum(-1)
    top = torch.sort(norms, descending=True, stable=True).indices
    p = min(4, keep)
    if keep < 96:
        assert picks[:p].tolist() == top[:p].tolist()  # the image pivots, by key L1 norm
    scores = pick_scores(picks, 96)
    assert set(torch.sort(scores, descending=True, stable=True).indices[:picks.numel()].tolist()) == set(picks.tolist())


def test_dart_pivot_drops_its_duplicates_first():
    """One image pivot, no text pivot, keep 3: the pivot (largest key norm) keeps the two tokens
    least similar to it; its exact duplicates and near duplicates go."""
    states = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2], [2.0, 0.0]])
    keys = torch.tensor([[5.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    picks = dart_keep(keys, keys[:0], states, states[:0], 3, list(range(6)), [], 1, 0)
    assert picks.tolist() == [0, 4, 3]


def test_dart_options_and_plan():
    assert parse_method_spec("dart:K=3:image_pivots=2:text_pivots=0") == (
        "dart", {"K": 3, "image_pivots": 2, "text_pivots": 0})
    for bad in ("dart:K=0", "dart:image_pivots=0", "dart:text_pivots=-1", "dart:K=abc", "dart:pivots=2"):
        with pytest.raises(UsageError):
            parse_method_spec(bad)
    view = LLMView(n_layers=32, visual=torch.arange(5, 25), text_after=torch.arange(25, 30),
                   layer0=torch.zeros(30, 4))
    (stage,) = get_method("dart").plan(view, 8)
    assert (stage.layer, stage.n_keep, stage.own_layer) == (2, 8, False)
    (stage,) = get_method("dart").plan(LLMView(2, view.visual, view.text_after, view.layer0), 99, K=5)
    assert (stage.layer, stage.n_keep) == (1, 20)  # K clamped to n_layers - 1, keep to N


# ----------------------------------------------------------- PyramidDrop: schedule and budget


def test_pdrop_official_default_and_the_authors_low_budget_example():
    lam, sched = pdrop_schedule(270, 576, 32)  # the official 8/16/24, lam = 0.5 averages 270 of 576
    assert sched == [(8, 288), (16, 144), (24, 72)] and abs(lam - 0.5) < 0.01
    lam, sched = pdrop_schedule(64, 576, 32)  # issue #29: layers 2/8/16, lam = 0.19 for 64 tokens
    assert [l for l, _ in sched] == [2, 8, 16] and abs(lam - 0.19) < 0.005
    assert pdrop_layers((8, 16, 24), 28) == [7, 14, 21] and pdrop_layers((8, 16, 24), 4) == [1, 2, 3]


def _reference_schedule(keep, n, n_layers):
    """Float64, by enumeration: the counts change only at lam = (c / n) ** (1 / s) (taken a hair
    above, past the rounding of the power); the schedule is the one at the largest such lam (or 0)
    whose layer-average is <= keep, for the first layout (8/16/24, then 2/8/16) whose all-ones
    schedule fits."""
    def avg(layers, counts):
        bounds = [*layers, n_layers]
        return (n * layers[0] + sum(c * (b - a) for c, a, b in zip(counts, layers, bounds[1:]))) / n_layers

    def counts(lam):
        return [max(1, int(n * lam ** s)) for s in (1, 2, 3)]

    layouts = [pdrop_layers(lay, n_layers) for lay in ((8, 16, 24), (2, 8, 16))]
    layers = next((ls for ls in layouts if avg(ls, [1, 1, 1]) <= keep), layouts[-1])
    cands = {min(1.0, (c / n) ** (1 / s) * (1 + 1e-12)) for c in range(1, n + 1) for s in (1, 2, 3)}
    cands = sorted(cands | {0.0, 1.0})
    best = max(lam for lam in cands if lam == 0.0 or avg(layers, counts(lam)) <= keep)
    return list(zip(layers, counts(best)))


@pytest.mark.parametrize("n,n_layers", [(576, 32), (144, 32), (2880, 32), (1000, 28), (576, 14)])
def test_pdrop_schedule_equals_float64_enumeration(n, n_layers):
    for keep in sorted({1, 5, n // 20, n // 16, n // 9, n // 6, n // 4, n // 4 + 1, n // 3, n // 2, n - 1, n}):
        lam, sched = pdrop_schedule(keep, n, n_layers)
        assert sched == _reference_schedule(keep, n, n_layers), keep
        layers, counts = [l for l, _ in sched], [c for _, c in sched]
        if lam > 0:
            assert average_tokens(n, layers, counts, n_layers) <= keep
        assert counts == sorted(counts, reverse=True) and all(1 <= c <= n for c in counts)


def test_pdrop_shallow_llm_runs_the_last_stage_counts():
    deep = [c for _, c in pdrop_schedule(36, 144)[1]]
    assert [(s.layer, s.n_keep, s.own_layer) for s in pdrop_stages(36, 144, 2)] == [(1, deep[-1], True)]
    assert [(s.layer, s.n_keep) for s in pdrop_stages(36, 144, 3)] == [(1, deep[1]), (2, deep[2])]
    assert all(s.scorer is last_token_scorer for s in pdrop_stages(36, 144, 32))
    with pytest.raises(UsageError, match="at least 2 LLM layers"):
        pdrop_stages(36, 144, 1)
    assert pdrop_counts(576, 0.5) == [288, 144, 72]


# ---------------------------------------------------- a tiny random LLaVA through the prune loop

N_LAYERS, VOCAB, VIS, LENGTH = 4, 96, torch.arange(4, 32), 40  # 28 visual tokens, 8 text after


@pytest.fixture(scope="module")
def llava():
    def build(attn):
        torch.manual_seed(0)
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14),
            text_config=LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=256, eos_token_id=VOCAB - 1),
            image_token_id=VOCAB - 2)
        cfg.text_config._attn_implementation = cfg._attn_implementation = attn
        model = LlavaForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            for p in model.model.language_model.parameters():
                if p.ndim == 2:
                    p.mul_(4.0)
        return model

    sdpa, eager = build("sdpa"), build("eager")
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


def _emb(seed=1):
    return torch.randn(1, LENGTH, 64, generator=torch.Generator().manual_seed(seed))


def _stock_keys_states(model, emb, k_layer):
    """Layer K-1's cached (post-RoPE) keys [S, Hkv*hd] and the final-normed layer-K input [S, D],
    from one stock forward."""
    lm = language_model(model)
    with torch.no_grad():
        out = lm(inputs_embeds=emb, use_cache=True, output_hidden_states=True)
        k = out.past_key_values.layers[k_layer - 1].keys[0]  # [Hkv, S, hd]
        return k.transpose(0, 1).reshape(emb.shape[1], -1), lm.norm(out.hidden_states[k_layer])[0]


def test_decoder_keys_equal_the_stock_kv_cache(llava):
    model, _ = llava
    emb = _emb()
    dec = decoder_of(model)
    lm = language_model(model)
    pos = torch.arange(LENGTH)[None]
    with torch.no_grad():
        out = lm(inputs_embeds=emb, use_cache=True, output_hidden_states=True)
        for i in range(N_LAYERS):
            h = out.hidden_states[i]
            got = dec.keys(i, h, dec.rotary(h, pos))
            want = out.past_key_values.layers[i].keys[0].transpose(0, 1).reshape(LENGTH, -1)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dart_in_the_loop_keeps_the_official_set_of_stock_keys_and_states(llava, seed):
    model, _ = llava
    emb = _emb(seed)
    text = torch.arange(32, LENGTH)
    k_layer, p_img, p_txt, budget = 2, 4, 4, 16
    keep = p_img + (p_img + p_txt) * (budget // (p_img + p_txt))  # 20 of 28
    stage = PruneStage(k_layer, keep, dart_scorer(keep, text, p_img, p_txt))
    res = generate_pruned(model, emb, VIS, [stage], max_new_tokens=1)
    (rec,) = res.stages
    keys, states = _stock_keys_states(model, emb, k_layer)
    want = official_dart(keys, states, VIS.tolist(), text.tolist(), budget, p_img, p_txt)
    assert (VIS[rec.kept]).tolist() == want
    assert rec.scored_layer == k_layer - 1


def _tail(lm, start, h, pos):
    """Stock eager layers ``start``.. of ``lm`` on hidden states ``h`` at positions ``pos``."""
    cfg = LlamaConfig(**{**lm.config.to_dict(), "num_hidden_layers": N_LAYERS - start})
    cfg._attn_implementation = "eager"
    tail = LlamaModel(cfg).eval()
    for j in range(N_LAYERS - start):
        tail.layers[j].load_state_dict(lm.layers[start + j].state_dict())
    tail.norm.load_state_dict(lm.norm.state_dict())
    with torch.no_grad():
        return tail(inputs_embeds=h, attention_mask=torch.ones(1, h.shape[1], dtype=torch.long),
                    position_ids=pos[None], use_cache=False, output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("seed", [1, 2])
def test_pyramiddrop_stages_rank_on_their_own_layer_like_the_official_rank_drop(llava, seed):
    """Each stage: the last token's attention in the stage layer's own (stock eager) attention over
    its input, mean over heads, top-n of the visual tokens still present (``pdrop_rank_drop``,
    at the original positions zoo keeps)."""
    model, _ = llava
    lm = language_model(model)
    emb = _emb(seed)
    plan = [(1, 16), (2, 9), (3, 4)]
    res = generate_pruned(model, emb, VIS, [PruneStage(l, n, last_token_scorer, own_layer=True) for l, n in plan],
                          max_new_tokens=1)
    rows, h, start = torch.arange(LENGTH), emb, 0
    for (layer, n), rec in zip(plan, res.stages):
        out = _tail(lm, start, h, rows)
        att = out.attentions[layer - start][0]  # [H, s, s]: the stage layer on its input
        vis_rows = torch.isin(rows, VIS).nonzero().squeeze(1)
        score = att[:, -1, vis_rows].mean(0)
        top = torch.sort(score, descending=True, stable=True).indices[:n]
        kept_pos = torch.sort(rows[vis_rows[top]]).values
        assert VIS[rec.kept].tolist() == kept_pos.tolist() and rec.scored_layer == layer
        keep_rows = torch.sort(torch.cat([(~torch.isin(rows, VIS)).nonzero().squeeze(1), vis_rows[top]])).values
        h, rows, start = out.hidden_states[layer - start][:, keep_rows], rows[keep_rows], layer
    out = _tail(lm, start, h, rows)
    torch.testing.assert_close(res.prefill_logits, model.lm_head(out.last_hidden_state)[0, -1].float(),
                               rtol=0, atol=1e-4)


# ------------------------------------------------------------ every family through the adapters

FAMILIES = ["tiny_llava", "tiny_llava_next", "tiny_qwen"]


@pytest.fixture(scope="module")
def image():
    from zoocli.images import load_image

    return load_image(CUP)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_dart_end_to_end_keeps_the_official_set(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    p_img, p_txt = 2, 2
    keep = p_img + (p_img + p_txt) * 2  # the tiny LLMs have 2 layers: K clamps to 1
    assert keep < enc.n
    res = run_method(adapter, enc, "dart", keep, options={"image_pivots": p_img, "text_pivots": p_txt},
                     max_new_tokens=2)
    inputs = adapter.build_inputs(enc.prepared, enc.encoded, torch.arange(enc.n))
    visual = adapter.visual_positions(enc.prepared, enc.encoded)
    ids = enc.prepared.inputs["input_ids"][0]
    text = (torch.arange(ids.numel()) > int((ids == adapter.image_token_id).nonzero().max())).nonzero().squeeze(1)
    lm = language_model(adapter.model)
    with torch.no_grad():
        out = lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                 position_ids=inputs.position_ids, use_cache=True, output_hidden_states=True)
    k = out.past_key_values.layers[0].keys[0]
    keys = k.transpose(0, 1).reshape(k.shape[1], -1)
    states = lm.norm(out.hidden_states[1])[0]
    want = official_dart(keys, states, visual.tolist(), text.tolist(), keep - p_img, p_img, p_txt)
    assert visual[torch.tensor(res.kept_indices)].tolist() == want
    seen = {}  # what the loop hands the scorer: the stock cache's keys, the stock normed states

    def capture(ctx):
        seen["keys"], seen["states"] = ctx.keys(), ctx.final_norm(ctx.state)
        return last_token_scorer(ctx)

    generate_pruned(adapter.model, inputs.inputs_embeds, visual, [PruneStage(1, keep, capture)],
                    attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, max_new_tokens=1)
    torch.testing.assert_close(seen["keys"], keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["states"], states, rtol=0, atol=1e-5)
    assert res.stage == "in_llm" and res.llm_stages == [{"layer": 1, "scored_layer": 0, "before": enc.n,
                                                         "kept": keep}]
    assert res.n_llm_visual_kept == res.n_llm_visual_full - enc.n + keep


@pytest.mark.parametrize("fixture", FAMILIES)
def test_pyramiddrop_end_to_end_ranks_on_the_stock_eager_attention(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    keep = enc.n // 2
    res = run_method(adapter, enc, "pyramiddrop", keep, max_new_tokens=2)
    (stage,) = pdrop_stages(keep, enc.n, 2)
    inputs = adapter.build_inputs(enc.prepared, enc.encoded, torch.arange(enc.n))
    visual = adapter.visual_positions(enc.prepared, enc.encoded)
    import copy

    eager = copy.deepcopy(adapter.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = language_model(eager)(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                    position_ids=inputs.position_ids, output_attentions=True).attentions[1][0]
    score = att[:, -1, visual].mean(0)
    want = torch.sort(torch.sort(score, descending=True, stable=True).indices[:stage.n_keep]).values
    assert res.kept_indices == want.tolist()
    assert res.llm_stages == [{"layer": 1, "scored_layer": 1, "before": enc.n, "kept": stage.n_keep}]


# ------------------------------------------------------------------------------------ the CLI


def test_methods_lists_dart_and_pyramiddrop_with_paper_and_deviation():
    rows = {r["name"]: r for r in json.loads(_run("methods", "--json").stdout)}
    for name, paper in (("dart", "arXiv:2502.11494"), ("pyramiddrop", "arXiv:2410.17247")):
        assert rows[name]["stage"] == "in_llm" and paper in rows[name]["paper"]
        assert rows[name]["deviation"] and set(rows[name]["families"]) >= {"llava", "llava_next", "qwen2_5_vl"}


@pytest.mark.usefixtures("offline_models")
def test_compare_bench_and_eval_run_dart_and_pyramiddrop(tmp_path):
    d = json.loads(_run("compare", CUP, Q, "--model", "tiny-llava-next", "--methods", "dart,pyramiddrop",
                        "--keep", "10", "--max-new-tokens", "2", "--json").stdout)
    rows = {r["method"]: r for r in d["rows"]}
    assert rows["dart"]["stage"] == rows["pyramiddrop"]["stage"] == "in_llm"
    assert rows["dart"]["kept"] == 10 and 1 <= rows["pyramiddrop"]["kept"] <= 10
    bench = json.loads(_run("bench", "--model", "tiny-qwen2.5-vl", "--budgets", "6", "--methods",
                            "dart:K=1,pyramiddrop", "--images", CUP, "--repeats", "1", "--warmup", "0",
                            "--max-new-tokens", "2", "--json").stdout)
    assert [(r["method"], r["stage"]) for r in bench] == [
        ("none", "pre_llm"), ("dart:K=1", "in_llm"), ("pyramiddrop", "in_llm")]
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "a", "image": "coffee_cup.jpg", "question": Q, "answer": "tea"}) + "\n")
    out = tmp_path / "run.jsonl"
    _run("eval", data, "--image-root", REPO / "sample_images", "--model", "tiny-llava", "--methods",
         "dart,pyramiddrop", "--budgets", "6", "--max-new-tokens", "2", "--out", out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    kept = {r["method"]: r["kept_tokens"] for r in recs}
    assert set(kept) == {"none", "dart", "pyramiddrop"} and kept["dart"] == 6


@pytest.mark.slow
def test_lmms_eval_backend_answers_like_zoo_ask(tiny_llava, zoo_model_cache):
    pytest.importorskip("lmms_eval")
    from test_lmms_eval import ask, make_lm, request

    from zoocli.evaluation import SAMPLE_EVAL, load_samples
    from zoocli.images import load_image

    samples = load_samples(SAMPLE_EVAL)[:2]
    images = [load_image(REPO / "sample_images" / s.image) for s in samples]
    for method in ("dart", "pyramiddrop"):
        lm = make_lm(zoo_model_cache, method=method, keep="50%", batch_size=2)
        lm.task_dict = {"t": {"test": [{"visuals": [im]} for im in images]}}
        reqs = [request(i, s.question, {"max_new_tokens": 3, "until": []}, i) for i, s in enumerate(samples)]
        got = lm.generate_until(reqs)
        assert got == [ask(tiny_llava, s, method, "50%", max_new_tokens=3) for s in samples]
