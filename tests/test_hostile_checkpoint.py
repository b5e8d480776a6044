"""Issue 11: every failure to load a local checkpoint is one line naming the file at fault.
The broken checkpoints are copies of the offline tiny models with one file damaged."""

from __future__ import annotations

import os
import shutil
import struct

import pytest

from zoocli.adapters import ensure_offline_model, load_adapter
from zoocli.errors import ZooError


def _st(d):
    return d / "model.safetensors"


def _mismatch(d):
    import torch
    from safetensors.torch import load_file, save_file

    t = load_file(_st(d))
    k = next(k for k in t if k.endswith("lm_head.weight"))
    t[k] = torch.zeros(t[k].shape[0] + 3, t[k].shape[1])
    save_file(t, _st(d), metadata={"format": "pt"})


BREAK = {  # name -> (damage, file at fault, what the message says)
    "truncated_weights": (lambda d: _st(d).write_bytes(_st(d).read_bytes()[:5000]), "model.safetensors",
                          "truncated or not safetensors"),
    "truncated_data": (lambda d: _st(d).write_bytes(_st(d).read_bytes()[:-64]), "model.safetensors",
                       "lies past the end of the file"),
    "random_weights": (lambda d: _st(d).write_bytes(os.urandom(5000)), "model.safetensors",
                       "not a valid safetensors file"),
    "huge_header": (lambda d: _st(d).write_bytes(struct.pack("<Q", 2**40) + b"{}"), "model.safetensors",
                    "header claims 1,099,511,627,776 bytes"),
    "bad_header_json": (lambda d: _st(d).write_bytes(struct.pack("<Q", 4) + b"[1]x"), "model.safetensors",
                        "not a JSON table of tensors"),
    "broken_tokenizer": (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json",
                         "not valid JSON"),
    "tokenizer_not_a_tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"model": 3}'), "tokenizer.json",
                                  "not a tokenizer the tokenizers library can load"),
    "weight_size_mismatch": (_mismatch, "model.safetensors",
                             r"size does not match config\.json .*lm_head\.weight is \[451, 64\]"),
    "template_unsafe": (lambda d: (d / "chat_template.jinja").write_text(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}"), "chat_template.jinja", "refused by the Jinja sandbox"),
    "template_syntax": (lambda d: (d / "chat_template.jinja").write_text("{% for %}"), "chat_template.jinja",
                        "TemplateSyntaxError"),
    "deep_config": (lambda d: (d / "config.json").write_text("[" * 200_000 + "]" * 200_000), "config.json",
                    "nested too deeply"),
    "deep_config_obj": (lambda d: (d / "config.json").write_text('{"a":' * 200_000 + "1" + "}" * 200_000),
                        "config.json", "nested too deeply"),
    "config_not_object": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json", "not a JSON object"),
    "binary_preprocessor": (lambda d: (d / "processor_config.json").write_bytes(b"\xff\xfe\x00"),
                            "processor_config.json", "not UTF-8"),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ensure_offline_model("tiny-llava", tmp_path_factory.mktemp("ck-cache"))


@pytest.mark.parametrize("name", sorted(BREAK))
def test_broken_checkpoint_is_one_line_naming_the_file(tmp_path, tiny_dir, name):
    damage, culprit, says = BREAK[name]
    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    damage(d)
    with pytest.raises(ZooError, match=says) as e:
        load_adapter(str(d), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert "\n" not in msg and str(d / culprit) in msg and len(msg) < 500


def test_intact_copy_loads(tmp_path, tiny_dir, rand_image):
    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    adapter = load_adapter(str(d), device="cpu", dtype="fp32")
    assert adapter.prepare(rand_image(20, 20), "q?").inputs["input_ids"].shape[1] > 0


def test_qwen_checkpoint_checks_pass_and_catch(tmp_path, zoo_model_cache):
    pytest.importorskip("zoocli.adapters.qwen2_5_vl")
    from zoocli.adapters.checkpoint import check_checkpoint_dir

    src = ensure_offline_model("tiny-qwen2.5-vl", zoo_model_cache)
    check_checkpoint_dir(src)  # the real files pass
    d = tmp_path / "q"
    shutil.copytree(src, d)
    (d / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__ }}")
    with pytest.raises(ZooError, match=r"chat_template\.jinja: its chat template is refused by the Jinja sandbox"):
        load_adapter(str(d), device="cpu", dtype="fp32")
