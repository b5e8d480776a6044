"""Prediction records on disk: append-only JSON Lines, resume, per-rank shards, merge, summary.

A record is one prediction: ``{"dataset", "id", "method", "budget", "kind", "prediction",
"extracted", "answers", "score", "correct", "kept_tokens", "timings_ms", ...}`` (``make_record``).
Its key is ``(dataset, id, method, budget)``; the unpruned baseline is method ``"none"`` (any
budget, usually None).

``RecordWriter`` appends one line per record and flushes + fsyncs it, so a crash loses at most the
record being written. On opening it repairs a torn last line (drops it, or ends it with a newline
when it is a whole record); it refuses a file that is not zoo's own records (``zoocli.outfile``).
``read_records`` / ``done_keys`` ignore a torn last line; a damaged line anywhere else is an error
naming the file and line. ``merge_shards`` only appends to its output, never replaces it.

Shards: rank R of a torchrun run writes ``run.rankR.jsonl`` (``RecordWriter(..., shard=...)``),
every record signed with ``SHARD_FIELD`` (``{"out": "run.jsonl", "rank": R, "world": N}``). Only
files whose every record carries the signature of that output and rank are zoo's shards
(``zoo_shards``): they alone are read on resume, merged (the signature dropped) and deleted. A
user's own ``run.rank64.jsonl`` (say, the --out of another run) is never read, merged nor
deleted, and a rank never writes into it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from zoocli.errors import UsageError, ZooError
from zoocli.evaluation.metrics import majority, score_one, yes_no_metrics
from zoocli.evaluation.samples import Sample
from zoocli.outfile import JsonlOut, check_regular

KEY_FIELDS = ("dataset", "id", "method", "budget")
BASELINE = "none"
MEAN = "mean"  # the dataset name of the mean-over-datasets row (the paper's Avg column)


def _budget(b):
    """Budgets compare equal across int/float spellings (64 == 64.0)."""
    if isinstance(b, float) and b.is_integer():
        return int(b)
    return b


def record_key(record: dict) -> tuple:
    """``(dataset, id, method, budget)`` of a record."""
    return (record["dataset"], str(record["id"]), record["method"], _budget(record["budget"]))


def make_record(sample: Sample, dataset: str, method: str, budget, prediction: str, *,
                kept_tokens: int | None = None, timings_ms: dict | None = None, **extra) -> dict:
    """A scored record for one prediction (score None when the sample has no answers)."""
    if sample.answers is not None:
        score, extracted = score_one(sample, prediction)
    else:
        score, extracted = None, None
    rec = {
        "dataset": dataset, "id": sample.id, "method": method, "budget": _budget(budget),
        "kind": sample.kind, "prediction": prediction, "extracted": extracted,
        "answers": sample.answers, "score": score,
        "correct": None if score is None else score >= 1.0,
        "kept_tokens": kept_tokens, "timings_ms": timings_ms,
    }
    rec.update(extra)
    return rec


# --------------------------------------------------------------------------- writing


# how zoo's rows start (``RecordWriter``: make_record order; ``merge_shards``: sorted keys), so a
# torn first row is recognised as zoo's own
ROW_HEADS = (b'{"dataset": ', b'{"answers": ')


SHARD_FIELD = "zoo_shard"  # the signature of a torchrun shard's records (see the module docstring)


class RecordWriter:
    """Append records to a JSON Lines file, each flushed and fsynced as it is written.

    ``with RecordWriter(path) as w: w.write(record)``. Creates missing parent folders. The file
    must be new, empty or zoo's own records (``zoocli.outfile``: anything else is refused, never
    truncated); a torn last record is repaired; the output's lock is held while it is open.
    ``shard=(out, rank, world)``: write rank ``rank``'s shard of ``out`` instead, each record
    signed (``SHARD_FIELD``); an existing file there must be empty or that shard (else refused);
    the file is only created by the first record, so a rank with nothing to do leaves none.
    """

    def __init__(self, path=None, shard: tuple | None = None):
        self._sig = None
        if shard is not None:
            out, rank, world = shard
            path = shard_path(out, rank)
            self._sig = {"out": Path(out).name, "rank": int(rank), "world": int(world)}
            check_shard(out, rank)
        self.path = Path(path)
        self._out = None if shard is not None else JsonlOut(self.path, KEY_FIELDS, ROW_HEADS)

    def write(self, record: dict) -> None:
        if self._sig is not None:
            if self._out is None:
                self._out = JsonlOut(self.path, KEY_FIELDS, ROW_HEADS)
            record = {**record, SHARD_FIELD: self._sig}
        self._out.append(record)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- reading


def _paths(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def read_records(paths, missing_ok: bool = False) -> Iterator[dict]:
    """Records from one or more files, in file then line order; a torn last line is skipped."""
    for path in _paths(paths):
        if not check_regular(path, "records file") and missing_ok:
            continue
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            if missing_ok:
                continue
            raise ZooError(f"{path}: no such file") from None
        except OSError as e:
            raise ZooError(f"{path}: cannot read ({e.strerror})") from None
        lines = text.split("\n")
        last = len(lines) - 1  # the text after the final newline ("" for a clean file)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError
            except (ValueError, RecursionError):  # also: nesting too deep, an over-long integer
                if i == last:  # torn by a crash mid-write: that record will be redone
                    continue
                raise ZooError(f"{path}, line {i + 1}: not a valid JSON record; the file is "
                               f"damaged before its end (delete or fix that line)") from None
            for k in KEY_FIELDS:
                if k not in rec:
                    raise ZooError(f"{path}, line {i + 1}: record lacks the field '{k}'")
            yield rec


def done_keys(paths) -> set[tuple]:
    """Keys ``(dataset, id, method, budget)`` already recorded in ``paths`` (missing files: none).

    Pass every shard of a run, so a resume with another world size still skips finished work.
    """
    return {record_key(r) for r in read_records(paths, missing_ok=True)}


# --------------------------------------------------------------------------- shards


def shard(samples: Sequence, rank: int, world_size: int) -> list:
    """Round-robin share of ``samples`` for ``rank``: disjoint across ranks, together all of them."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise UsageError(f"rank must be an integer in [0, {world_size - 1}], got {rank!r}")
    return list(samples)[rank::world_size]


def shard_path(path, rank: int) -> Path:
    """``run.jsonl`` -> ``run.rank0.jsonl`` for rank 0."""
    p = Path(path)
    suffix = p.suffix or ".jsonl"
    return p.with_name(f"{p.stem if p.suffix else p.name}.rank{int(rank)}{suffix}")


def shard_paths(path, world_size: int) -> list[Path]:
    return [shard_path(path, r) for r in range(world_size)]


_RANK = re.compile(r"\.rank(\d+)\.[^.]+$")


def _rank_order(p: Path):
    m = _RANK.search(p.name)
    return (int(m.group(1)) if m else math.inf, str(p))


def find_shards(path) -> list[Path]:
    """The existing shard files of ``path`` (``run.rank*.jsonl``), in rank order."""
    p = Path(path)
    stem, suffix = (p.stem, p.suffix) if p.suffix else (p.name, ".jsonl")
    found = [q for q in p.parent.glob(f"{_glob_escape(stem)}.rank*{suffix}") if _RANK.search(q.name)]
    return sorted(found, key=_rank_order)


def is_shard_of(path, out, rank: int) -> bool:
    """True when every record of ``path`` (at least one) carries the shard signature of ``out``'s
    rank ``rank``: a shard a torchrun run wrote, the only kind zoo reads, merges or deletes."""
    name, seen = Path(out).name, False
    try:
        for rec in read_records(path, missing_ok=True):
            sig = rec.get(SHARD_FIELD)
            if not isinstance(sig, dict) or sig.get("out") != name or sig.get("rank") != rank:
                return False
            seen = True
    except ZooError:
        return False
    return seen


def _rank_of(p: Path) -> int:
    return int(_RANK.search(p.name).group(1))


def zoo_shards(path) -> list[Path]:
    """The shards of ``path`` that a torchrun run wrote (``is_shard_of``), in rank order; other
    files named like shards are left out (and so never merged nor deleted)."""
    return [p for p in find_shards(path) if is_shard_of(p, path, _rank_of(p))]


def check_shard(out, rank: int) -> None:
    """Refuse, in one line, rank ``rank``'s shard path of ``out`` when a file there is not empty
    and not that shard (a user's own ``run.rank3.jsonl``): zoo never writes into it."""
    p = shard_path(out, rank)
    if check_regular(p, "--out shard") and p.stat().st_size and not is_shard_of(p, out, rank):
        raise ZooError(f"{p} exists and is not a shard zoo wrote for --out {out} (rank {rank}); "
                       f"zoo neither writes into it nor merges it: move it away or give another --out")


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _sort_key(value):
    """None < numbers < percentages < other strings; digit strings sort as numbers ("2" < "10"),
    percentages by their value ("5%" < "11%" < "50%")."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    s = str(value)
    if s.isascii() and s.isdigit() and len(s) <= 4000:  # int() refuses longer digit strings
        return (1, int(s), "")
    if s.endswith("%") and s[:-1].replace(".", "", 1).isdigit() and s[:-1].isascii() and len(s) <= 64:
        return (2, float(s[:-1]), "")
    return (3, 0, s)


def _record_order(rec: dict):
    d, i, m, b = record_key(rec)
    return (str(d), str(m), _sort_key(b), _sort_key(i))


def merge_shards(paths, out) -> int:
    """Merge shard files into ``out``; returns the number of distinct records ``out`` then holds.

    ``out`` is only appended to, never replaced (a symlink stays a symlink; a crash leaves at
    worst a torn last line, repaired by the next writer): the records of ``paths`` whose key is
    not in ``out`` yet are appended, sorted by (dataset, method, budget, id), with sorted keys, so
    the same records give the same bytes whatever the order of ``paths``. When a key occurs more
    than once, the one already in ``out`` is kept, else the first in (rank, line) order.
    """
    out = Path(out)
    paths = sorted((p for p in _paths(paths) if not _same_file(p, out)), key=_rank_order)
    if not paths and not out.exists():
        raise ZooError("no shard files to merge")
    with JsonlOut(out, KEY_FIELDS, ROW_HEADS) as w:
        seen: dict[tuple, dict | None] = {record_key(r): None for r in read_records(out, missing_ok=True)}
        for rec in read_records(paths):
            rec.pop(SHARD_FIELD, None)  # a shard's signature: not part of the merged record
            seen.setdefault(record_key(rec), rec)
        new = sorted((r for r in seen.values() if r is not None), key=_record_order)
        w.append_many(new, sort_keys=True)
    return len(seen)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --------------------------------------------------------------------------- summary

METRICS = ("score", "accuracy", "precision", "recall", "f1")


def dataset_value(records: Sequence[dict], metric: str = "score") -> float | None:
    """One dataset's figure from its records: "score" = mean per-sample score; "accuracy",
    "precision", "recall", "f1" = POPE metrics (yes/no records only). None when nothing is scored."""
    if metric not in METRICS:
        raise UsageError(f"unknown metric '{metric}'; known: {', '.join(METRICS)}")
    scored = [r for r in records if r.get("score") is not None]
    if not scored:
        return None
    if metric == "score":
        return sum(float(r["score"]) for r in scored) / len(scored)
    yn = [r for r in scored if r.get("kind") == "yesno" and r.get("answers")]
    if not yn:
        return None
    return yes_no_metrics([r.get("extracted") for r in yn], [majority(r["answers"]) for r in yn])[metric]


def summarize(records: Iterable[dict], metric: str | dict = "score", baseline: str = BASELINE) -> list[dict]:
    """Rows ``{"method", "budget", "dataset", "n", "score", "retention"}`` per method x budget x
    dataset, then per method x budget one row with dataset ``MEAN`` (score and retention averaged
    over its datasets, the paper's Avg column; ``n`` = number of samples, ``datasets`` = count).

    ``metric``: one name for all datasets or ``{dataset: name}`` (e.g. ``{"pope": "f1"}``; others
    use "score"). ``retention`` = score / the baseline's score on that dataset (all baseline
    records of the dataset pooled, whatever their budget); None when there is no baseline or its
    score is 0. The mean retention is None when any dataset's is None. Duplicate keys: the last
    record wins. Order: the baseline first, then methods by name; budgets ascending; datasets by name.
    """
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[record_key(r)] = r
    groups: dict[tuple, list[dict]] = {}
    base: dict[str, list[dict]] = {}
    for (d, _i, m, b), r in latest.items():
        groups.setdefault((m, b, d), []).append(r)
        if m == baseline:
            base.setdefault(d, []).append(r)

    def metric_for(d: str) -> str:
        return metric.get(d, "score") if isinstance(metric, dict) else metric

    base_value = {d: dataset_value(rs, metric_for(d)) for d, rs in base.items()}
    rows: list[dict] = []
    combos = sorted({(m, b) for m, b, _d in groups},
                    key=lambda mb: (mb[0] != baseline, mb[0], _sort_key(mb[1])))
    for m, b in combos:
        per = []
        for d in sorted(d for mm, bb, d in groups if (mm, bb) == (m, b)):
            rs = groups[(m, b, d)]
            value = dataset_value(rs, metric_for(d))
            bv = base_value.get(d)
            retention = value / bv if value is not None and bv else None
            row = {"method": m, "budget": b, "dataset": d, "n": len(rs), "metric": metric_for(d),
                   "score": value, "retention": retention}
            rows.append(row)
            per.append(row)
        values = [r["score"] for r in per]
        rets = [r["retention"] for r in per]
        rows.append({
            "method": m, "budget": b, "dataset": MEAN, "n": sum(r["n"] for r in per),
            "datasets": len(per), "metric": "mean",
            "score": sum(values) / len(values) if per and None not in values else None,
            "retention": sum(rets) / len(rets) if per and None not in rets else None,
        })
    return rows
