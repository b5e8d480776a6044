"""Every command, every method (pre-LLM and in-LLM), ``zoo eval``, ``zoo bench`` and the lmms-eval
backend on the Qwen3-VL and LLaVA-OneVision offline models (issue 19)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run, run_json

from zoocli.methods import FAMILIES, METHODS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline_models", "one_thread")]
IMAGES = Path(__file__).resolve().parent.parent / "sample_images"
CUP = IMAGES / "coffee_cup.jpg"
MODELS = ["tiny-qwen3-vl", "tiny-llava-onevision", "tiny-qwen3-vl-moe"]


def test_families_are_known_and_listed():
    assert {"qwen3_vl", "qwen3_vl_moe", "llava_onevision"} <= FAMILIES
    out = run("models").stdout
    for name in MODELS + ["qwen3-vl", "qwen3-vl-2b", "llava-onevision"]:
        assert name in out


FAMILY = {"tiny-qwen3-vl": "qwen3_vl", "tiny-llava-onevision": "llava_onevision", "tiny-qwen3-vl-moe": "qwen3_vl_moe"}


def _fails(args):
    from typer.testing import CliRunner

    from zoocli.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code != 0
    return res


@pytest.mark.parametrize("model", MODELS)
def test_every_method_answers_or_refuses_in_one_line(model):
    for m in METHODS.values():
        args = ["ask", CUP, "What is it?", "--model", model, "--method", m.name, "--keep", "8",
                "--max-new-tokens", "2", "--no-warmup"]
        if FAMILY[model] not in m.families:  # VisionZip: no CLS attention in these towers
            one_line_error(_fails(args), "does not support", FAMILY[model])
            continue
        doc = run_json(*args)
        assert doc["method"] == m.name and doc["family"] == FAMILY[model]
        assert doc["answer"] is not None
        n, total = len(doc["kept_indices"]), doc["n_visual_tokens"]
        if m.name == "none":
            assert n == total
        elif m.stage == "in_llm":  # SparseVLM's schedule may end below the budget on a 2-4 layer LLM
            assert 1 <= n <= 8
        else:
            assert n == min(8, total)


@pytest.mark.parametrize("model", MODELS)
def test_score_compare_bench_eval(model, tmp_path):
    assert run_json("score", CUP, "What is it?", "--model", model)
    assert run_json("compare", CUP, "What is it?", "--model", model, "--methods", "zoo,fastv,divprune",
                    "--keep", "8", "--max-new-tokens", "2")
    bench = run_json("bench", "--model", model, "--budgets", "8", "--methods", "zoo,fastv", "--images", CUP,
                     "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2")
    assert bench
    data = tmp_path / "q.jsonl"
    data.write_text("".join(
        json.dumps({"id": f"q{i}", "image": img, "question": q, "answer": "yes"}) + "\n"
        for i, (img, q) in enumerate([("coffee_cup.jpg", "Is there a cup?"), ("cat_chelsea.png", "Is it a cat?"),
                                       ("receipt_cord.jpg", "Is it a receipt?")])))
    ev = run_json("eval", data, "--image-root", IMAGES, "--model", model, "--methods", "zoo,sparsevlm",
                  "--budgets", "8", "--batch-size", "2", "--max-new-tokens", "2")
    assert ev


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")
@pytest.mark.parametrize("model", MODELS)
def test_lmms_eval_backend_equals_zoo_ask(model, zoo_model_cache):
    from lmms_eval.api.instance import Instance

    from zoocli.adapters import load_adapter
    from zoocli.images import load_image
    from zoocli.lmms_eval_model import ZooLMM
    from zoocli.pipeline import run_one

    lm = ZooLMM(pretrained=model, method="zoo", keep="8", batch_size=2, cache_dir=str(zoo_model_cache))
    images = [load_image(IMAGES / n) for n in ("coffee_cup.jpg", "cat_chelsea.png", "receipt_cord.jpg")]
    lm.task_dict = {"t": {"test": [{"visuals": [im]} for im in images]}}
    qs = ["What is it?", "How many cats?", "What is the total?"]
    reqs = [Instance("generate_until", (q, {"max_new_tokens": 3, "until": []}, lambda d: d["visuals"], i, "t", "test"),
                     i, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, q in enumerate(qs)]
    got = lm.generate_until(reqs)
    a = load_adapter(model, device="cpu", dtype="fp32", cache_dir=zoo_model_cache)
    want = [run_one(a, im, q, "zoo", "8", max_new_tokens=3).answer for im, q in zip(images, qs)]
    assert got == want
