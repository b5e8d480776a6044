"""The pipeline on the tiny models: budgets per crop, selection merging, keep-all equals stock."""

from __future__ import annotations

import pytest
import torch

from zoocli.pipeline import encode_image, run_method, run_one, select_tokens


@pytest.mark.parametrize("keep", [1, 7, 10, 33])
def test_llava_next_per_crop_budgets_add_up(tiny_llava_next, rand_image, keep):
    enc = encode_image(tiny_llava_next, rand_image(90, 40), "q?")
    assert len(enc.encoded.scopes) > 2
    sel = select_tokens(tiny_llava_next, enc.prepared, enc.encoded, "divprune", keep)
    assert sum(sel.per_scope) == min(keep, enc.n) == len(sel.kept)
    for scope, q in zip(enc.encoded.scopes, sel.per_scope):
        inside = torch.isin(sel.kept.cpu(), scope.index.cpu()).sum().item()
        assert inside == q
    glob = select_tokens(tiny_llava_next, enc.prepared, enc.encoded, "divprune", keep, scope="global")
    assert len(glob.kept) == min(keep, enc.n)


def test_newlines_are_kept_on_top_of_the_budget(tiny_llava_next, rand_image):
    enc = encode_image(tiny_llava_next, rand_image(90, 40), "q?")
    res = run_method(tiny_llava_next, enc, "zoo", 6, options={"m": 8, "estimator": "fd"}, max_new_tokens=2)
    newlines = enc.encoded.n_llm_visual - enc.n
    assert newlines > 0
    assert res.n_llm_visual_kept == 6 + newlines


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next", "tiny_qwen"])
def test_method_none_equals_stock_generate(fixture, request, rand_image):
    adapter = request.getfixturevalue(fixture)
    img = rand_image(64, 48, seed=3)
    res = run_one(adapter, img, "What is it?", "none", "100%", max_new_tokens=6)
    prepared = adapter.prepare(img, "What is it?")
    with torch.no_grad():
        out = adapter.model.generate(**prepared.inputs, do_sample=False, max_new_tokens=6,
                                     repetition_penalty=None, temperature=None, top_p=None,
                                     top_k=None)
    stock = out[0, prepared.inputs["input_ids"].shape[1]:].tolist()
    eos = adapter.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(stock):
        if t in eos:
            stock = stock[:i]
            break
    text = adapter.processor.tokenizer.decode(stock, skip_special_tokens=True)
    assert res.answer == text.strip()  # zoo strips surrounding whitespace from answers
    assert len(res.kept_indices) == res.n_visual_tokens


def test_zoo_same_seed_same_picks_other_seed_differs(tiny_llava, rand_image):
    enc = encode_image(tiny_llava, rand_image(64, 64, seed=1), "q?")
    a = select_tokens(tiny_llava, enc.prepared, enc.encoded, "zoo", 5, seed=0, options={"m": 4, "estimator": "fd"})
    b = select_tokens(tiny_llava, enc.prepared, enc.encoded, "zoo", 5, seed=0, options={"m": 4, "estimator": "fd"})
    c = select_tokens(tiny_llava, enc.prepared, enc.encoded, "zoo", 5, seed=1, options={"m": 4, "estimator": "fd"})
    assert torch.equal(a.kept, b.kept)
    assert not torch.equal(a.scores, c.scores)
