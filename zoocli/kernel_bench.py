"""Micro-benchmark of the ZOO-Prune sensitivity estimators (``zoocli.sensitivity``). Not a test.

``sensitivity_bench`` times the naive two-pass finite difference (Eq. 2-3 as the official code
computes it, but in fp32 and chunked) against the structured ``fd``, ``jvp`` and low-rank
estimators on a LLaVA-1.5-7B-sized projector (1024 -> 4096 -> 4096, GELU). Clock reads are
device-synchronised (``zoocli.timing``); warm-up runs are left out of the figures; the SVD of the
low-rank option is computed before timing and reported once on its own row.

The second Linear gets a decaying singular spectrum, sigma_i proportional to 1/(1 + i/32), with
random orthogonal U and V, like trained weights. Another row runs rank-k on a flat random
spectrum (a plain Gaussian W2), to show when the low-rank option should not be used. Inputs look
like CLIP features: N(0, 1) per channel with per-token log-normal scales and a few large-magnitude
channels.
"""

from __future__ import annotations

import platform

import torch
from torch import Tensor, nn

from zoocli.sensitivity import lowrank_factor, token_sensitivity
from zoocli.timing import Timer, device_sync, summarize


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors (ties broken by position)."""
    def ranks(v: Tensor) -> Tensor:
        r = torch.empty(v.numel(), dtype=torch.float64)
        r[torch.argsort(v.flatten().double().cpu(), stable=True)] = torch.arange(v.numel(), dtype=torch.float64)
        return r - r.mean()
    ra, rb = ranks(a), ranks(b)
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-300))


def _orthogonal(n: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q * torch.sign(torch.diagonal(r))


def bench_projector(d_in: int, d_hidden: int, d_out: int, spectrum: str, seed: int) -> nn.Sequential:
    """A LLaVA-style Linear-GELU-Linear projector with realistic scales (fp32, CPU).

    W1 ~ N(0, 1/d_in) so pre-activations are O(1) on CLIP-like inputs. W2 has Frobenius
    norm about sqrt(d_out). ``spectrum`` is "decay" (sigma_i ~ 1/(1 + i/32), random
    orthogonal U, V) or "flat" (plain Gaussian).
    """
    g = torch.Generator().manual_seed(seed)
    p = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
    with torch.no_grad():
        p[0].weight.copy_(torch.randn(d_hidden, d_in, generator=g) / d_in**0.5)
        p[0].bias.copy_(0.1 * torch.randn(d_hidden, generator=g))
        p[2].bias.copy_(0.1 * torch.randn(d_out, generator=g))
        if spectrum == "flat":
            p[2].weight.copy_(torch.randn(d_out, d_hidden, generator=g) / d_hidden**0.5)
        elif spectrum == "decay":
            k = min(d_out, d_hidden)
            s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32) / 32)
            s *= (d_out**0.5) / s.norm()
            uo = _orthogonal(d_out, g)[:, :k]
            vo = _orthogonal(d_hidden, g)[:, :k]
            p[2].weight.copy_((uo * s) @ vo.T)
        else:
            raise ValueError(f"unknown spectrum {spectrum!r}")
    return p.eval()


def clip_like(n: int, d: int, seed: int, outliers: int = 4, scale: float = 20.0) -> Tensor:
    """N(0,1) features with per-token log-normal scales and ``outliers`` large channels."""
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(n, d, generator=g) * torch.exp(0.3 * torch.randn(n, 1, generator=g))
    ch = torch.randperm(d, generator=g)[:outliers]
    sign = torch.where(torch.rand(outliers, generator=g) < 0.5, -1.0, 1.0)
    x[:, ch] = sign * scale * (1 + 0.1 * torch.randn(n, outliers, generator=g))
    return x


def sensitivity_bench(device="cpu", n=576, d_in=1024, d_hidden=4096, d_out=4096, m=64, repeats=3,
                      warmup=1, ranks=(128,), seed=0, progress=None) -> list[dict]:
    """Time naive / fd / jvp / fd+rank on one projector; rows are JSON-able dicts.
    ``progress(name)`` after each timed estimator (``kernel_steps(ranks)`` of them).

    Each timed row has median/min/max ms over ``repeats`` (after ``warmup`` untimed runs), the
    speed-up of its median over the naive median from the same run, and the Spearman correlation
    of its scores with the naive scores. The SVD rows give the one-off factorisation time.
    """
    dev = torch.device(device)
    timer = Timer(sync=lambda: device_sync(dev))
    x = clip_like(n, d_in, seed).to(dev)
    base = {"device": str(dev), "n": n, "m": m, "d_in": d_in, "d_hidden": d_hidden, "d_out": d_out,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}

    def timed(proj, **kw):
        out, st = _timed(proj, **kw)
        if progress is not None:
            progress(f"{kw['estimator']}" + (f" rank={kw['rank']}" if kw.get("rank") else ""))
        return out, st

    def _timed(proj, **kw):
        out = None
        for _ in range(warmup):
            out = token_sensitivity(x, proj, m=m, seed=seed, **kw)
        ms = []
        for _ in range(repeats):
            t0 = timer.now()
            out = token_sensitivity(x, proj, m=m, seed=seed, **kw)
            ms.append((timer.now() - t0) * 1e3)
        return out, summarize(ms)

    rows: list[dict] = []
    proj = bench_projector(d_in, d_hidden, d_out, "decay", seed).to(dev)
    ref, st = timed(proj, estimator="naive")
    naive_ms = st["median"]
    rows.append({**base, "name": "naive two-pass", "estimator": "naive", "rank": None,
                 "spectrum": "decay", **_ms(st), "speedup_vs_naive": 1.0, "spearman_vs_naive": 1.0})
    for est in ("fd", "jvp"):
        s, st = timed(proj, estimator=est)
        rows.append({**base, "name": est, "estimator": est, "rank": None, "spectrum": "decay",
                     **_ms(st), "speedup_vs_naive": naive_ms / st["median"],
                     "spearman_vs_naive": spearman(s, ref),
                     "max_rel_diff_vs_naive": float(((s - ref).abs() / ref.abs()).max())})
    flat = bench_projector(d_in, d_hidden, d_out, "flat", seed + 1).to(dev) if ranks else None
    flat_ref = token_sensitivity(x, flat, m=m, seed=seed, estimator="naive") if ranks else None
    for k in ranks:
        for spectrum, p, r in (("decay", proj, ref), ("flat", flat, flat_ref)):
            t0 = timer.now()
            lowrank_factor(p[2], k, dev)
            svd_ms = (timer.now() - t0) * 1e3
            rows.append({**base, "name": f"svd rank={k} (once, cached)", "estimator": "svd", "rank": k,
                         "spectrum": spectrum, "median_ms": svd_ms, "min_ms": svd_ms, "max_ms": svd_ms})
            s, st = timed(p, estimator="fd", rank=k)
            rows.append({**base, "name": f"fd rank={k}", "estimator": "fd", "rank": k,
                         "spectrum": spectrum, **_ms(st), "speedup_vs_naive": naive_ms / st["median"],
                         "spearman_vs_naive": spearman(s, r),
                         "mean_rel_diff_vs_naive": float(((s - r).abs() / r.abs()).mean())})
    return rows


def kernel_steps(ranks=(128,)) -> int:
    """Timed estimators of ``sensitivity_bench``: naive, fd, jvp, then fd+rank on two spectra."""
    return 3 + 2 * len(ranks)


def _ms(st: dict) -> dict:
    return {"median_ms": st["median"], "min_ms": st["min"], "max_ms": st["max"]}


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (for BENCHMARKS.md)."""
    head = "| estimator | W2 spectrum | median ms | min ms | max ms | speed-up vs naive | Spearman vs naive |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = r.get("speedup_vs_naive")
        rho = r.get("spearman_vs_naive")
        lines.append(f"| {r['name']} | {r['spectrum']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | "
                     f"{r['max_ms']:.0f} | {'' if sp is None else f'{sp:.1f}x'} | "
                     f"{'' if rho is None else f'{rho:.4f}'} |")
    return "\n".join(lines)
