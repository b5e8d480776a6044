"""VisPruner, CDPruner, downsample and ZOO-Prune's norm ablation against slow, obvious float64
references and against the official code's arithmetic re-expressed here (kept sets identical in
fp32 on random inputs)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from zoocli.errors import UsageError
from zoocli.methods import PruneInputs, parse_method_spec, select
from zoocli.methods.cdpruner import cdpruner_kernel, cdpruner_relevance, dpp_greedy
from zoocli.methods.downsample import pool_plan
from zoocli.methods.vispruner import vispruner_select


def _rand(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def _cos64(z):
    z = z.double()
    z = z / z.norm(dim=-1, keepdim=True)
    return z @ z.T


# ------------------------------------------------------------------------------------ norm


def _norm_reference(z: torch.Tensor, k: int) -> list[int]:
    """ZOO-Prune's Algorithm 1 with S = ||Z_i||, float64, Python loops."""
    z = z.double()
    s = [float(v) for v in z.norm(dim=-1)]
    lo, hi = min(s), max(s)
    sh = [(v - lo) / (hi - lo) for v in s]
    cos = _cos64(z)
    picked = [max(range(len(s)), key=lambda i: (sh[i], -i))]
    while len(picked) < k:
        def score(i):
            return sh[i] * min(1 - float(cos[i, j]) for j in picked)
        rest = [i for i in range(len(s)) if i not in picked]
        picked.append(max(rest, key=lambda i: (score(i), -i)))
    return picked


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 5, 17])
def test_norm_is_zoo_greedy_on_the_l2_norm(seed, k):
    z = _rand(40, 12, seed) * torch.rand(40, 1, generator=torch.Generator().manual_seed(seed)) * 3
    sel = select("norm", PruneInputs(features=z), k)
    assert sel.idx.tolist() == _norm_reference(z, k)
    torch.testing.assert_close(sel.scores, z.norm(dim=-1))


# ------------------------------------------------------------------------------------ VisPruner


def _vispruner_reference(attn, x, keep, ratio):
    """The paper's two steps in float64 with Python lists."""
    n = len(attn)
    order = sorted(range(n), key=lambda i: (-float(attn[i]), i))
    n_imp = int(keep * ratio)
    imp, rest = order[:n_imp], order[n_imp:]
    cos = _cos64(x)
    target = keep - n_imp
    while target > 0 and len(rest) - target > 0:
        r = min(8, len(rest) - target)
        a, b = rest[0::2], rest[1::2]
        best = [max(float(cos[i, j]) for j in b) for i in a]
        keep_a = sorted(range(len(a)), key=lambda t: (-best[t], t))[r:]
        rest = [a[t] for t in keep_a] + b
    return imp + (rest if target > 0 else [])


def _vispruner_official(attn, x, keep, ratio):
    """The official ``encode_images`` arithmetic (Theia-4869/VisPruner@aefa01a), re-expressed for
    one image (B = 1): argsort, the alternating split, the round loop."""
    imp_n = int(keep * ratio)
    div_n = keep - imp_n
    idx = attn[None].argsort(dim=-1, descending=True)
    important, residual = idx[:, :imp_n], idx[:, imp_n:]
    xn = x[None] / x[None].norm(dim=-1, keepdim=True)
    while div_n > 0:
        R = residual.shape[1]
        r = min(8, R - div_n)
        if r <= 0:
            break
        tokens = xn[0, residual[0]][None]
        a, b = tokens[..., ::2, :], tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[..., ::2][0, distinct[0]][None], residual[..., 1::2]], dim=-1)
    sel = torch.cat([important, residual], dim=-1) if div_n > 0 else important
    return sel[0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep,ratio", [(16, 0.5), (12, 0.75), (9, 0.5), (20, 0.0), (6, 1.0), (1, 0.5)])
def test_vispruner_matches_float64_reference_and_official_arithmetic(seed, keep, ratio):
    n = 64
    g = torch.Generator().manual_seed(100 + seed)
    attn, x = torch.rand(n, generator=g), _rand(n, 24, seed)
    inp = PruneInputs(features=x.clone(), vision=x, cls_attn=attn)
    sel = select("vispruner", inp, keep, important_ratio=ratio)
    assert sel.idx.tolist() == _vispruner_reference(attn, x, keep, ratio)
    if (n - int(keep * ratio)) % 2 == 0:  # the official indexing needs an even list
        assert set(sel.idx.tolist()) == set(_vispruner_official(attn, x, keep, ratio).tolist())
    assert len(set(sel.idx.tolist())) == keep
    torch.testing.assert_close(sel.scores, attn)


def test_vispruner_important_part_is_top_attention_and_odd_lists_work():
    n, keep = 33, 10  # 28 residual tokens then odd lengths along the way
    g = torch.Generator().manual_seed(7)
    attn, x = torch.rand(n, generator=g), _rand(n, 8, 3)
    idx = vispruner_select(attn, x, keep, 0.5)
    assert idx[:5].tolist() == torch.sort(attn, descending=True, stable=True).indices[:5].tolist()
    assert idx.tolist() == _vispruner_reference(attn, x, keep, 0.5)


def test_vispruner_drops_duplicates_before_distinct_tokens():
    # 4 important tokens by attention; the rest (tied attention, so in index order): 4..9 one
    # direction (duplicates), 10..13 distinct. One round, r = 10 - 7 = 3: A = 4, 6, 8, 10, 12
    # against B = 5, 7, 9, 11, 13; the three A duplicates of a B token go, the distinct A stay.
    n = 14
    attn = torch.tensor([9, 8, 7, 6] + [1.0] * 10)
    x = torch.eye(16)[:n].clone()
    x[4:10] = torch.eye(16)[15]
    sel = select("vispruner", PruneInputs(features=x, vision=x, cls_attn=attn), 11, important_ratio=0.4)
    assert sel.idx.tolist() == [0, 1, 2, 3, 10, 12, 5, 7, 9, 11, 13]


def test_vispruner_option_is_checked():
    with pytest.raises(UsageError):
        parse_method_spec("vispruner:important_ratio=1.5")
    assert parse_method_spec("vispruner:important_ratio=0.75") == ("vispruner", {"important_ratio": 0.75})


# ------------------------------------------------------------------------------------ CDPruner


def _dpp_reference(L: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP of a DPP by its definition: each step adds the token maximising det(L_S), float64."""
    L = L.double()
    picked: list[int] = []
    for _ in range(k):
        best, arg = -math.inf, None
        for j in range(L.shape[0]):
            if j in picked:
                continue
            s = picked + [j]
            det = float(torch.linalg.det(L[s][:, s]))
            if det > best:
                best, arg = det, j
        picked.append(arg)
    return picked


def _cdpruner_official(z, text, k):
    """The official ``encode_images`` arithmetic (Theia-4869/CDPruner@9541616), re-expressed for one
    image (B = 1) with V = Z: similarity, negated mean relevance, min-max, kernel, the fast loop."""
    zn = (z / z.norm(dim=-1, keepdim=True)).float()[None]
    sim = zn @ zn.transpose(1, 2)
    tn = text / text.norm(dim=-1, keepdim=True)
    rel = (-(zn @ tn.T)).mean(dim=-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    kernel = rel.unsqueeze(2) * sim * rel.unsqueeze(1)
    B, N = 1, z.shape[0]
    cis = torch.zeros((k, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    out = torch.empty((k, B), dtype=torch.long)
    for i in range(k):
        j = torch.argmax(di2s, dim=-1)
        out[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return out[:, 0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 4, 10])
def test_cdpruner_greedy_equals_determinant_reference_and_official_loop(seed, k):
    n, d = 24, 40  # d > n: a full-rank kernel, as with real LLM widths
    z, text = _rand(n, d, seed), _rand(5, d, 50 + seed)
    sel = select("cdpruner", PruneInputs(features=z, prompt=text), k)
    rel = cdpruner_relevance(z, text)
    ref = _dpp_reference(rel.double()[:, None] * _cos64(z) * rel.double()[None, :], k)
    assert sel.idx.tolist() == ref
    assert sel.idx.tolist() == _cdpruner_official(z, text, k).tolist()
    torch.testing.assert_close(sel.scores, rel)


def test_cdpruner_relevance_is_the_official_normalised_negative_mean_cosine():
    z, text = _rand(10, 6, 1), _rand(3, 6, 2)
    c = _cos64(torch.cat([z, text]))[:10, 10:]  # [N, T]
    r = -c.mean(dim=1)
    want = (r - r.min() + 1e-6) / (r.max() - r.min())
    torch.testing.assert_close(cdpruner_relevance(z, text).double(), want, rtol=1e-5, atol=1e-6)
    pos = c.mean(dim=1)
    want_pos = (pos - pos.min() + 1e-6) / (pos.max() - pos.min())
    torch.testing.assert_close(cdpruner_relevance(z, text, negate=False).double(), want_pos, rtol=1e-5, atol=1e-6)
    a = 0.5 / (2 * 0.5)
    torch.testing.assert_close(cdpruner_relevance(z, text, theta=0.5).double(), torch.exp(a * want),
                               rtol=1e-5, atol=1e-6)
    flat = cdpruner_relevance(torch.ones(4, 6), text)  # every token alike: all ones, not 0/0
    assert torch.equal(flat, torch.ones(4))


def test_cdpruner_fills_past_the_kernel_rank_with_distinct_tokens():
    n, d, k = 30, 4, 12  # rank 4: the official loop would take square roots of noise after 4 picks
    z, text = _rand(n, d, 3), _rand(2, d, 4)
    sel = select("cdpruner", PruneInputs(features=z, prompt=text), k)
    idx = sel.idx.tolist()
    assert len(set(idx)) == k
    rel = cdpruner_relevance(z, text)
    L = cdpruner_kernel(z, rel)
    assert idx[:d] == _dpp_reference(L, d)  # the first round is the DPP greedy
    rest = [j for j in range(n) if j not in idx[:d]]
    second = dpp_greedy(L[rest][:, rest], min(d, k - d)).tolist()
    assert idx[d:2 * d] == [rest[j] for j in second]  # then a new round over the tokens left


def test_cdpruner_options_parse():
    assert parse_method_spec("cdpruner:negate=false") == ("cdpruner", {"negate": False})
    with pytest.raises(UsageError):
        parse_method_spec("cdpruner:theta=1")
    with pytest.raises(UsageError):
        parse_method_spec("cdpruner:negate=3")


# ------------------------------------------------------------------------------------ downsample


@pytest.mark.parametrize("rows,cols", [(12, 12), (4, 6), (7, 3), (1, 9)])
def test_pool_plan_has_exactly_keep_bins_covering_the_grid(rows, cols):
    for keep in range(1, rows * cols + 1):
        bins = pool_plan(rows, cols, keep)
        assert len(bins) == keep
        covered = torch.zeros(rows, cols, dtype=torch.bool)
        centres = set()
        for r0, r1, c0, c1 in bins:
            assert 0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols
            covered[r0:r1, c0:c1] = True
            centres.add(((r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2))
        assert covered.all() and len(centres) == keep


def _proj(dv, d, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dv, d), torch.nn.GELU(), torch.nn.Linear(d, d))


@pytest.mark.parametrize("keep,out", [(36, (6, 6)), (16, (4, 4)), (144, None), (9, (3, 3)), (72, (8, 9))])
def test_downsample_is_adaptive_avg_pool_then_projector_when_keep_factors(keep, out):
    rows = cols = 12
    x = _rand(rows * cols, 5, 1)
    proj = _proj(5, 7, 0)
    with torch.no_grad():
        inp = PruneInputs(features=proj(x), vision=x, projector=proj, grid=(rows, cols))
    sel = select("downsample", inp, keep)
    if out is None:  # keep >= N keeps everything, untouched
        assert sel.idx.tolist() == list(range(144)) and sel.tokens is None
        return
    grid = x.double().T.reshape(1, 5, rows, cols)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, out)[0].reshape(5, -1).T  # [h*w, 5]
    with torch.no_grad():
        torch.testing.assert_close(sel.tokens, proj(pooled.float()), rtol=1e-5, atol=1e-6)
    h, w = out
    centre = [(((i * rows) // h + -((-(i + 1) * rows) // h) - 1) // 2) * cols
              + ((j * cols) // w + -((-(j + 1) * cols) // w) - 1) // 2
              for i, j in itertools.product(range(h), range(w))]
    assert sel.idx.tolist() == centre


def test_downsample_ragged_budget_and_a_cut_crop():
    # a LLaVA-NeXT crop cut by unpadding: the live cells are rows 2..5 of a 6x6 tile (24 tokens)
    cells = torch.tensor([(r, c) for r in range(2, 6) for c in range(6)])
    x = _rand(24, 3, 2)
    proj = torch.nn.Identity()
    inp = PruneInputs(features=x.clone(), vision=x, projector=proj, grid=(6, 6), cells=cells)
    sel = select("downsample", inp, 7)  # 7 = 3 + 2 + 2 over a 4x6 rectangle
    assert sel.idx.numel() == 7 and len(set(sel.idx.tolist())) == 7
    bins = pool_plan(4, 6, 7)
    layout = torch.arange(24).view(4, 6)
    for (r0, r1, c0, c1), tok in zip(bins, sel.tokens):
        torch.testing.assert_close(tok, x[layout[r0:r1, c0:c1].reshape(-1)].double().mean(0).float())
    with pytest.raises(UsageError, match="budget-scope"):
        select("downsample", PruneInputs(features=x, vision=x, projector=proj), 5)
    with pytest.raises(UsageError, match="rectangle"):
        select("downsample", PruneInputs(features=x[:23], vision=x[:23], projector=proj, cells=cells[:23]), 5)


# ------------------------------------------------------------------------------------ MMTok


def _mmtok_reference(z, x, t, k, alpha=0.5, tau_tv=0.02, tau_vv=0.2):
    """Maximum coverage by its definition, float64: each step adds the candidate that maximises the
    total coverage sum_rows max_{j in S} C[row, j] of C = [P; alpha Q]."""
    cz, cx = _cos64(torch.cat([t, z]))[: len(t), len(t):], _cos64(x)
    p = torch.softmax(cz / tau_tv, dim=1) / len(t)
    q = torch.softmax(cx / tau_vv, dim=1) / len(x)
    c = torch.cat([p, alpha * q])
    picked: list[int] = []
    for _ in range(k):
        def total(j):
            return float(c[:, picked + [j]].amax(dim=1).sum())
        picked.append(max((j for j in range(c.shape[1]) if j not in picked), key=lambda j: (total(j), -j)))
    return picked


def _mmtok_official(z, x, t, k, alpha=0.5, tv=0.02, vv=0.2):
    """The official ``mm_coverage_selection`` arithmetic (Ironieser/MMTok@d1522cd), re-expressed."""
    def l2(v):
        return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    xn, xc, zn = l2(z).float(), l2(x).float(), l2(t).float()
    P = zn @ xn.T
    Q = xc @ xc.T
    m, n = P.shape
    P = torch.softmax(P * (1.0 / tv), dim=1) / m
    Q = torch.softmax(Q * (1.0 / vv), dim=1) / n
    C = torch.cat([P, Q * alpha], dim=0)
    best = torch.zeros(m + n)
    mask = torch.zeros(n)
    out = torch.empty(k, dtype=torch.long)
    for i in range(k):
        delta = (C - best.unsqueeze(1)).clamp_min_(0).sum(0)
        delta.add_(mask)
        j = torch.argmax(delta)
        out[i] = j
        torch.maximum(best, C[:, j], out=best)
        mask[j] = float("-inf")
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 6, 15])
def test_mmtok_equals_coverage_reference_and_official_loop(seed, k):
    n = 30
    z, x, t = _rand(n, 16, seed), _rand(n, 8, 10 + seed), _rand(4, 16, 20 + seed)
    sel = select("mmtok", PruneInputs(features=z, vision=x, prompt=t), k)
    assert sel.idx.tolist() == _mmtok_reference(z, x, t, k)
    assert sel.idx.tolist() == _mmtok_official(z, x, t, k).tolist()
    sel2 = select("mmtok", PruneInputs(features=z, vision=x, prompt=t), k, alpha=2.0, tau_tv=0.1, tau_vv=0.05)
    assert sel2.idx.tolist() == _mmtok_reference(z, x, t, k, 2.0, 0.1, 0.05)


def test_mmtok_keywords_and_options():
    from zoocli.methods.mmtok import question_keywords

    assert question_keywords("What color is the circle?") == "color circle"
    assert question_keywords("Is there a red square? Answer the question using a single word or phrase.") \
        == "there red square"
    assert question_keywords("What is it?") == "What is it?"  # nothing descriptive left: the whole text
    with pytest.raises(UsageError):
        parse_method_spec("mmtok:tau_tv=0")
    with pytest.raises(UsageError):
        parse_method_spec("mmtok:prompt_scope=words")
