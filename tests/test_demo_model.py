"""The demo model: training-step arithmetic, the shipped weights (demo-llava) through the real
load / pipeline / eval path, and its trained projector as a real test case for the estimators."""

from __future__ import annotations

import json
import pytest
import torch

from zoocli import ops
from zoocli.demo import model as dm
from zoocli.demo import train as tr
from zoocli.demo import world
from zoocli.demo.evalset import SHIPPED_SEED, shipped_eval_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh():
    torch.manual_seed(0)
    return dm.new_model(0)


@pytest.fixture(scope="module")
def demo():
    from zoocli.adapters import load_adapter

    return load_adapter("demo-llava", device="cpu", dtype="fp32")


def test_pixel_values_equal_the_processor(fresh):
    _, processor = fresh
    imgs = [world.render(s) for s, _ in tr.take(world.scenes(2), 2)]
    ref = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    assert torch.allclose(dm.pixel_values(imgs), ref, atol=1e-6)


def test_training_forward_equals_the_model(fresh):
    """Prefix sharing (image prefix once per image, its cache per question) gives the logits the
    library's own forward (input_ids + pixel_values) gives for each full row."""
    model, processor = fresh
    model.eval()
    prompts = tr.Prompts(processor)
    batch = tr.make_batch(tr.take(world.scenes(3), 2), prompts, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits, labels, rows, _ = tr.forward(model, batch)
        ref = []
        for r in range(batch["ids"].shape[0]):
            n = int(batch["mask"][r].sum())
            ids = torch.cat([batch["prefix"], batch["ids"][r, :n]])[None]
            out = model(input_ids=ids, pixel_values=batch["pv"][batch["img"][r]][None]).logits[0]
            ref.append(out[batch["prefix"].numel():][batch["labels"][r, :n] != -100])
            assert (labels[rows == r] == batch["labels"][r, :n][batch["labels"][r, :n] != -100]).all()
    assert torch.allclose(logits, torch.cat(ref), atol=1e-4)


def test_demo_llava_loads_as_a_real_checkpoint(demo):
    assert demo.family == "llava" and not demo.meaningless and demo.model_id == "demo-llava"
    cfg = demo.model.config
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 >= 144
    weights = dm.shipped_dir() / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    info = json.loads((dm.shipped_dir() / "TRAINING.json").read_text())
    assert info["command"].startswith("python -m zoocli.demo.train")


def _eval(adapter, samples, methods=(), budgets=()):
    from zoocli.eval_runner import Dataset, EvalSpec, run_eval

    class Keep(list):
        def write(self, r):
            self.append(r)

    out = Keep()
    spec = EvalSpec(model="demo-llava", methods=list(methods), budgets=list(budgets), max_new_tokens=8)
    run_eval(adapter, [Dataset("demo", samples)], spec, out)
    return out


def test_shipped_weights_answer_the_eval_slice(demo):
    """The first 100 questions of the shipped eval set, unpruned, through ``zoo eval``'s runner:
    at least 85% right (issue 14's bar; 90% measured), the accuracy recorded next to the weights
    (TRAINING.json, measured with ``zoo eval``), and question by question the same right / wrong
    as the training loop's teacher-forced argmax."""
    from zoocli.evaluation.samples import load_samples

    root = shipped_eval_dir()
    samples = load_samples(root / "questions.jsonl", image_root=root)[:100]
    recs = _eval(demo, samples)
    assert len(recs) == 100
    acc = sum(r["score"] for r in recs) / 100
    info = json.loads((dm.shipped_dir() / "TRAINING.json").read_text())
    assert abs(acc - info["pipeline_eval_first_100"]["overall"]) <= 0.02
    assert acc >= 0.85
    scenes = tr.take(world.scenes(SHIPPED_SEED), 40)
    loop = tr.answers_correct(demo.model, scenes, tr.Prompts(demo.processor), demo.processor.tokenizer.pad_token_id)
    assert [ok for _, ok in loop[:100]] == [bool(r["correct"]) for r in recs]


def test_answers_are_one_token(fresh):
    """Every answer of the world is one id + ``</s>`` in the demo tokenizer (``add_world_words``),
    and decodes back to itself."""
    _, processor = fresh
    tok = processor.tokenizer
    for answer in [*world.COLORS, "yes", "no", "left", "right", *map(str, range(world.MAX_SHAPES + 1))]:
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == answer


def test_pruned_answers_on_the_sample_scenes(demo):
    """The README's main job: ZOO-Prune at 25% of the visual tokens (36 of 144) on the sample
    shapes scenes (``demo_world.jsonl``, answers from the generator). The README question is
    answered right, and (measured) all 12 are, as unpruned; 10 of 12 at 11% (two counts off by
    one). Asserted: the README answer, at least 10 of 12, and every answer a word of the world."""
    from pathlib import Path

    from zoocli.images import load_image
    from zoocli.pipeline import run_one

    root = Path(__file__).resolve().parent.parent / "sample_images" / "shapes"
    recs = [json.loads(line) for line in (root / "demo_world.jsonl").read_text().splitlines()]
    res = {r["id"]: run_one(demo, load_image(root / r["image"]), r["question"], "zoo", "25%",
                            max_new_tokens=8) for r in recs}
    assert all(r.keep == 36 for r in res.values())
    assert res["shapes1-color"].answer.strip() == "red"
    words = {*world.COLORS, "yes", "no", "left", "right", *map(str, range(world.MAX_SHAPES + 1))}
    assert all(r.answer.strip() in words for r in res.values())
    assert sum(res[r["id"]].answer.strip() == r["answer"] for r in recs) >= 10


def test_object_targets_against_a_per_patch_loop():
    """``object_targets``: per patch, the object whose box holds the patch centre (checked by a
    plain loop over patches and shapes), and one anchor per object at its box centre, so the
    anchors of a kind count its shapes."""
    scenes = tr.take(world.scenes(7), 24)
    t = tr.object_targets(scenes)
    classes = world.shape_classes()
    for b, (shapes, _) in enumerate(scenes):
        for i in range(dm.GRID * dm.GRID):
            px, py = (i % dm.GRID) * dm.PATCH + dm.PATCH / 2, (i // dm.GRID) * dm.PATCH + dm.PATCH / 2
            owners = [s for s in shapes if s.box[0] <= px < s.box[2] and s.box[1] <= py < s.box[3]]
            assert len(owners) <= 1
            want = 1 + classes.index((owners[0].color, owners[0].kind)) if owners else 0
            assert int(t["cls"][b, i]) == want
            assert int(t["side"][b, i]) == (0 if not owners else 1 if owners[0].cx < world.MIDLINE else 2)
        assert int(t["anchor"][b].sum()) == len(shapes)
        for s in shapes:
            cy = (s.box[1] + s.box[3]) / 2
            i = int(cy // dm.PATCH) * dm.GRID + int(s.cx // dm.PATCH)
            assert t["anchor"][b, i] == 1 and int(t["cls"][b, i]) == 1 + classes.index((s.color, s.kind))
        for k, kind in enumerate(world.KINDS):
            kinds = (t["cls"][b] - 1) % 3
            n = int((t["anchor"][b].bool() & (t["cls"][b] > 0) & (kinds == k)).sum())
            assert n == sum(s.kind == kind for s in shapes)


def test_position_embeddings_start_as_a_2d_sine_cosine_table():
    """``init_positions``: row 1 + r * 12 + c holds sin/cos of r and of c at the table's
    frequencies (float64 reference); the CLS row is left as initialised."""
    import math

    fresh_model, _ = dm.new_model(0)
    pe = fresh_model.model.vision_tower.embeddings.position_embedding.weight.detach().double()
    d = pe.shape[1] // 4
    for r, c in [(0, 0), (0, 11), (5, 7), (11, 3)]:
        row = pe[1 + r * dm.GRID + c]
        for j in range(d):
            f = 1.0 / 100.0 ** (j / d)
            ref = [math.sin(r * f), math.cos(r * f), math.sin(c * f), math.cos(c * f)]
            got = [row[j], row[d + j], row[2 * d + j], row[3 * d + j]]
            assert all(abs(float(g) - x) < 1e-5 for g, x in zip(got, ref))
    assert float(pe[0].abs().max()) < 0.2  # the CLS position keeps CLIP's small normal start


def test_training_runs_deterministically_and_never_overwrites(tmp_path):
    """``python -m zoocli.demo.train``: a vision-only step and two question steps write a
    checkpoint that loads and a TRAINING.json; the same command gives the same weights; an
    existing non-empty --out (e.g. the shipped folder) is refused in one line before training."""
    from safetensors.torch import load_file

    small = ["--steps", "3", "--vision-steps", "1", "--batch", "2", "--heldout", "2", "--per-type", "1", "--every", "0"]
    for name in ("a", "b"):
        assert tr.main([*small, "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "a" / "TRAINING.json").read_text())
    assert info["args"]["vision_steps"] == 1 and info["command"].startswith("python -m zoocli.demo.train")
    model, _ = dm.load(tmp_path / "a")
    assert model.config.image_seq_length == 144
    before = (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exc:
        tr.main([*small, "--out", str(tmp_path / "a")])
    assert exc.value.code == 2 and (tmp_path / "a" / "model.safetensors").read_bytes() == before
