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


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])  # the families that call generate
def test_hostile_generation_config_no_warning_on_stderr(built, tmp_path, name):
    d = _copy(built, name, tmp_path)
    _hostile_generation_config(d, [5, 6])
    img = tmp_path / "im.png"
    make_image(64, 48).save(img)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-m", "zoocli", "ask", str(img), Q, "--model", str(d), "--keep", "4",
                          "--max-new-tokens", "3", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warn" not in res.stderr.lower() and "generation" not in res.stderr.lower(), res.stderr


# ----------------------------------------------------------------- files of a checkpoint dir

def _cfg(d, change):
    c = json.loads((d / "config.json").read_text())
    change(c)
    (d / "config.json").write_text(json.dumps(c))


def _fifo(p):
    if p.exists():
        p.unlink()
    os.mkfifo(p)


def _sparse(p, size):
    with open(p, "wb") as f:
        f.truncate(size)


class _Pickle:  # unpickling it would create the folder named by ``path``
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _pickle_index(d):
    import pickle

    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Pickle(str(d / "UNPICKLED"))))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "pytorch_model.bin"}}))


def _only_pickle(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _second_shard_fifo(d):
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    _fifo(d / "model-00002-of-00002.safetensors")


def _fifo_link(d):
    (d / "sub").mkdir()
    _fifo(d / "sub" / "pipe")
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").symlink_to(d / "sub" / "pipe")


BROKEN = {  # name -> (model, damage, file at fault, what the message says)
    "fifo_config": ("tiny-llava", lambda d: _fifo(d / "config.json"), "config.json", "not a regular file"),
    "fifo_tokenizer": ("tiny-llava", lambda d: _fifo(d / "tokenizer.json"), "tokenizer.json", "not a regular file"),
    "fifo_any_json": ("tiny-llava", lambda d: _fifo(d / "preprocessor_config.json"), "preprocessor_config.json",
                      "not a regular file"),
    "fifo_second_shard": ("tiny-llava", _second_shard_fifo, "model-00002-of-00002.safetensors", "not a regular file"),
    "fifo_template": ("tiny-llava", lambda d: _fifo(d / "chat_template.jinja"), "chat_template.jinja",
                      "not a regular file"),
    "link_to_fifo": ("tiny-llava", _fifo_link, "tokenizer_config.json", "not a regular file"),
    "huge_json": ("tiny-llava", lambda d: _sparse(d / "generation_config.json", 200 << 20), "generation_config.json",
                  "over the limit"),
    "huge_template": ("tiny-llava", lambda d: _sparse(d / "chat_template.jinja", 2 << 20), "chat_template.jinja",
                      "over the limit"),
    "vision_feature_layer": ("tiny-llava", lambda d: _cfg(d, lambda c: c.update(vision_feature_layer=40)),
                             "config.json", "field 'vision_feature_layer' is 40: layer 40 is out of range"),
    "vision_feature_layer_list": ("tiny-llava-onevision",
                                  lambda d: _cfg(d, lambda c: c.update(vision_feature_layer=[-1, -9])),
                                  "config.json", "layer -9 is out of range"),
    "image_token_outside_vocab": ("tiny-llava", lambda d: _cfg(d, lambda c: c.update(image_token_index=10**6)),
                                  "config.json", "field 'image_token_index' is 1000000, outside the vocabulary"),
    "image_token_not_int": ("tiny-qwen2.5-vl", lambda d: _cfg(d, lambda c: c.update(image_token_id="x")),
                            "config.json", "field 'image_token_id'"),
    "pinpoints_config": ("tiny-llava-onevision",
                         lambda d: _cfg(d, lambda c: c.update(image_grid_pinpoints=[[56, 56], [7, 9]])),
                         "config.json", "entry [7, 9] does not fit the 56-pixel tiles"),
    "pinpoints_not_pairs": ("tiny-llava-onevision",
                            lambda d: _cfg(d, lambda c: c.update(image_grid_pinpoints=[[56, 56, 56]])),
                            "config.json", "not a [height, width] pair"),
    "empty_template": ("tiny-llava", lambda d: (d / "chat_template.jinja").write_text("  \n"), "chat_template.jinja",
                       "its chat template is empty"),
    "template_huge_output": ("tiny-llava", lambda d: (d / "chat_template.jinja").write_text(
        "{{ 'x' * 10**8 }}{{ messages[0]['content'][1]['text'] }}"), "chat_template.jinja",
        "renders 100,000,013 characters for a one-line question"),
    "template_without_question": ("tiny-llava", lambda d: (d / "chat_template.jinja").write_text("USER: ASSISTANT:"),
                                  "chat_template.jinja", "does not print the user's question"),
    "index_points_at_pickle": ("tiny-llava", _pickle_index, "model.safetensors.index.json",
                               "points at pytorch_model.bin, not a .safetensors file"),
    "only_pickle_weights": ("tiny-llava", _only_pickle, "", "weights only in pytorch_model.bin"),
    "no_weights": ("tiny-llava", lambda d: (d / "model.safetensors").unlink(), "", "has no weights"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_or_hostile_checkpoint_is_one_line_naming_file_and_field(built, tmp_path, name):
    model, damage, culprit, says = BROKEN[name]
    d = _copy(built, model, tmp_path)
    damage(d)
    with pytest.raises(ZooError) as e:
        load_adapter(str(d), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert says in msg and str(d / culprit) in msg, msg
    assert "\n" not in msg and len(msg) < 500
    assert not (d / "UNPICKLED").exists()  # nothing was unpickled


def test_pinpoints_of_the_processor_are_checked(built, tmp_path):
    d = _copy(built, "tiny-llava-onevision", tmp_path)
    doc = json.loads((d / "processor_config.json").read_text())
    ip = doc.get("image_processor", doc)
    ip["image_grid_pinpoints"] = [[56, 56], [60, 56]]
    (d / "processor_config.json").write_text(json.dumps(doc))
    with pytest.raises(ZooError, match=r"processor_config\.json: field 'image_grid_pinpoints': entry \[60, 56\]"):
        load_adapter(str(d), device="cpu", dtype="fp32")


def test_nested_loop_template_is_stopped(built, tmp_path):
    from zoocli.adapters.checkpoint import TEMPLATE_SECONDS

    d = _copy(built, "tiny-llava", tmp_path)
    (d / "chat_template.jinja").write_text(
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ messages }}")
    with pytest.raises(ZooError, match=f"did not finish rendering a one-line question in {TEMPLATE_SECONDS:g} s"):
        load_adapter(str(d), device="cpu", dtype="fp32")


def test_template_slow_on_a_real_question_is_stopped(built, tmp_path):
    d = _copy(built, "tiny-llava", tmp_path)
    t = d / "chat_template.jinja"
    loop = "{% set q = messages[0]['content'][1]['text'] %}{% for a in q %}{% for b in q %}{% endfor %}{% endfor %}"
    t.write_text(loop + t.read_text())
    a = load_adapter(str(d), device="cpu", dtype="fp32")  # the probe question renders at once
    a.prepare(make_image(32, 32), "What is it?")
    with pytest.raises(ZooError, match=r"chat template did not finish rendering this question in 5 s "
                                       r"\(40,000 characters\)"):
        a.prepare(make_image(32, 32), "x" * 40_000)


def test_template_time_bound_restores_the_alarm():
    import signal

    from zoocli.adapters.checkpoint import PROBE, TooSlow, render_template

    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(TooSlow):
        render_template("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", PROBE,
                        seconds=0.2)
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert "What is this?" in render_template("{{ messages[0].content[1].text }}", PROBE)


def test_config_of_a_model_too_big_for_memory_is_refused_before_loading(built, tmp_path):
    d = _copy(built, "tiny-llava", tmp_path)
    _cfg(d, lambda c: c["text_config"].update(hidden_size=32768, intermediate_size=131072, num_hidden_layers=64,
                                              num_attention_heads=64, num_key_value_heads=64, head_dim=512))
    with pytest.raises(ZooError, match=r"its weights alone need 4100\.1 GiB in float32 \(1,100,620,107,520 "
                                       r"parameters\), but only .* GiB is free on cpu for this process"):
        load_adapter(str(d), device="cpu", dtype="fp32")


def test_cgroup_limits_count_as_free_memory(tmp_path):
    import torch as _t

    from zoocli.adapters import available_bytes, cgroup_free_bytes

    root = tmp_path / "cg"
    (root / "job" / "step").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    (root / "job" / "step" / "memory.max").write_text("max\n")  # no limit of its own
    (root / "job" / "memory.max").write_text(f"{3 << 30}\n")
    (root / "job" / "memory.current").write_text(f"{1 << 30}\n")
    assert cgroup_free_bytes(root, proc) == 2 << 30
    assert available_bytes(_t.device("cpu"), root, proc) <= 2 << 30
    (root / "job" / "memory.stat").write_text(f"anon 1000\ninactive_file {1 << 29}\nactive_file 7\n")
    assert cgroup_free_bytes(root, proc) == (2 << 30) + (1 << 29)  # inactive page cache is reclaimable
    # cgroup v1: memory.limit_in_bytes less memory.usage_in_bytes; "unlimited" is a huge number
    proc.write_text("5:memory:/box\n3:cpu,cpuacct:/box\n")
    (root / "memory" / "box").mkdir(parents=True)
    (root / "memory" / "box" / "memory.limit_in_bytes").write_text(f"{5 << 30}\n")
    (root / "memory" / "box" / "memory.usage_in_bytes").write_text(f"{4 << 30}\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_free_bytes(root, proc) == 1 << 30
    assert cgroup_free_bytes(tmp_path / "none", tmp_path / "nothing") is None


def test_offline_cache_path_that_is_a_file(tmp_path):
    f = tmp_path / "models"
    f.write_text("my notes")
    with pytest.raises(ZooError, match="the offline model cache .* is not a folder"):
        load_adapter("tiny-llava", device="cpu", dtype="fp32", cache_dir=f)
    assert f.read_text() == "my notes"


def test_truncated_cached_offline_weights(tmp_path):
    cache = tmp_path / "models"
    d = ensure_offline_model("tiny-llava", cache)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ZooError, match=r"model\.safetensors: truncated.*the cached offline model tiny-llava is "
                                       r"damaged: delete"):
        load_adapter("tiny-llava", device="cpu", dtype="fp32", cache_dir=cache)


# ---------------------------------------------------------------- allocation failures, images

@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_allocation_failure_is_one_line_blaming_no_flag(monkeypatch, tmp_path, exc):
    from cli_helpers import one_line_error, run

    import importlib

    ask = importlib.import_module("zoocli.cli.ask")

    def boom(*a, **k):
        raise exc

    img = tmp_path / "im.png"
    make_image(32, 32).save(img)
    monkeypatch.setattr(ask, "load_model", boom)
    res = run("ask", img, "q", "--model", "tiny-llava", code=1)
    one_line_error(res, "out of memory in this process")
    assert "--keep" not in res.stderr and "--m" not in res.stderr


def test_float_tiff_with_nan_loads_without_numpy_warning(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    from zoocli.images import load_image

    a = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    a[3:6, 4:9] = np.nan
    a[0, 1] = np.inf
    Image.fromarray(a, "F").save(tmp_path / "nan.tif")
    Image.fromarray(np.full((4, 4), np.nan, np.float32), "F").save(tmp_path / "allnan.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im = np.asarray(load_image(tmp_path / "nan.tif"))
        assert not np.asarray(load_image(tmp_path / "allnan.tif")).any()
    assert (im[3:6, 4:9] == 0).all() and im[0, 1, 0] == 255 and im[19, 29, 0] == 255 and im[10, 10, 0] == round(310 / 599 * 255)


# ------------------------------------------------------------------------------ bounded work

LONG = "Is there a cat? " * 62_500  # 10^6 characters


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_prompt_longer_than_the_context_is_refused_before_prefill(built, name):
    a = load_adapter(str(built(name)), device="cpu", dtype="fp32")
    limit = a.context_length
    assert limit == a.model.config.get_text_config().max_position_embeddings
    with pytest.raises(ZooError, match=rf"the prompt is [\d,]+ tokens .*over the model's context of {limit:,} "
                                       r"tokens \(max_position_embeddings\)"):
        a.prepare(make_image(32, 32), LONG)
    a.prepare(make_image(32, 32), "Is there a cat? " * 20)  # a long question within the context is fine


def test_eval_question_longer_than_the_context_is_one_line(offline_models, tmp_path):
    from pathlib import Path

    from cli_helpers import one_line_error, run

    images = Path(__file__).resolve().parent.parent / "sample_images"
    data = tmp_path / "q.jsonl"
    rows = [{"id": "ok", "image": "cat_chelsea.png", "question": "What is it?", "answer": "cat"},
            {"id": "long", "image": "cat_chelsea.png", "question": LONG, "answer": "cat"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run("eval", data, "--image-root", images, "--model", "tiny-llava", "--methods", "divprune",
              "--budgets", "4", "--max-new-tokens", "2", "--out", tmp_path / "out.jsonl", code=1)
    one_line_error(res, "question long: the prompt is", "over the model's context of 2,048 tokens")
