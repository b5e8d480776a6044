"""Hooks of the ``zoo_sample`` lmms-eval task (see ``zoo_sample.yaml``).

The prompt is the question as written (what ``zoo eval`` and ``zoo ask`` send); images are the
files of ``sample_images/`` in the source checkout, loaded with ``zoocli.images.load_image``;
answers and scoring are zoo's own (``zoocli.evaluation``): the gold answers are read from the
sample file by zoo's reader (the JSON loader would turn "2" into 2), so the ``score`` metric is
the number ``zoo eval`` reports for the same predictions.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from zoocli.errors import ZooError
from zoocli.evaluation import SAMPLE_EVAL, load_samples, score_one
from zoocli.images import load_image

IMAGE_ROOT = Path(__file__).resolve().parents[3] / "sample_images"


@lru_cache(maxsize=1)
def _samples() -> dict:
    return {s.id: s for s in load_samples(SAMPLE_EVAL)}


def doc_to_visual(doc: dict) -> list:
    path = IMAGE_ROOT / doc["image"]
    if not path.is_file():
        raise ZooError(f"zoo_sample: {path} not found; the task reads sample_images/ of a zoo "
                       f"source checkout (git clone, then pip install -e '.[lmms]')")
    return [load_image(str(path))]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> list[str]:
    return list(_samples()[doc["id"]].answers)


def process_results(doc: dict, results: list[str]) -> dict:
    score, _read = score_one(_samples()[doc["id"]], results[0])
    return {"score": score}
