"""zoocli.sensitivity: the ZOO-Prune sensitivity estimators (Eq. 2-3, Prop. 3.1).

The float64 reference is E_u ||J(x_i) u|| with the exact Jacobian (autograd, float64) and 4096
unit directions; the projectors have Kaiming-scale weights so the nonlinearity matters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zoocli.sensitivity as S
import zoocli.sensitivity.sampled as SP
from zoocli.errors import UsageError
from zoocli.sensitivity import chunk_plan, directions, token_sensitivity, tokens_per_chunk

D_IN, D_H, D_OUT, N = 32, 64, 48, 64
D_V, P = 16, 4  # merger: context_dim, spatial_merge_size ** 2


def spearman(a, b) -> float:
    def ranks(v):
        v = torch.as_tensor(v).flatten().double()
        r = torch.empty_like(v)
        r[torch.argsort(v, stable=True)] = torch.arange(v.numel(), dtype=torch.float64)
        return r - r.mean()
    ra, rb = ranks(a), ranks(b)
    return float(ra @ rb / (ra.norm() * rb.norm()))


def _kaiming(*mods, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in mods:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (2 / lin.in_features) ** 0.5)
            if lin.bias is not None:
                lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=g))


def mlp_seq(seed=0):
    p = nn.Sequential(nn.Linear(D_IN, D_H), nn.GELU(), nn.Linear(D_H, D_OUT))
    _kaiming(p[0], p[2], seed=seed)
    return p.eval()


def llava_projector(seed=0):
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": D_IN, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        text_config={"model_type": "llama", "hidden_size": D_H, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100},
        projector_hidden_act="gelu")
    p = LlavaMultiModalProjector(cfg)
    _kaiming(p.linear_1, p.linear_2, seed=seed)
    return p.eval()


def qwen_merger(seed=0):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    p = Qwen2_5_VLPatchMerger(dim=D_OUT, context_dim=D_V, spatial_merge_size=2)
    _kaiming(p.mlp[0], p.mlp[2], seed=seed)
    with torch.no_grad():
        p.ln_q.weight.copy_(0.5 + torch.rand(D_V, generator=torch.Generator().manual_seed(seed + 1)))
    return p.eval()


def generic(seed=0):
    p = nn.Sequential(nn.Linear(D_IN, D_H), nn.Tanh(), nn.Linear(D_H, D_H), nn.GELU(), nn.Linear(D_H, 24))
    _kaiming(p[0], p[2], p[4], seed=seed)
    return p.eval()


def tokens(n=N, d=D_IN, seed=0, outliers=0):
    """Features with per-token log-normal scales (so sensitivities spread), optional big channels."""
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, d, generator=g) * torch.exp(0.6 * torch.randn(n, 1, generator=g))
    if outliers:
        x[:, :outliers] = 25.0 * (1 + 0.1 * torch.randn(n, outliers, generator=g))
    return x


def merger_tokens(n=N, seed=0):
    """Rows of P*D_V, each patch with its own scale and mean offset (RMSNorm then matters)."""
    g = torch.Generator().manual_seed(seed + 200)
    x = torch.randn(n, P, D_V, generator=g) * torch.exp(0.6 * torch.randn(n, P, 1, generator=g))
    x = x + torch.randn(n, 1, D_V, generator=g)
    return x.reshape(n, P * D_V)


# --- float64 references -------------------------------------------------------------------------


def _merger64(p):
    """A float64 functional copy of the merger (HF's RMSNorm computes in fp32 internally)."""
    g = p.ln_q.weight.detach().double()
    eps = p.ln_q.variance_epsilon
    mlp = copy.deepcopy(p.mlp).double()

    def f(row):
        xp = row.view(-1, D_V)
        y = g * xp * torch.rsqrt(xp.pow(2).mean(-1, keepdim=True) + eps)
        return mlp(y.reshape(-1, P * D_V)).reshape(*row.shape[:-1], -1)

    return f


def reference(p, x, kind, n_dirs=4096):
    """E_u ||J(x_i) u|| with exact float64 Jacobians and ``n_dirs`` unit directions."""
    f = _merger64(p) if kind == "merger" else copy.deepcopy(p).double()
    x64 = x.double()
    jac = torch.stack([torch.autograd.functional.jacobian(f, xi) for xi in x64])  # [N, d, d_in]
    u = torch.randn(n_dirs, x.shape[1], generator=torch.Generator().manual_seed(999), dtype=torch.float64)
    u /= u.norm(dim=-1, keepdim=True)
    return torch.einsum("nod,kd->nko", jac, u).norm(dim=-1).mean(1)


CASES = {
    "llava": (llava_projector, tokens, "mlp"),
    "sequential": (mlp_seq, tokens, "mlp"),
    "merger": (qwen_merger, merger_tokens, "merger"),
    "generic": (generic, tokens, "generic"),
}


def test_merger_reference_matches_module():
    p, x = qwen_merger(), merger_tokens()
    want = p(x.reshape(-1, D_V))
    got = _merger64(p)(x.double()).float()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_structures_detected():
    assert S.projector_structure(llava_projector()) is not None
    assert S.projector_structure(mlp_seq()) is not None
    s = S.projector_structure(qwen_merger())
    assert s is not None and s.norm is not None and s.norm.groups == P and s.norm.d_v == D_V
    assert S.projector_structure(generic()) is None
    # LayerNorm in the middle is not elementwise; a LayerNorm ln_q is not an RMSNorm
    assert S.projector_structure(nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))) is None
    q = qwen_merger()
    q.ln_q = nn.LayerNorm(D_V)
    assert S.projector_structure(q) is None


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("estimator", ["fd", "jvp"])
def test_matches_float64_jacobian_reference(case, estimator):
    build, data, kind = CASES[case]
    p, x = build(), data()
    ref = reference(p, x, kind)
    got = token_sensitivity(x, p, m=512, seed=3, estimator=estimator)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0],)
    assert ref.std() / ref.mean() > 0.05  # the data really spreads the sensitivities
    assert spearman(got, ref) >= 0.97
    assert float(((got.double() - ref).abs() / ref).mean()) < 0.05


@pytest.mark.parametrize("case", list(CASES))
def test_estimators_agree(case):
    build, data, _ = CASES[case]
    p, x = build(), data()
    nv = token_sensitivity(x, p, m=64, estimator="naive")
    fd = token_sensitivity(x, p, m=64, estimator="fd")
    jv = token_sensitivity(x, p, m=64, estimator="jvp")
    for s in (fd, jv):
        assert spearman(s, nv) >= 0.99
    assert float(((fd - nv).abs() / nv).max()) < 2e-3
    assert float(((jv - nv).abs() / nv).max()) < 1e-2  # O(h^2) truncation + fp32 cancellation


@pytest.mark.parametrize("case", ["llava", "sequential", "merger"])
@pytest.mark.parametrize("estimator", ["fd", "jvp"])
def test_full_rank_equals_no_rank(case, estimator):
    build, data, _ = CASES[case]
    p, x = build(), data()
    full = token_sensitivity(x, p, m=32, estimator=estimator)
    k = S.projector_structure(p).lin2.weight.shape
    r = token_sensitivity(x, p, m=32, estimator=estimator, rank=min(k))
    assert torch.allclose(r, full, rtol=1e-4)
    assert torch.allclose(token_sensitivity(x, p, m=32, estimator=estimator, rank=10**6), full, rtol=1e-4)
    low = token_sensitivity(x, p, m=32, estimator=estimator, rank=4)
    assert (low <= full * (1 + 1e-5)).all()  # a truncation can only shrink ||W2 v||


def test_svd_cache_follows_weights_and_rank():
    p = mlp_seq()
    b8 = S.lowrank_factor(p[2], 8, "cpu")
    assert S.lowrank_factor(p[2], 8, "cpu") is b8
    assert S.lowrank_factor(p[2], 4, "cpu").shape == (D_H, 4)
    b8 = S.lowrank_factor(p[2], 8, "cpu")
    with torch.no_grad():
        p[2].weight.mul_(2)  # in place: same data_ptr, new _version
    b8b = S.lowrank_factor(p[2], 8, "cpu")
    assert b8b is not b8 and torch.allclose(b8b.abs(), 2 * b8.abs(), rtol=1e-4, atol=1e-5)


def _bf16_naive(pb, xb, m, h=0.01, seed=0):
    """The official-style two-pass FD, all in bf16 (what not to do)."""
    u = directions(m, xb.shape[1], seed, xb.device).to(torch.bfloat16)
    xp = (xb[:, None] + h * u[None]).reshape(-1, xb.shape[1])
    xm = (xb[:, None] - h * u[None]).reshape(-1, xb.shape[1])
    return ((pb(xp) - pb(xm)).float().norm(dim=-1).view(xb.shape[0], m) / (2 * h)).mean(1)


@pytest.mark.parametrize("case", ["llava", "merger"])
@pytest.mark.parametrize("lowp_w2", [False, True])
def test_bf16_ranks_like_fp32(case, lowp_w2, monkeypatch):
    if lowp_w2:  # exercise the CUDA path (W2 product in bf16) on CPU
        monkeypatch.setattr(SP, "LOWP_W2_DEVICES", {"cpu", "cuda"})
    build, data, kind = CASES[case]
    p, x = build(), (data(outliers=4) if kind == "mlp" else data())
    pb, xb = copy.deepcopy(p).to(torch.bfloat16), x.to(torch.bfloat16)
    f32 = token_sensitivity(x, p, m=64, estimator="fd")
    for est in ("fd", "jvp"):
        b = token_sensitivity(xb, pb, m=64, estimator=est)
        assert b.dtype == torch.float32
        assert spearman(b, f32) >= 0.95
    if kind == "mlp":
        rows = pb
    else:
        rows = lambda r: pb(r.reshape(-1, D_V))  # noqa: E731
    assert spearman(_bf16_naive(rows, xb, 64), f32) < 0.8  # so the fp32 path is what fixes it


@pytest.mark.parametrize("case", list(CASES))
def test_seeds(case):
    build, data, _ = CASES[case]
    p, x = build(), data()
    a = token_sensitivity(x, p, m=16, seed=5, estimator="fd")
    assert torch.equal(a, token_sensitivity(x, p, m=16, seed=5, estimator="fd"))
    assert not torch.allclose(a, token_sensitivity(x, p, m=16, seed=6, estimator="fd"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("estimator", ["fd", "jvp", "naive"])
def test_chunking_does_not_change_results(case, estimator):
    build, data, _ = CASES[case]
    p, x = build(), data(n=37)
    m = 24
    base = token_sensitivity(x, p, m=m, estimator=estimator, chunk_mb=256)
    # 0.002 MB: fewer rows than m -> one token, a few directions at a time
    for mb in (0.002, 0.05, 0.3):
        got = token_sensitivity(x, p, m=m, estimator=estimator, chunk_mb=mb)
        assert torch.allclose(got, base, rtol=1e-6, atol=0), (mb, (got - base).abs().max())


@pytest.mark.parametrize("m", [1, 7, 64, 4096, 10**6])
@pytest.mark.parametrize("chunk_mb", [0.01, 1, 256])
def test_chunk_plan_bounded(m, chunk_mb):
    widths = (4096,) * 4 + (4096,)
    t, k = chunk_plan(m, widths, chunk_mb)
    assert t >= 1 and 1 <= k <= m
    assert t == tokens_per_chunk(m, widths, chunk_mb)
    row = 4 * sum(widths)
    assert t * k * row <= max(chunk_mb * 2**20, row)  # one row is the floor
    if k < m:
        assert t == 1
    # independent of N: doubling m never grows the chunk's memory
    t2, k2 = chunk_plan(2 * m, widths, chunk_mb)
    assert t2 * k2 * row <= max(chunk_mb * 2**20, row)


def test_empty_and_device():
    p = mlp_seq()
    out = token_sensitivity(torch.zeros(0, D_IN), p)
    assert out.shape == (0,) and out.dtype == torch.float32
    out = token_sensitivity(tokens(n=5).double(), p, m=4, estimator="fd")
    assert out.dtype == torch.float32 and out.device == torch.device("cpu")


@pytest.mark.parametrize("kw, match", [
    ({"m": 0}, "m must"), ({"m": 2.5}, "m must"), ({"m": True}, "m must"), ({"m": -3}, "m must"),
    ({"h": 0}, "h must"), ({"h": -0.1}, "h must"), ({"h": float("nan")}, "h must"),
    ({"h": float("inf")}, "h must"), ({"estimator": "spsa"}, "unknown estimator"),
    ({"rank": 0}, "rank must"), ({"rank": -2}, "rank must"), ({"rank": 1.5}, "rank must"),
    ({"rank": 4, "estimator": "naive"}, "rank applies"), ({"chunk_mb": 0}, "chunk_mb"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(UsageError, match=match):
        token_sensitivity(tokens(n=4), mlp_seq(), **kw)


def test_rank_on_unrecognised_projector():
    with pytest.raises(UsageError, match="no recognised structure"):
        token_sensitivity(tokens(n=4), generic(), rank=4, estimator="fd")


def test_bad_x():
    with pytest.raises(UsageError, match="x must"):
        token_sensitivity(torch.zeros(3, 2, D_IN), mlp_seq())
    with pytest.raises(UsageError, match="features"):
        token_sensitivity(torch.zeros(3, D_IN + 1), mlp_seq())


def test_wrapped_merger_is_recognised():
    """The adapters hand over the merger inside a row-wise wrapper; it must not fall back to generic."""
    try:
        from zoocli.adapters.qwen2_5_vl import MergerProjector
    except ImportError:  # a stand-in with the same forward
        class MergerProjector(nn.Module):
            def __init__(self, merger):
                super().__init__()
                self.merger, self.d_v = merger, merger.ln_q.weight.shape[0]

            def forward(self, x):
                return self.merger(x.reshape(-1, self.d_v)).reshape(*x.shape[:-1], -1)

    q, x = qwen_merger(), merger_tokens(n=20)
    w = MergerProjector(q)
    s = S.projector_structure(w)
    assert s is not None and s.norm is not None and s.module is q
    for est in ("fd", "jvp", "naive"):
        assert torch.allclose(token_sensitivity(x, w, m=16, estimator=est),
                              token_sensitivity(x, q, m=16, estimator=est), rtol=1e-6)
    assert token_sensitivity(x, w, m=16, rank=8, estimator="fd").shape == (20,)
    # a wrapper that changes the result is not looked through
    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    assert S.projector_structure(Scaled(mlp_seq())) is None
    assert S.projector_structure(Scaled(q)) is None
