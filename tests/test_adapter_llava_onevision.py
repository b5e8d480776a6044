"""LLaVA-OneVision adapter on tiny random checkpoints (CPU): anyres(_max) slot layout, newlines, scopes,
kept-token feeding. The reference is the stock model: ``get_image_features`` (packed features),
``generate``, and the stock model fed embeddings the test splices itself from the packed features.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from conftest import STOCK_GREEDY, make_image

from zoocli.adapters.llava_onevision import LlavaOnevisionAdapter, build_tiny
from zoocli.errors import UsageError

pytestmark = pytest.mark.slow

Q = "What is on the monitor?"
SIZES = [(200, 30), (30, 200), (32, 32), (150, 100)]  # wide, tall (unpadded), square, 2x2 tiles
_BUILT: dict = {}


def _build(kind, tmp_path_factory):
    if kind not in _BUILT:
        d = tmp_path_factory.mktemp(f"llava_onevision_{kind}")
        build_tiny(d, second=kind == "second")
        _BUILT[kind] = LlavaOnevisionAdapter.load(d, "cpu", torch.float32)
    return _BUILT[kind]


@pytest.fixture(scope="module", params=["tiny", "second"])
def adapter(request, tmp_path_factory):
    """tiny (anyres_max_9: never downsamples here) and a second config (other sizes, anyres_max_1)."""
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _build("tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    return _build("second", tmp_path_factory)


def _case(a, size, seed=0):
    p = a.prepare(make_image(*size, seed=seed), Q)
    return p, a.encode(p)


def _packed(a, p):
    import inspect

    inp, cfg = p.inputs, a.model.config
    kw = {k: getattr(cfg, k) for k in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")
          if k in inspect.signature(a.model.model.get_image_features).parameters}
    with torch.no_grad():
        out = a.model.model.get_image_features(pixel_values=inp["pixel_values"], image_sizes=inp["image_sizes"], **kw)
    return (out.pooler_output if hasattr(out, "pooler_output") else out[0])[0]


def _strip(a, ids):
    eos = a.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def _hand_pruned_generate(a, p, keep_slots, n=8):
    """The stock model fed inputs_embeds spliced here: packed stock features at the kept slots."""
    inp = p.inputs
    ids, mask = inp["input_ids"][0], inp["attention_mask"][0]
    ph = (ids == a.image_token_id).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[ph] = False
    keep[ph[keep_slots]] = True
    ids_k, mask_k = ids[keep], mask[keep]
    with torch.no_grad():
        e = a.model.get_input_embeddings()(ids_k)
        e[ids_k == a.image_token_id] = _packed(a, p)[keep_slots]
        out = a.model.generate(inputs_embeds=e[None], attention_mask=mask_k[None], **STOCK_GREEDY, max_new_tokens=n)
    return _strip(a, out[0].tolist())


@pytest.mark.parametrize("size", SIZES)
def test_encode_equals_stock_packed_features(adapter, size):
    p, e = _case(adapter, size)
    packed = _packed(adapter, p)
    nl = e.state["slot_src"] < 0
    assert e.n_llm_visual == packed.shape[0] == int((p.inputs["input_ids"] == adapter.image_token_id).sum())
    assert torch.equal(packed[~nl], e.features)
    assert torch.equal(packed[nl], adapter.model.model.image_newline[None].expand(int(nl.sum()), -1))
    assert not bool(nl[:e.scopes[0].index.numel()].any())  # the base image has no newline
    assert e.scopes[0].name == "base" and e.scopes[0].index.tolist() == list(range(e.scopes[0].index.numel()))
    idx = torch.cat([s.index for s in e.scopes]).sort().values
    assert torch.equal(idx, torch.arange(e.features.shape[0]))  # the scopes partition the candidates


def test_projector_of_vision_is_features_without_downsampling(tiny):
    for size in SIZES:
        _, e = _case(tiny, size)
        torch.testing.assert_close(tiny.projector(e.vision), e.features)


def test_anyres_max_downsampling_mixes_rows(second):
    """anyres_max_1 on a 2x2-tile image: the stitched grid is bilinearly downsampled; candidates are the
    downsampled slots and vision is the same mix of the pre-projector rows (documented deviation)."""
    p, e = _case(second, (150, 100))
    vc = second.model.config.vision_config
    side = vc.image_size // vc.patch_size
    assert e.state["n_tiles"] == 5 and e.features.shape[0] < 5 * side * side
    x = second._vision(p.inputs["pixel_values"][0, :5])  # [T, P, Dv]
    assert torch.equal(e.vision[:side * side], x[0])  # the base image is never downsampled
    rows = x[1:].reshape(-1, x.shape[-1])
    assert not any(bool((rows == v).all(-1).any()) for v in e.vision[side * side:])  # mixed, not gathered
    assert not torch.allclose(second.projector(e.vision), e.features)


@pytest.mark.parametrize("size", SIZES)
def test_keep_all_equals_stock_generate(adapter, size):
    p, e = _case(adapter, size)
    li = adapter.build_inputs(p, e, torch.arange(e.features.shape[0]))
    assert li.n_visual == e.n_llm_visual
    L = p.inputs["input_ids"].shape[1]
    stock = adapter.model.generate(**p.inputs, **STOCK_GREEDY, max_new_tokens=8)[0, L:].tolist()
    assert adapter.generate(li, 8).ids == _strip(adapter, stock)


@pytest.mark.parametrize("size", [(200, 30), (150, 100)])
def test_pruned_equals_hand_spliced_stock(adapter, size):
    p, e = _case(adapter, size)
    n = e.features.shape[0]
    kept = torch.arange(0, n, 3)
    li = adapter.build_inputs(p, e, kept)
    slot_src = e.state["slot_src"]
    assert li.n_visual == kept.numel() + int((slot_src < 0).sum())  # newlines always kept
    cand_slots = (slot_src >= 0).nonzero().squeeze(1)
    keep_slots = torch.cat([cand_slots[kept], (slot_src < 0).nonzero().squeeze(1)]).sort().values
    assert adapter.generate(li, 8).ids == _hand_pruned_generate(adapter, p, keep_slots)


def test_per_crop_budget_like_llava_next(tiny):
    from zoocli.pipeline import run_one

    res = run_one(tiny, make_image(150, 100), Q, "random", "20", scope="crop", max_new_tokens=2)
    assert len(res.per_scope) == 5 and sum(res.per_scope) == 20 and res.per_scope[0] == 4
    glob = run_one(tiny, make_image(150, 100), Q, "zoo", "20", scope="global", max_new_tokens=2)
    assert sum(glob.per_scope) == 20


def test_in_llm_methods_and_refusals(tiny):
    from zoocli.pipeline import check_family, run_one

    for method in ("fastv", "sparsevlm"):
        res = run_one(tiny, make_image(200, 30), Q, method, "10", max_new_tokens=3)
        assert res.stage == "in_llm" and len(res.kept_indices) <= 10
    with pytest.raises(UsageError, match="does not support llava_onevision"):
        check_family(tiny, "visionzip")
    p, e = _case(tiny, (32, 32))
    with pytest.raises(UsageError, match="--vs-encoder"):
        tiny.encoder_probe(p, e)


def test_full_size_config():
    from transformers import AutoConfig

    d = json.loads(resources.files("zoocli").joinpath("data/llava-onevision-7b.json").read_text())
    d.pop("_name_or_path")
    cfg = AutoConfig.for_model(**d)
    assert cfg.vision_aspect_ratio == "anyres_max_9" and cfg.vision_feature_select_strategy == "full"
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.vision_config.num_hidden_layers) == (384, 14, 26)
    assert len(cfg.image_grid_pinpoints) == 36 and cfg.text_config.hidden_size == 3584
    with torch.device("meta"):
        model = LlavaOnevisionAdapter.model_class()._from_config(cfg)
    assert round(sum(q.numel() for q in model.parameters()) / 1e9, 2) == 8.03


def test_from_config_random_weights_runs(tmp_path):
    from zoocli.adapters.llava_onevision import build_tokenizer, tiny_config

    cfg = tiny_config(build_tokenizer()).to_dict()
    a = LlavaOnevisionAdapter.from_config(cfg, "cpu", torch.float32)
    assert a.meaningless and a.family == "llava_onevision"
    p, e = _case(a, (64, 40))
    assert len(a.generate(a.build_inputs(p, e, torch.tensor([0, 5])), 3).ids) <= 3
