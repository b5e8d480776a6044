"""Write an eval set of the synthetic world: ``python -m zoocli.demo.evalset OUT_DIR --seed S``.

OUT_DIR gets ``images/scene-NNNN.png`` and ``questions.jsonl`` in the plain format that
``zoo eval FILE --image-root OUT_DIR`` reads: ``{"id", "image", "question", "answer"}``, the id
``<type>-<scene>`` (type = color, exists, count or leftright). Scenes come from ``world.scenes(seed)``;
every question a scene has is asked, until at least ``--questions`` are written. The shipped set
(``zoocli/data/demo-eval``) is seed 14, which training does not use (training: 0, held-out: 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoocli.demo import check_new_folder, cli_description, positive_int, run_cli, world

SHIPPED_SEED = 14


def shipped_eval_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "demo-eval"


def qtype_of(sample_id: str) -> str:
    """The question type of an eval-set id (``<type>-<scene>``)."""
    return sample_id.split("-", 1)[0]


def write_eval_set(out_dir: Path, seed: int = SHIPPED_SEED, questions: int = 400) -> Path:
    """Write the images and ``questions.jsonl``; returns the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines, gen, scene = [], world.scenes(seed), 0
    while len(lines) < questions:
        shapes, qs = next(gen)
        name = f"images/scene-{scene:04d}.png"
        world.render(shapes).save(out_dir / name, optimize=True)
        for q in qs:
            lines.append({"id": f"{q.qtype}-{scene:04d}", "image": name, "question": q.question, "answer": q.answer})
        scene += 1
    path = out_dir / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoocli.demo.evalset", description=cli_description(__doc__))
    p.add_argument("out", type=Path, help="a new or empty folder (the shipped set is zoocli/data/demo-eval)")
    p.add_argument("--seed", type=int, default=SHIPPED_SEED)
    p.add_argument("--questions", type=positive_int, default=400)
    args = p.parse_args(argv)
    check_new_folder(p, args.out, "OUT_DIR")
    path = write_eval_set(args.out, args.seed, args.questions)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
