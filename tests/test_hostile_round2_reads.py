"""Issue 25: what zoo reads from a checkpoint or cache is checked first, work is bounded, and
decoding is pure greedy whatever the checkpoint's generation_config.json says.

The hostile checkpoints are copies of the offline tiny models with one file changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import STOCK_GREEDY, make_image

from zoocli.adapters import ensure_offline_model, load_adapter
from zoocli.errors import ZooError

Q = "What is in the picture?"
FAMILIES = ["tiny-llava", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llava-onevision"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("r2-cache")
    return lambda name: ensure_offline_model(name, cache)


def _copy(built, name, tmp_path):
    d = tmp_path / name
    shutil.copytree(built(name), d)
    return d


def _answer(adapter, n=8):
    p = adapter.prepare(make_image(64, 48, seed=3), Q)
    e = adapter.encode(p)
    return adapter.generate(adapter.build_inputs(p, e, torch.arange(e.features.shape[0])), n).ids, p


def _hostile_generation_config(d, answer_ids):
    """num_beams=4, repetition_penalty=2.0, bad_words_ids (the greedy answer's first token), an
    n-gram block, a minimum length and sampling settings, next to the checkpoint's token ids."""
    gc_path = d / "generation_config.json"
    gc = json.loads(gc_path.read_text()) if gc_path.is_file() else {}
    gc.update(num_beams=4, repetition_penalty=2.0, bad_words_ids=[[answer_ids[0]]], no_repeat_ngram_size=1,
              min_new_tokens=5, length_penalty=-3.0, temperature=0.3, top_k=3, top_p=0.5,
              suppress_tokens=[answer_ids[-1]])
    gc_path.write_text(json.dumps(gc))


# ----------------------------------------------------------------------------- pure greedy

@pytest.mark.parametrize("name", FAMILIES)
def test_hostile_generation_config_does_not_change_the_answer(built, tmp_path, name):
    from transformers import GenerationConfig

    clean = load_adapter(str(built(name)), device="cpu", dtype="fp32")
    want, p = _answer(clean)
    assert want, "the tiny model's greedy answer is empty: the test would prove nothing"
    d = _copy(built, name, tmp_path)
    _hostile_generation_config(d, want)
    hostile = load_adapter(str(d), device="cpu", dtype="fp32")
    got, _ = _answer(hostile)
    assert got == want
    # and the settings are hostile: stock generate honouring them answers differently
    honoured = GenerationConfig.from_pretrained(d)
    honoured.max_new_tokens = 8
    if hasattr(clean.model.model, "rope_deltas"):
        clean.model.model.rope_deltas = None
    L = p.inputs["input_ids"].shape[1]
    stock = clean.model.generate(**p.inputs, generation_config=honoured)[0, L:].tolist()
    assert clean.answer_ids(stock) != want
    # keep-all still equals stock generate with explicit greedy settings
    if hasattr(hostile.model.model, "rope_deltas"):
        hostile.model.model.rope_deltas = None
    plain = hostile.model.generate(**p.inputs, **STOCK_GREEDY, max_new_tokens=8)[0, L:].tolist()
    assert hostile.answer_ids(plain) == want


def test_hostile_generation_config_no_warning_on_stderr(built, tmp_path):
    d = _copy(built, "tiny-llava", tmp_path)
    _hostile_generation_config(d, [5, 6])
    img = tmp_path / "im.png"
    make_image(64, 48).save(img)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-m", "zoocli", "ask", str(img), Q, "--model", str(d), "--keep", "4",
                          "--max-new-tokens", "3", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warn" not in res.stderr.lower() and "generation" not in res.stderr.lower(), res.stderr
