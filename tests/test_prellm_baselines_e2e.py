"""VisPruner, CDPruner, downsample and norm end to end through the adapters on the offline tiny
models (CPU): the kept sets equal the method run on the adapters' signals, each family they serve
answers within the budget, the one they cannot serve is refused in one line, and the CLI surface
(compare / bench / eval / score / lmms-eval) takes them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from zoocli.methods.cdpruner import cdpruner_select
from zoocli.methods.downsample import pool_plan
from zoocli.methods.mmtok import coverage_matrix, max_coverage_greedy, question_keywords
from zoocli.methods.vispruner import vispruner_select
from zoocli.methods.zoo import zoo_select
from zoocli.pipeline import encode_image, prompt_embeddings, run_method, run_one, select_tokens, split_budget
from cli_helpers import one_line_error, run as _run

REPO = Path(__file__).resolve().parent.parent
CUP = str(REPO / "sample_images" / "coffee_cup.jpg")
Q = "What is in the cup?"
NEW = ["norm", "vispruner", "cdpruner", "downsample", "mmtok"]
SUPPORT = {"tiny_llava": NEW, "tiny_llava_next": NEW, "tiny_qwen": ["norm", "cdpruner", "downsample", "mmtok"]}
CASES = [(m, meth) for m, meths in SUPPORT.items() for meth in meths]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image():
    from zoocli.images import load_image

    return load_image(CUP)


@pytest.mark.parametrize("fixture,method", CASES)
def test_each_new_method_answers_within_budget(request, image, fixture, method):
    adapter = request.getfixturevalue(fixture)
    keep = 7
    res = run_one(adapter, image, Q, method, keep, max_new_tokens=2)
    kept = res.kept_indices
    assert len(kept) == keep and kept == sorted(set(kept)) and kept[-1] < res.n_visual_tokens
    shown = {i for s in res.scopes for i, k in zip(s["index"], s["kept"]) if k}
    assert shown == set(kept)
    assert res.n_llm_visual_kept == res.n_llm_visual_full - res.n_visual_tokens + keep
    assert res.new_tokens >= 1


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_vispruner_kept_set_is_the_method_on_the_adapters_cls_attention(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    sig = adapter.vision_signals(enc.prepared, enc.encoded)
    keep = 9
    sel = select_tokens(adapter, enc.prepared, enc.encoded, "vispruner", keep)
    want = []
    for s, q in zip(enc.encoded.scopes, split_budget(keep, [len(s.index) for s in enc.encoded.scopes])):
        if q:
            local = vispruner_select(sig["cls_attn"][s.index], enc.encoded.vision[s.index], q)
            want += s.index[local].tolist()
    assert sel.kept.tolist() == sorted(want)
    assert sel.tokens is None  # VisPruner feeds the kept tokens unchanged


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen"])
def test_cdpruner_kept_set_uses_the_question_embeddings(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    keep = 6
    res = run_method(adapter, enc, "cdpruner", keep, max_new_tokens=1)
    text = prompt_embeddings(adapter, enc.prepared, "question")
    idx, rel = cdpruner_select(enc.encoded.features, text, keep)
    assert res.kept_indices == sorted(idx.tolist())
    torch.testing.assert_close(torch.tensor(res.scores), rel.cpu())
    other = run_one(adapter, image, "Describe the whole picture in detail, please.", "cdpruner", keep,
                    max_new_tokens=1)
    assert other.scores != res.scores  # the relevance follows the instruction


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen", "tiny_llava_next"])
def test_downsample_feeds_pooled_projected_tokens_at_bin_centres(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    keep = 8
    sel = select_tokens(adapter, enc.prepared, enc.encoded, "downsample", keep)
    assert sel.kept.numel() == keep and sel.tokens is not None
    scope = max(enc.encoded.scopes, key=lambda s: len(s.index))  # check the biggest scope's bins
    quota = split_budget(keep, [len(s.index) for s in enc.encoded.scopes])[enc.encoded.scopes.index(scope)]
    cells = scope.cells.cpu()
    r0, c0 = (int(v) for v in cells.min(0).values)
    rows, cols = (int(v) + 1 for v in cells.max(0).values - cells.min(0).values)
    at = {(int(r) - r0, int(c) - c0): int(i) for (r, c), i in zip(cells.tolist(), scope.index.tolist())}
    x = enc.encoded.vision.float()
    for b0, b1, d0, d1 in pool_plan(rows, cols, quota):
        members = [at[(r, c)] for r in range(b0, b1) for c in range(d0, d1)]
        centre = at[((b0 + b1 - 1) // 2, (d0 + d1 - 1) // 2)]
        row = sel.kept.tolist().index(centre)
        with torch.no_grad():
            want = adapter.projector(x[members].mean(0, keepdim=True).to(adapter.dtype))[0]
        torch.testing.assert_close(sel.tokens[row], want.to(sel.tokens.dtype), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen"])
def test_mmtok_kept_set_covers_the_question_keywords(request, image, fixture):
    adapter = request.getfixturevalue(fixture)
    enc = encode_image(adapter, image, Q)
    keep = 6
    res = run_method(adapter, enc, "mmtok", keep, max_new_tokens=1)
    kw = prompt_embeddings(adapter, enc.prepared, "keywords")
    ids = adapter.processor.tokenizer(question_keywords(Q), add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(kw, adapter.embed_ids(torch.tensor(ids)))
    assert kw.shape[0] < prompt_embeddings(adapter, enc.prepared, "question").shape[0]  # stop words gone
    cover = coverage_matrix(enc.encoded.features, enc.encoded.vision, kw)
    assert res.kept_indices == sorted(max_coverage_greedy(cover, keep).tolist())


def test_norm_kept_set_is_zoo_greedy_on_feature_norms(tiny_qwen, image):
    enc = encode_image(tiny_qwen, image, Q)
    res = run_method(tiny_qwen, enc, "norm", 5, max_new_tokens=1)
    z = enc.encoded.features
    assert res.kept_indices == sorted(zoo_select(z.float().norm(dim=-1), z, 5).tolist())


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.usefixtures("offline_models")
def test_vispruner_on_qwen_and_downsample_global_are_one_line_usage_errors():
    res = _run("ask", CUP, Q, "--model", "tiny-qwen2.5-vl", "--method", "vispruner", code=2)
    one_line_error(res, "vispruner", "qwen2_5_vl")
    res = _run("ask", CUP, Q, "--model", "tiny-llava-next", "--method", "downsample", "--budget-scope",
               "global", "--keep", "10", code=2)
    one_line_error(res, "downsample", "budget-scope")


@pytest.mark.usefixtures("offline_models")
def test_methods_compare_bench_and_score_take_the_new_methods():
    rows = {r["name"]: r for r in json.loads(_run("methods", "--json").stdout)}
    assert rows["vispruner"]["families"] == ["llava", "llava_next"]
    for name in NEW:
        assert rows[name]["stage"] == "pre_llm" and rows[name]["deviation"]
    d = json.loads(_run("compare", CUP, Q, "--model", "tiny-llava-next", "--methods", ",".join(["zoo"] + NEW),
                        "--keep", "10", "--max-new-tokens", "2", "--json").stdout)
    assert [r["method"] for r in d["rows"]] == ["none", "zoo"] + NEW
    assert all(r["kept"] == 10 for r in d["rows"][1:])
    bench = json.loads(_run("bench", "--model", "tiny-qwen2.5-vl", "--budgets", "6", "--methods",
                            "norm,cdpruner,downsample,mmtok", "--images", CUP, "--repeats", "1", "--warmup", "0",
                            "--max-new-tokens", "2", "--json").stdout)
    assert [r["method"] for r in bench] == ["none", "norm", "cdpruner", "downsample", "mmtok"]
    assert all(r["kept_tokens"] == 6 for r in bench[1:])
    s = json.loads(_run("score", CUP, Q, "--model", "tiny-llava", "--json").stdout)
    sens = torch.tensor([t["sensitivity"] for t in s["tokens"]])
    from zoocli.ops import spearman

    assert s["spearman_sensitivity_vs_norm"] == pytest.approx(spearman(sens, torch.tensor(s["norms"])))
    assert "Spearman(sensitivity, post-projector L2 norm)" in _run("score", CUP, Q, "--model", "tiny-llava").stdout


@pytest.mark.usefixtures("offline_models")
def test_eval_runs_the_new_methods(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "a", "image": "coffee_cup.jpg", "question": Q, "answer": "coffee"}) + "\n")
    out = tmp_path / "out.jsonl"
    _run("eval", data, "--image-root", REPO / "sample_images", "--model", "tiny-llava", "--methods",
         ",".join(NEW), "--budgets", "6", "--max-new-tokens", "2", "--out", out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["method"] for r in recs) == sorted(["none"] + NEW)


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")
def test_lmms_eval_backend_answers_like_zoo_ask(tiny_llava, zoo_model_cache, image):
    from lmms_eval.api.instance import Instance

    from zoocli.lmms_eval_model import ZooLMM

    for method in ("cdpruner", "downsample"):
        lm = ZooLMM(pretrained="tiny-llava", method=method, keep=6, batch_size=1, cache_dir=str(zoo_model_cache))
        lm.task_dict = {"t": {"test": [{"visuals": [image]}]}}
        req = Instance("generate_until", (Q, {"max_new_tokens": 3, "until": []}, lambda doc: doc["visuals"], 0,
                                          "t", "test"), 0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
        got = lm.generate_until([req])
        assert got == [run_one(tiny_llava, image, Q, method, 6, max_new_tokens=3).answer]
