"""Do the projector's most sensitive tokens sit on the shapes? ``python -m zoocli.demo.heat``.

For the first N images of the shipped eval set: the ZOO sensitivity of every visual token
(``token_sensitivity`` with the default ``exact`` estimator and with the paper's fd, m=64, h=0.01,
seed 0), the top ``--top`` share of tokens,
and the fraction of those whose 28 x 28 patch holds at least one shape (non-background) pixel,
next to that fraction over all 144 tokens (what a random choice would give).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from zoocli import ops
from zoocli.demo import cli_description, positive_int, run_cli
from zoocli.demo import model as dm
from zoocli.demo import world


def shape_patches(image) -> np.ndarray:
    """[144] bool: the patch holds a pixel that is not the background colour."""
    px = np.asarray(image.convert("RGB"))
    g, p = dm.GRID, dm.PATCH
    fg = (px != np.asarray(world.BACKGROUND)).any(-1)
    return fg.reshape(g, p, g, p).any(axis=(1, 3)).reshape(-1)


def top_share(text: str) -> float:
    """An argparse type: a share of the tokens, 0 < share <= 1."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, not {text}")
    return value


def top_on_shapes(scores: torch.Tensor, on_shape: np.ndarray, share: float) -> float:
    k = max(1, round(share * scores.numel()))
    top = ops.stable_topk(scores, k)
    return float(on_shape[np.asarray(top.tolist())].mean())


def main(argv=None) -> int:
    from zoocli.adapters import load_adapter
    from zoocli.demo.evalset import shipped_eval_dir
    from zoocli.evaluation.samples import load_samples
    from zoocli.images import load_image
    from zoocli.sensitivity import token_sensitivity

    p = argparse.ArgumentParser(prog="python -m zoocli.demo.heat", description=cli_description(__doc__))
    p.add_argument("--images", type=positive_int, default=30)
    p.add_argument("--top", type=top_share, default=0.25, help="share of tokens counted as 'top' (0 < share <= 1)")
    p.add_argument("--model", default="demo-llava")
    args = p.parse_args(argv)
    adapter = load_adapter(args.model, device="cpu", dtype="fp32")
    root = shipped_eval_dir()
    samples = load_samples(root / "questions.jsonl", image_root=root)
    first = {}
    for s in samples:
        first.setdefault(s.image, s.question)
    top_frac, base = {"exact": [], "fd": []}, []
    for path, question in list(first.items())[: args.images]:
        image = load_image(path)
        enc = adapter.encode(adapter.prepare(image, question))
        on = shape_patches(image)
        for estimator, fracs in top_frac.items():
            scores = token_sensitivity(enc.vision, adapter.projector, estimator=estimator)
            fracs.append(top_on_shapes(scores, on, args.top))
        base.append(float(on.mean()))
    for estimator, fracs in top_frac.items():
        print(f"{len(fracs)} images, {estimator}: top {args.top:.0%} most sensitive tokens on shape patches: "
              f"mean {np.mean(fracs):.3f} (min {np.min(fracs):.3f}); all tokens: mean {np.mean(base):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
