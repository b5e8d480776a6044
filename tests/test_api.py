"""The public Python API (``zoocli.api``): README's Library examples run as written, a transformers
model loaded by hand and wrapped gives what `zoo ask` gives, and the results hold what they say."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_helpers import run_json

import zoocli
from zoocli.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "sample_images" / "shapes" / "shapes_1.png"


def library_blocks() -> list[str]:
    """The ```python blocks of README's "Library" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Library\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README has no Library section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)


def test_readme_library_has_runnable_examples():
    blocks = library_blocks()
    assert len(blocks) >= 3
    text = "\n".join(blocks)
    for name in ("ask(", "compare_methods(", "score_tokens(", "wrap_model(", "ascending()"):
        assert name in text, name


def test_readme_library_blocks_run_as_written(tmp_path, monkeypatch, offline_models):
    """Every block runs, in order and in one namespace (as a reader pastes them into one
    session), in a fresh directory holding only the sample images, with the model cache in a
    temporary directory; what the blocks assert holds."""
    shutil.copytree(ROOT / "sample_images", tmp_path / "sample_images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["readme"])
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(library_blocks()):
        try:
            exec(compile(block, f"README.md Library block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README Library block {i + 1} failed: {e!r}\n{block}") from e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_images"]  # the blocks write nothing


@pytest.fixture(scope="module")
def demo():
    return zoocli.load_adapter("demo-llava", device="cpu", dtype="fp32")


def test_ask_answers_with_the_kept_set_ascending_and_grids(demo):
    res = zoocli.ask(demo, SHAPES, "What color is the circle?", keep="25%")
    assert res.answer == "red"
    assert (res.budget, res.keep, res.n_visual_tokens) == ("25%", 36, 144)
    assert res.kept == sorted(res.kept) and len(set(res.kept)) == 36
    assert res.method == "zoo" and res.model == "demo-llava" and not res.random_weights
    [(name, grid)] = res.grids().items()
    assert name == "image" and len(grid) == 12 and all(len(row) == 12 for row in grid)
    kept_cells = [r * 12 + c for r in range(12) for c in range(12) if grid[r][c]]
    assert kept_cells == res.kept  # LLaVA-1.5's candidates are the grid in raster order
    assert {"preprocess", "vision", "selection", "prefill", "ttft", "e2e"} <= set(res.timings_ms)
    assert res.warnings == []


def test_ask_takes_a_pil_image_spec_options_and_clamps_with_a_warning(demo):
    img = Image.open(SHAPES)
    a = zoocli.ask(demo, img, "What color is the circle?", keep=16, method="zoo:estimator=fd:m=8")
    b = zoocli.ask(demo, SHAPES, "What color is the circle?", keep="16", method="zoo",
                   options={"estimator": "fd", "m": 8, "h": 0.01})
    assert a.kept == b.kept and a.keep == 16 and a.method == "zoo:estimator=fd:m=8"
    big = zoocli.ask(demo, SHAPES, "What color is the circle?", keep=1000, method="divprune")
    assert big.keep == 144 and big.kept == list(range(144))
    assert len(big.warnings) == 1 and "144" in big.warnings[0]


@pytest.mark.parametrize("kw, needle", [
    (dict(keep="0"), "at least 1"), (dict(keep="11 percent"), "percentage"),
    (dict(method="nosuch"), "unknown method"), (dict(method="zoo:m=0"), "zoo:m=0"),
    (dict(question="  "), "question is empty"), (dict(image=3), "file path or a PIL image"),
])
def test_bad_arguments_are_usage_errors_before_any_compute(demo, kw, needle):
    args = dict(image=SHAPES, question="What color is the circle?") | kw
    with pytest.raises(UsageError, match=needle):
        zoocli.ask(demo, args.pop("image"), args.pop("question"), **args)


def test_compare_methods_matches_ask_per_method(demo):
    cmp = zoocli.compare_methods(demo, SHAPES, "What color is the circle?", "zoo,divprune", keep="11%")
    assert list(cmp.answers) == ["none", "zoo", "divprune"]
    assert (cmp.budget, cmp.keep, cmp.n_visual_tokens) == ("11%", 16, 144)
    assert [r["method"] for r in cmp.rows] == ["none", "zoo", "divprune"]
    assert cmp.answers["none"].kept == list(range(144))
    for spec in ("zoo", "divprune"):
        one = zoocli.ask(demo, SHAPES, "What color is the circle?", keep="11%", method=spec)
        assert (cmp.answers[spec].answer, cmp.answers[spec].kept) == (one.answer, one.kept)


def test_score_tokens_is_the_sensitivity_of_every_token(demo):
    from zoocli.sensitivity import token_sensitivity

    res = zoocli.score_tokens(demo, SHAPES, top=3)
    assert res.n_visual_tokens == 144 == len(res.values) == len(res.norms)
    assert [t["index"] for t in res.top] == sorted(range(144), key=lambda i: (-res.values[i], i))[:3]
    prepared = demo.prepare(Image.open(SHAPES).convert("RGB"), "Describe the image.")
    want = token_sensitivity(demo.encode(prepared).vision, demo.projector)
    assert torch.allclose(torch.tensor(res.values), want.cpu(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        zoocli.score_tokens(demo, SHAPES, m=8)  # m is an option of the sampled estimators


def test_select_gives_pick_order_and_ascending_is_what_build_inputs_takes(demo):
    from zoocli.methods import PruneInputs, select

    prepared = demo.prepare(Image.open(SHAPES).convert("RGB"), "What color is the circle?")
    encoded = demo.encode(prepared)
    inp = PruneInputs(features=encoded.features, vision=encoded.vision, projector=demo.projector)
    sel = select("zoo", inp, 36)
    assert sel.idx.tolist() != sorted(sel.idx.tolist())  # pick order
    with pytest.raises(ValueError, match="ascending"):
        demo.build_inputs(prepared, encoded, sel.idx)
    asc = sel.ascending()
    assert asc.idx.tolist() == sorted(sel.idx.tolist())
    text = demo.generate(demo.build_inputs(prepared, encoded, asc.idx, asc.tokens), 8).text.strip()
    res = zoocli.ask(demo, SHAPES, "What color is the circle?", keep=36)
    assert (asc.idx.tolist(), text) == (res.kept, res.answer)


def test_import_zoocli_does_not_import_torch_or_transformers():
    import subprocess

    code = "import sys, zoocli; zoocli.ask; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------- a transformers model loaded by hand

ASK = ("What color is the circle?", "--keep", "25%", "--method", "zoo", "--device", "cpu",
       "--dtype", "fp32", "--max-new-tokens", "8", "--no-warmup")


def _same_as_cli(adapter, cli_model: str):
    res = zoocli.ask(adapter, SHAPES, ASK[0], keep="25%", method="zoo", max_new_tokens=8)
    cli = run_json("ask", SHAPES, *ASK, "--model", cli_model)
    assert (res.answer, res.kept) == (cli["answer"], cli["kept_indices"])
    return res


def test_wrapping_a_hand_loaded_llava_answers_like_zoo_ask():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from zoocli.adapters import shipped_model_dir

    path = shipped_model_dir("demo-llava")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    adapter = zoocli.wrap_model(model, processor, "my-llava")
    res = _same_as_cli(adapter, "demo-llava")
    assert res.answer == "red" and res.model == "my-llava" and not res.random_weights


def test_wrapping_a_hand_loaded_qwen2_5_vl_answers_like_zoo_ask(zoo_model_cache, offline_models):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from zoocli.adapters import ensure_offline_model

    path = ensure_offline_model("tiny-qwen2.5-vl", zoo_model_cache)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError:  # the stock Qwen processor loads its video processor, which needs torchvision
        # (as with a real checkpoint); zoo's CPU install has none: zoo's own loader, images only
        from zoocli.adapters.qwen2_5_vl import load_processor

        processor = load_processor(path)
    adapter = zoocli.wrap_model(model, processor, random_weights=True)
    assert adapter.family == "qwen2_5_vl"
    res = _same_as_cli(adapter, "tiny-qwen2.5-vl")
    assert res.random_weights and res.keep == len(res.kept)


def test_wrap_model_refuses_what_it_cannot_wrap(demo):
    with pytest.raises(UsageError, match="transformers model"):
        zoocli.wrap_model(torch.nn.Linear(2, 2), demo.processor)
    with pytest.raises(UsageError, match="processor"):
        zoocli.wrap_model(demo.model, demo.processor.tokenizer)
    bert = type("M", (), {"config": type("C", (), {"model_type": "bert"})()})()
    with pytest.raises(UsageError, match="unknown model family 'bert'"):
        zoocli.wrap_model(bert, demo.processor)


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-llava-onevision", "tiny-qwen3-vl"])
def test_wrap_model_dispatches_every_family_to_its_adapter(name, zoo_model_cache, rand_image):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from zoocli.adapters import ensure_offline_model

    loaded = zoocli.load_adapter(name, device="cpu", dtype="fp32", cache_dir=zoo_model_cache)
    path = ensure_offline_model(name, zoo_model_cache)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except ImportError:  # Qwen3-VL's video processor needs torchvision (see above)
        processor = loaded.processor
    wrapped = zoocli.wrap_model(model, processor, name, random_weights=True)
    assert type(wrapped) is type(loaded)
    img = rand_image(120, 80, seed=2)
    a = zoocli.ask(wrapped, img, "What is it?", keep="30%", max_new_tokens=4)
    b = zoocli.ask(loaded, img, "What is it?", keep="30%", max_new_tokens=4)
    assert (a.answer, a.kept, a.scopes) == (b.answer, b.kept, b.scopes)


@pytest.mark.parametrize("command, function, args", [
    ("ask", "ask", [SHAPES, "What color is the circle?"]),
    ("compare", "compare_methods", [SHAPES, "What color is the circle?", "--methods", "zoo"]),
    ("score", "score_tokens", [SHAPES]),
])
def test_the_commands_are_built_on_the_api(command, function, args, monkeypatch):
    """`zoo ask|compare|score` compute through zoocli.api (one way to do each thing)."""
    import zoocli.api

    calls = []
    real = getattr(zoocli.api, function)
    monkeypatch.setattr(zoocli.api, function, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    run_json(command, *args, "--model", "demo-llava", "--device", "cpu", *(
        ["--no-warmup", "--max-new-tokens", "2"] if command != "score" else []))
    assert calls == [1]
