"""The demo model's trained projector as a test case for the sensitivity estimators:
``python -m zoocli.demo.projector`` prints its singular spectra and how well each estimator
(fd, jvp, rank=k, and exact where this build has it, against ||J||_F) ranks the visual tokens of a few eval images
against the float64 reference, as Spearman rank correlations (``ops.spearman``).

Reference: S(i) = 1/m sum_j ||J(x_i) u_j||, the h -> 0 limit of Eq. 2 with the same directions
``sensitivity.directions`` draws, J by ``torch.func.jvp`` of a float64 copy of the projector.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import Tensor, nn

from zoocli import ops
from zoocli.demo import cli_description, positive_int, run_cli
from zoocli.sensitivity import ESTIMATORS, directions, token_sensitivity

RANKS = (4, 8, 16, 32, 64, 128)


def reference(x: Tensor, projector: nn.Module, m: int = 64, seed: int = 0) -> Tensor:
    """float64 [N]: 1/m sum_j ||J(x_i) u_j|| with the estimators' own directions."""
    p64 = copy.deepcopy(projector).to(torch.float64)
    x64 = x.detach().to(torch.float64)
    u = directions(m, x.shape[1], seed, x.device).to(torch.float64)  # [m, d_in]
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    for j in range(m):
        _, t = torch.func.jvp(p64, (x64,), (u[j].expand_as(x64),))
        out += t.norm(dim=-1)
    return out / m


def frobenius_reference(x: Tensor, projector: nn.Module) -> Tensor:
    """float64 [N]: ||J(x_i)||_F / sqrt(d_in), the m -> inf limit in root-mean-square form (what an
    ``exact`` estimator computes), from d_in float64 JVPs along the basis vectors."""
    p64 = copy.deepcopy(projector).to(torch.float64)
    x64 = x.detach().to(torch.float64)
    sq = torch.zeros(x.shape[0], dtype=torch.float64)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x64)
        e[:, j] = 1.0
        _, t = torch.func.jvp(p64, (x64,), (e,))
        sq += (t**2).sum(dim=-1)
    return (sq / x.shape[1]).sqrt()


def estimates(x: Tensor, projector: nn.Module, ranks=RANKS) -> dict[str, Tensor]:
    """The sampled estimators (m=64, h=0.01, seed 0), each named explicitly."""
    out = {"fd": token_sensitivity(x, projector, estimator="fd"),
           "jvp": token_sensitivity(x, projector, estimator="jvp")}
    for k in ranks:
        out[f"fd rank={k}"] = token_sensitivity(x, projector, estimator="fd", rank=k)
        out[f"jvp rank={k}"] = token_sensitivity(x, projector, estimator="jvp", rank=k)
    return out


def spectra(projector: nn.Module) -> dict[str, Tensor]:
    """Singular values of each Linear of the projector (float64, descending)."""
    return {name: torch.linalg.svdvals(mod.weight.detach().to(torch.float64))
            for name, mod in projector.named_modules() if isinstance(mod, nn.Linear)}


def main(argv=None) -> int:
    from zoocli.adapters import load_adapter
    from zoocli.demo.evalset import shipped_eval_dir
    from zoocli.evaluation.samples import load_samples
    from zoocli.images import load_image

    p = argparse.ArgumentParser(prog="python -m zoocli.demo.projector", description=cli_description(__doc__))
    p.add_argument("--images", type=positive_int, default=5, help="first N eval images")
    p.add_argument("--model", default="demo-llava", help="a LLaVA checkpoint (default: the shipped demo)")
    args = p.parse_args(argv)
    adapter = load_adapter(args.model, device="cpu", dtype="fp32")
    root = shipped_eval_dir()
    images = list(dict.fromkeys(s.image for s in load_samples(root / "questions.jsonl", image_root=root)))
    rho: dict[str, list[float]] = {}
    for path in images[: args.images]:
        enc = adapter.encode(adapter.prepare(load_image(path), "What color is the circle?"))
        ref = reference(enc.vision, adapter.projector)
        for name, s in estimates(enc.vision, adapter.projector).items():
            rho.setdefault(name, []).append(float(ops.spearman(s.double(), ref)))
        if "exact" in ESTIMATORS:  # against its own (root-mean-square) float64 reference
            s = token_sensitivity(enc.vision, adapter.projector, estimator="exact")
            ref_f = frobenius_reference(enc.vision, adapter.projector)
            rho.setdefault("exact (vs ||J||_F)", []).append(float(ops.spearman(s.double(), ref_f)))
    print(f"Spearman vs the float64 reference (mean / min over {args.images} images, 144 tokens each):")
    for name, v in rho.items():
        print(f"  {name:13s} {sum(v) / len(v):.4f} / {min(v):.4f}")
    for name, sv in spectra(adapter.projector).items():
        rel = (sv / sv[0]).tolist()
        energy = (sv**2).cumsum(0) / (sv**2).sum()
        ks = {k: float(energy[k - 1]) for k in RANKS if k <= sv.numel()}
        print(f"projector.{name} {tuple(adapter.projector.get_submodule(name).weight.shape)}: "
              f"sigma_1 {sv[0]:.3f}; sigma_k/sigma_1 at k=1,2,4,8,16,32,64,128: "
              + " ".join(f"{rel[k - 1]:.3f}" for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= len(rel))
              + "; energy in top k: " + " ".join(f"k={k} {e:.3f}" for k, e in ks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
