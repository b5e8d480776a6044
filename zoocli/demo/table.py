"""Per-question-type accuracy and retention from ``zoo eval --out`` predictions on the demo eval set:
``python -m zoocli.demo.table PREDICTIONS.jsonl``.

``zoo eval`` reports overall scores; the demo eval set's ids are ``<type>-<scene>``, so this groups
the stored records by (method, budget) and question type. Retention = score / the unpruned
(``none``) score of the same type. Prints a Markdown table (rendering only; the scores are the
records' own).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from zoocli.demo import cli_description, run_cli
from zoocli.demo.evalset import qtype_of
from zoocli.demo.world import QTYPES

BASELINE = "none"


def scores(records) -> dict[tuple[str, str], dict[str, float]]:
    """(method, budget) -> {qtype | "overall": mean score}; budget "" for the baseline."""
    acc: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        key = (r["method"], "" if r["method"] == BASELINE else str(r["budget"]))
        acc[key][qtype_of(r["id"])].append(float(r["score"]))
        acc[key]["overall"].append(float(r["score"]))
    return {k: {t: sum(v) / len(v) for t, v in d.items()} for k, d in acc.items()}


def markdown(table: dict[tuple[str, str], dict[str, float]], n: int) -> str:
    cols = [t for t in (*QTYPES, "overall")]
    base = table.get((BASELINE, ""))
    head = "| method | budget | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for (method, budget), s in table.items():
        cells = []
        for t in cols:
            v = s.get(t)
            if v is None:
                cells.append("-")
            elif base is None or method == BASELINE or not base.get(t):
                cells.append(f"{100 * v:.1f}")
            else:
                cells.append(f"{100 * v:.1f} ({100 * v / base[t]:.0f}%)")
        lines.append(f"| {method} | {budget or 'all'} | " + " | ".join(cells) + " |")
    lines.append(f"\n{n} predictions; cells: exact-match score % (retention vs. unpruned, same type)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoocli.demo.table", description=cli_description(__doc__))
    p.add_argument("predictions", type=Path)
    args = p.parse_args(argv)
    try:
        records = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {args.predictions}: {e}", file=sys.stderr)
        return 2
    print(markdown(scores(records), len(records)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
