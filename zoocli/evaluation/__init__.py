"""The model-independent half of ``zoo eval``: read benchmark questions, score predictions, store
records resumably (per-rank shards), and summarise score and retention against the unpruned
baseline (method ``"none"``).

    samples = load_samples("pope.jsonl", image_root="coco/val2014")
    todo = [s for s in shard(samples, rank, world) if ("pope", s.id, m, b) not in done_keys(paths)]
    with RecordWriter(shard=("run.jsonl", rank, world)) as w:  # run.rank<rank>.jsonl, signed
        w.write(make_record(sample, "pope", m, b, prediction, kept_tokens=k, timings_ms=t))
    merge_shards(zoo_shards("run.jsonl"), "run.jsonl"); rows = summarize(read_records("run.jsonl"))

Sub-modules: ``samples`` (readers), ``metrics`` (scoring), ``store`` (records, shards, summary).
"""

from pathlib import Path

from zoocli.evaluation.metrics import (
    extract_choice, extract_yes_no, normalize_answer, score_one, score_predictions, vqa_accuracy,
    yes_no_metrics,
)
from zoocli.evaluation.samples import Sample, detect_format, infer_kind, load_answers, load_samples
from zoocli.evaluation.store import (
    BASELINE, MEAN, RecordWriter, dataset_value, done_keys, find_shards, make_record, merge_shards,
    read_records, record_key, shard, shard_path, shard_paths, summarize, zoo_shards,
)

SAMPLE_EVAL = Path(__file__).resolve().parent.parent / "data" / "sample_eval.jsonl"
"""The small eval set for the shipped ``sample_images/`` (plain format, image names relative)."""


def dataset_name(path) -> str:
    """A dataset's name from its file: ``pope_coco_random.head60.jsonl`` -> ``pope_coco_random.head60``."""
    p = Path(path)
    return p.name[: -len(p.suffix)] if p.suffix else p.name


__all__ = [
    "BASELINE", "MEAN", "RecordWriter", "SAMPLE_EVAL", "Sample", "dataset_name", "dataset_value",
    "detect_format", "done_keys", "extract_choice", "extract_yes_no", "find_shards", "infer_kind",
    "load_answers", "load_samples", "make_record", "merge_shards", "normalize_answer",
    "read_records", "record_key", "score_one", "score_predictions", "shard", "shard_path",
    "shard_paths", "summarize", "zoo_shards", "vqa_accuracy", "yes_no_metrics",
]
