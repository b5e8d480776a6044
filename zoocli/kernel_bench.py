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

import copy
import platform

import torch
from torch import Tensor, nn

from zoocli.ops import spearman
from zoocli.sensitivity import lowrank_factor, projector_structure, token_sensitivity
from zoocli.sensitivity.exact import exact_matrices, forget_matrices
from zoocli.timing import Timer, device_sync, summarize


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


class MergerLike(nn.Module):
    """A Qwen2.5-VL-shaped patch merger (RMSNorm ``ln_q`` per patch of ``d_v``, then ``mlp`` =
    Linear-GELU-Linear on the ``groups`` * d_v concatenation), built here so the benchmark needs no
    transformers import; ``zoocli.sensitivity`` recognises it like the real one."""

    def __init__(self, d_v: int, groups: int, d_hidden: int, d_out: int):
        super().__init__()
        self.d_v = d_v
        self.ln_q = nn.RMSNorm(d_v, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(groups * d_v, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


def bench_merger(d_v=1280, groups=4, d_hidden=5120, d_out=3584, seed=0) -> MergerLike:
    """The Qwen2.5-VL-7B merger shape (5120 -> 5120 -> 3584) with ``bench_projector``'s scales."""
    g = torch.Generator().manual_seed(seed + 3)
    p = MergerLike(d_v, groups, d_hidden, d_out)
    mlp = bench_projector(groups * d_v, d_hidden, d_out, "decay", seed)
    with torch.no_grad():
        p.mlp.load_state_dict(mlp.state_dict())
        p.ln_q.weight.copy_(0.5 + torch.rand(d_v, generator=g))
    return p.eval()


def mc_reference(x: Tensor, rows, n_dirs: int, seed: int, chunk: int = 128) -> Tensor:
    """E_u ||J(x_i) u|| in float64 over ``n_dirs`` unit Gaussian directions (the paper's quantity,
    Prop. 3.1): exact Jacobian-vector products (``torch.func.jvp``) of a float64 function ``rows``
    [R, d_in] -> [R, d], token by token, directions in chunks. Slow and obvious, for reference."""
    g = torch.Generator().manual_seed(seed + 1000)
    u = torch.randn(n_dirs, x.shape[1], generator=g, dtype=torch.float64).to(x.device)
    u /= u.norm(dim=-1, keepdim=True)
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t:t + 1].double()
        for a in range(0, n_dirs, chunk):
            ub = u[a:a + chunk]
            _, jv = torch.func.jvp(rows, (xt.expand(ub.shape[0], -1).contiguous(),), (ub,))
            out[t] += float(jv.detach().norm(dim=-1).sum())
    return out / n_dirs


def structured_reference(x: Tensor, proj: nn.Module, n_dirs: int, seed: int,
                         chunk_mb: float = 256) -> tuple[Tensor, Tensor]:
    """E_u ||J(x_i) u|| in float64 for a Linear-act-Linear projector, J_i = W2 diag(a_i) W1 with
    a_i = act'(W1 x_i + b1): ``n_dirs`` unit Gaussian directions shared by all tokens, W1 u once
    per direction, then per token W2 (a_i * W1 u) for all directions, tokens in chunks under
    ``chunk_mb``. Returns the means over the two direction halves (independent estimates: their
    Spearman is the reference's own split-half reliability; the reference is their average).
    Everything in float64; for the rows of ``zoocli.sensitivity``'s LLaVA structure only."""
    from zoocli.sensitivity.structure import act_prime

    s = projector_structure(proj)
    if s is None or s.norm is not None:
        raise ValueError("structured_reference needs a plain Linear-act-Linear projector")
    dev = x.device
    g = torch.Generator().manual_seed(seed + 1000)
    u = torch.randn(n_dirs, x.shape[1], generator=g, dtype=torch.float64).to(dev)
    u /= u.norm(dim=-1, keepdim=True)
    w1, w2 = s.lin1.weight.detach().double(), s.lin2.weight.detach().double()
    b1 = None if s.lin1.bias is None else s.lin1.bias.detach().double()
    act = copy.deepcopy(s.act).double()
    a = act_prime(act, nn.functional.linear(x.double(), w1, b1))  # [N, d_h]
    v = u @ w1.T  # [D, d_h]: W1 u, once per direction
    norms = torch.empty(x.shape[0], n_dirs, dtype=torch.float64, device=dev)
    per_token = n_dirs * (w1.shape[0] + w2.shape[0]) * 8 / 2**20  # MB of one token's products
    step = max(1, int(chunk_mb // max(per_token, 1e-9)))
    for t in range(0, x.shape[0], step):
        y = (a[t:t + step, None, :] * v).reshape(-1, v.shape[1]) @ w2.T  # [c * D, d_out]
        norms[t:t + step] = y.norm(dim=-1).view(-1, n_dirs)
    half = n_dirs // 2
    return norms[:, :half].mean(1).cpu(), norms[:, half:2 * half].mean(1).cpu()


def _rows64(proj: nn.Module):
    p64 = copy.deepcopy(proj).double()
    if isinstance(proj, MergerLike):
        return lambda r: p64(r.reshape(-1, proj.d_v)).reshape(r.shape[0], -1)
    return p64


def _timed(timer, x, proj, warmup, repeats, **kw):
    out = None
    for _ in range(warmup):
        out = token_sensitivity(x, proj, **kw)
    ms = []
    for _ in range(repeats):
        t0 = timer.now()
        out = token_sensitivity(x, proj, **kw)
        ms.append((timer.now() - t0) * 1e3)
    return out, summarize(ms)


def _exact_rows(timer, dev, x, proj, base, label, warmup, repeats):
    """The one-time M row and the warm ``exact`` row (scores returned for the Spearman columns)."""
    s = projector_structure(proj)
    forget_matrices(s)
    t0 = timer.now()
    exact_matrices(s, dev)
    once = (timer.now() - t0) * 1e3
    m_row = {**base, "name": "exact: M = (W1 W1^T) o (W2^T W2) (once, cached)", "estimator": "exact-M",
             "rank": None, "spectrum": label, "median_ms": once, "min_ms": once, "max_ms": once}
    scores, st = _timed(timer, x, proj, warmup, repeats, estimator="exact")
    return scores, [m_row, {**base, "name": "exact", "estimator": "exact", "rank": None,
                            "spectrum": label, **_ms(st)}]


def _reference_columns(rows: list[dict], scores: list[Tensor], x, proj, ref_tokens, ref_dirs, seed):
    """Spearman of each scored row against the float64 many-direction reference (first
    ``ref_tokens`` tokens, ``ref_dirs`` shared directions), and the reference's own split-half
    Spearman (two independent direction halves: the ceiling a noisy reference allows)."""
    if not ref_tokens:
        return
    xr = x[:ref_tokens]
    if projector_structure(proj) is not None and projector_structure(proj).norm is None:
        ha, hb = structured_reference(xr, proj, ref_dirs, seed)
        ref, how = (ha + hb) / 2, "float64 E_u||J u|| (structured: W2 (a_i * W1 u))"
    else:
        rows64 = _rows64(proj)  # one float64 copy of the projector for both halves
        ha = mc_reference(xr, rows64, ref_dirs // 2, seed)
        hb = mc_reference(xr, rows64, ref_dirs - ref_dirs // 2, seed + 1)
        ref, how = (ha * (ref_dirs // 2) + hb * (ref_dirs - ref_dirs // 2)) / ref_dirs, "float64 E_u||J u|| (jvp)"
    split = spearman(ha, hb)
    for r, sc in zip(rows, scores, strict=True):
        r.update(spearman_vs_ref=spearman(sc[:ref_tokens], ref), ref_tokens=xr.shape[0],
                 ref_dirs=ref_dirs, ref=how, ref_split_half_spearman=split,
                 ref_reliability=2 * split / (1 + split))  # Spearman-Brown: the full reference's


def sensitivity_bench(device="cpu", n=576, d_in=1024, d_hidden=4096, d_out=4096, m=64, repeats=3,
                      warmup=1, ranks=(128,), seed=0, estimators=("naive", "fd", "jvp"),
                      ref_tokens=128, ref_dirs=1024, merger=(1280, 4, 5120, 3584),
                      merger_ref=(48, 256), progress=None) -> list[dict]:
    """Time the estimators on a LLaVA-1.5-7B-sized projector (and the Qwen2.5-VL merger shape);
    rows are JSON-able dicts.

    Each timed row has median/min/max ms over ``repeats`` (after ``warmup`` untimed runs) and,
    where the run has them, the speed-up of its median over the naive and the fd (m) medians of
    the same run, the Spearman correlation with the naive scores and with a float64
    many-direction reference on the first ``ref_tokens`` tokens with ``ref_dirs`` shared
    directions (``structured_reference`` for the LLaVA projector, ``mc_reference`` for the
    merger; 0 skips it), next to the reference's own split-half Spearman (its ceiling). One-time
    costs (the SVD of ``rank``, the M of ``exact``) have their own rows. ``estimators`` picks the sampled ones to time (``exact`` always runs); ``merger``
    is the merger shape (d_v, patches, d_hidden, d_out) for ``merger_bench``, None skips it;
    ``merger_ref`` caps its reference size (tokens, directions) below ``ref_tokens`` x
    ``ref_dirs``: the jvp reference costs a full projector pass per (token, direction).
    ``progress(stage)`` after each stage (``kernel_steps`` of them with these arguments).
    """
    done = progress or (lambda stage: None)
    dev = torch.device(device)
    timer = Timer(sync=lambda: device_sync(dev))
    x = clip_like(n, d_in, seed).to(dev)
    base = {"device": str(dev), "n": n, "m": m, "d_in": d_in, "d_hidden": d_hidden, "d_out": d_out,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    proj = bench_projector(d_in, d_hidden, d_out, "decay", seed).to(dev)
    rows, scored, ref = _sampled_rows(timer, x, proj, base, "decay", m, seed, warmup, repeats, estimators)
    done("sampled estimators")
    ex, ex_rows = _exact_rows(timer, dev, x, proj, base, "decay", warmup, repeats)
    rows += ex_rows
    scored.append((ex_rows[1], ex))
    _speedups(scored, ref, rows)
    done("exact")
    if ref_tokens:
        _reference_columns([r for r, _ in scored], [sc for _, sc in scored], x, proj, ref_tokens,
                           ref_dirs, seed)
        done("float64 reference")
    if "naive" in estimators and ranks:
        naive_ms = next(r["median_ms"] for r in rows if r["estimator"] == "naive")
        rows += _rank_rows(timer, dev, x, proj, base, m, seed, warmup, repeats, ranks, ref, naive_ms,
                           d_in, d_hidden, d_out)
        done("low rank")
    if merger:
        rows += merger_bench(timer, dev, n, m, seed, warmup, repeats, min(ref_tokens, merger_ref[0]),
                             min(ref_dirs, merger_ref[1]), merger)
        done("Qwen2.5-VL merger")
    return rows


def kernel_steps(estimators=("naive", "fd", "jvp"), ranks=(128,), ref_tokens=48,
                 merger=(1280, 4, 5120, 3584)) -> int:
    """The stages ``sensitivity_bench`` reports through ``progress`` with these arguments."""
    return 2 + bool(ref_tokens) + bool("naive" in estimators and ranks) + bool(merger)


def _sampled_rows(timer, x, proj, base, label, m, seed, warmup, repeats, estimators):
    rows, scored, ref = [], [], None
    for est in ("naive", "fd", "jvp"):
        if est not in estimators:
            continue
        sc, st = _timed(timer, x, proj, warmup, repeats, m=m, seed=seed, estimator=est)
        name = "naive two-pass" if est == "naive" else est  # the names the CLI table shows
        rows.append({**base, "name": name, "estimator": est, "rank": None, "spectrum": label, **_ms(st)})
        scored.append((rows[-1], sc))
        if est == "naive":
            ref = sc
    return rows, scored, ref


def _speedups(scored, naive_scores, rows) -> None:
    med = {r["estimator"]: r["median_ms"] for r, _ in scored}
    for r, sc in scored:
        if "naive" in med:
            r["speedup_vs_naive"] = med["naive"] / r["median_ms"]
            r["spearman_vs_naive"] = spearman(sc, naive_scores)
            if r["estimator"] != "naive":
                r["max_rel_diff_vs_naive"] = float(((sc - naive_scores).abs() / naive_scores.abs()).max())
        if "fd" in med:
            r["speedup_vs_fd"] = med["fd"] / r["median_ms"]


def merger_bench(timer, dev, n, m, seed, warmup, repeats, ref_tokens, ref_dirs,
                 shape=(1280, 4, 5120, 3584)) -> list[dict]:
    """exact vs fd (m) on the Qwen2.5-VL-7B merger shape (default: n merged tokens of 4 x 1280 ->
    5120 -> 3584); ``shape`` = (d_v, patches, d_hidden, d_out)."""
    proj = bench_merger(*shape, seed=seed).to(dev)
    d_in = proj.mlp[0].in_features
    g = torch.Generator().manual_seed(seed + 11)
    x = (clip_like(shape[1] * n, proj.d_v, seed) + torch.randn(1, proj.d_v, generator=g)).reshape(n, d_in).to(dev)
    base = {"device": str(dev), "n": n, "m": m, "d_in": d_in, "d_hidden": proj.mlp[0].out_features,
            "d_out": proj.mlp[2].out_features, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    label = "decay (Qwen2.5-VL merger)"
    rows, scored, _ = _sampled_rows(timer, x, proj, base, label, m, seed, warmup, repeats, ("fd",))
    ex, ex_rows = _exact_rows(timer, dev, x, proj, base, label, warmup, repeats)
    rows += ex_rows
    scored.append((ex_rows[1], ex))
    _speedups(scored, None, rows)
    _reference_columns([r for r, _ in scored], [sc for _, sc in scored], x, proj, ref_tokens,
                       ref_dirs, seed)
    return rows


def _rank_rows(timer, dev, x, proj, base, m, seed, warmup, repeats, ranks, ref, naive_ms, d_in,
               d_hidden, d_out) -> list[dict]:
    """fd rank=k on the decaying and on a flat W2 spectrum (the SVD on its own row)."""
    rows: list[dict] = []
    flat = bench_projector(d_in, d_hidden, d_out, "flat", seed + 1).to(dev) if ranks else None
    flat_ref = token_sensitivity(x, flat, m=m, seed=seed, estimator="naive") if ranks else None
    for k in ranks:
        for spectrum, p, r in (("decay", proj, ref), ("flat", flat, flat_ref)):
            t0 = timer.now()
            lowrank_factor(p[2], k, dev)
            svd_ms = (timer.now() - t0) * 1e3
            rows.append({**base, "name": f"svd rank={k} (once, cached)", "estimator": "svd", "rank": k,
                         "spectrum": spectrum, "median_ms": svd_ms, "min_ms": svd_ms, "max_ms": svd_ms})
            s, st = _timed(timer, x, p, warmup, repeats, m=m, seed=seed, estimator="fd", rank=k)
            rows.append({**base, "name": f"fd rank={k}", "estimator": "fd", "rank": k,
                         "spectrum": spectrum, **_ms(st), "speedup_vs_naive": naive_ms / st["median"],
                         "spearman_vs_naive": spearman(s, r),
                         "mean_rel_diff_vs_naive": float(((s - r).abs() / r.abs()).mean())})
    return rows


def _ms(st: dict) -> dict:
    return {"median_ms": st["median"], "min_ms": st["min"], "max_ms": st["max"]}


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (for BENCHMARKS.md)."""
    head = ("| estimator | W2 spectrum | median ms | min ms | max ms | speed-up vs naive | "
            "speed-up vs fd | Spearman vs naive | Spearman vs float64 ref | ref split-half |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in rows:
        lines.append(f"| {r['name']} | {r['spectrum']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | "
                     f"{r['max_ms']:.0f} | {f(r.get('speedup_vs_naive'), '.1f')} | "
                     f"{f(r.get('speedup_vs_fd'), '.1f')} | {f(r.get('spearman_vs_naive'), '.4f')} | "
                     f"{f(r.get('spearman_vs_ref'), '.4f')} | {f(r.get('ref_split_half_spearman'), '.4f')} |")
    return "\n".join(lines)
