"""zoocli.sensitivity.exact: S(i) = ||J(x_i)||_F / sqrt(d_in), against float64 references.

References: the float64 autograd Jacobian (closed form ||J||_F), the float64 a^T M a formula on
random small projectors, and a float64 Monte Carlo E_u ||J u|| over 4096 unit directions (what the
paper's Eq. 2-3 estimates). Device-parametrised: the cuda cases carry the ``gpu`` marker.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from test_sensitivity import (
    CASES, D_IN, D_V, _merger64, generic, mlp_seq, qwen_merger, reference, tokens,
)

import zoocli.sensitivity.exact as E
from zoocli.errors import UsageError
from zoocli.ops import spearman
from zoocli.sensitivity import SampledOptionError, check_options, token_sensitivity

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]


def _f64(p, kind):
    return _merger64(p) if kind == "merger" else copy.deepcopy(p).double()


def jacobian_rms(p, x, kind) -> torch.Tensor:
    """||J(x_i)||_F / sqrt(d_in) from the float64 autograd Jacobian."""
    f = _f64(p, kind)
    jac = torch.stack([torch.autograd.functional.jacobian(f, xi) for xi in x.double()])
    return (jac.pow(2).sum((1, 2)) / x.shape[1]).sqrt()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_exact_equals_float64_jacobian(case, device):
    build, data, kind = CASES[case]
    p, x = build(), data()
    # fp32 products (auto would be TF32 on CUDA: tests/test_sensitivity_precision.py holds those)
    got = token_sensitivity(x.to(device), copy.deepcopy(p).to(device), precision="fp32")
    assert got.dtype == torch.float32 and got.device.type == device and got.shape == (x.shape[0],)
    ref = jacobian_rms(p, x, kind)
    assert torch.allclose(got.cpu().double(), ref, rtol=1e-4, atol=0), (got.cpu().double() / ref - 1).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["llava", "merger"])
def test_exact_vs_many_direction_monte_carlo(case, dtype, device):
    """The paper's quantity E_u ||J u|| (float64, 4096 directions) of the weights as loaded (fp32 or
    bf16, upcast): exact ranks tokens like it and is its RMS form (>= it, within a few percent)."""
    build, data, kind = CASES[case]
    p, x = copy.deepcopy(build()).to(dtype), data().to(dtype)
    ref = reference(copy.deepcopy(p).float(), x.float(), kind, n_dirs=4096)
    got = token_sensitivity(x.to(device), p.to(device)).cpu().double()
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    assert spearman(got, ref) >= 0.99
    ratio = got / ref
    assert (ratio > 0.995).all() and (ratio < 1.08).all(), (ratio.min(), ratio.max())


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh()],
                         ids=["gelu", "gelu-tanh", "silu", "tanh"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_equals_float64_closed_form(act, seed):
    """Random small Linear-act-Linear projectors: sqrt(a^T ((W1 W1^T) o (W2^T W2)) a / d_in) in float64."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_h, d = (8, 24, 16) if seed == 0 else (20, 12, 40)
    p = nn.Sequential(nn.Linear(d_in, d_h, bias=seed == 0), act, nn.Linear(d_h, d)).eval()
    with torch.no_grad():
        for lin in (p[0], p[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5)
    x = 2 * torch.randn(30, d_in, generator=g)
    w1, w2 = p[0].weight.double(), p[2].weight.double()
    a0 = x.double() @ w1.T + (p[0].bias.double() if p[0].bias is not None else 0)
    a = torch.func.jvp(copy.deepcopy(act).double(), (a0,), (torch.ones_like(a0),))[1]
    m = (w1 @ w1.T) * (w2.T @ w2)
    want = (((a @ m) * a).sum(-1) / d_in).sqrt()
    got = token_sensitivity(x, p)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=0)


def test_exact_bf16_weights_rank_like_fp32():
    for case in ("llava", "merger"):
        build, data, _ = CASES[case]
        p, x = build(), data()
        f32 = token_sensitivity(x, p)
        b = token_sensitivity(x.to(torch.bfloat16), copy.deepcopy(p).to(torch.bfloat16))
        assert b.dtype == torch.float32
        assert spearman(b, f32) >= 0.99


@pytest.mark.parametrize("case", list(CASES))
def test_exact_chunking_does_not_change_results(case):
    build, data, _ = CASES[case]
    p, x = build(), data(n=37)
    base = token_sensitivity(x, p)
    for mb in (0.002, 0.05):
        assert torch.allclose(token_sensitivity(x, p, chunk_mb=mb), base, rtol=1e-6, atol=0)


def test_exact_matrix_is_cached_and_follows_the_weights():
    p, x = mlp_seq(), tokens(n=6)
    s = token_sensitivity(x, p)
    m1 = E.exact_matrices(E.MLP(p, p[0], p[1], p[2]), "cpu")
    assert E.exact_matrices(E.MLP(p, p[0], p[1], p[2]), "cpu") is m1  # cached: no recompute
    with torch.no_grad():
        p[2].weight.mul_(2)  # in place: _version changes
    assert torch.allclose(token_sensitivity(x, p), 2 * s, rtol=1e-5)
    assert E.exact_matrices(E.MLP(p, p[0], p[1], p[2]), "cpu") is not m1


@pytest.mark.parametrize("kw", [{"m": 64}, {"h": 0.01}, {"seed": 0}, {"m": 8, "h": 0.1}])
def test_sampled_options_with_exact_are_a_value_error(kw):
    with pytest.raises(ValueError, match="estimator='fd' is the paper's sampled form") as e:
        token_sensitivity(tokens(n=4), mlp_seq(), **kw)
    assert isinstance(e.value, SampledOptionError) and isinstance(e.value, UsageError)
    assert "\n" not in str(e.value)
    token_sensitivity(tokens(n=4), mlp_seq(), estimator="fd", **kw)  # fine with a sampled estimator
    with pytest.raises(SampledOptionError):
        check_options(estimator="exact", **kw)
    check_options(estimator="exact")
    with pytest.raises(UsageError, match="rank applies"):
        check_options(estimator="exact", rank=8)


def test_zoo_method_defaults_to_exact():
    from zoocli.methods.zoo import ZOO_OPTIONS, check_zoo_options

    assert ZOO_OPTIONS["estimator"] == "exact" and ZOO_OPTIONS["m"] is None and ZOO_OPTIONS["h"] is None
    check_zoo_options(**ZOO_OPTIONS)
    check_zoo_options(**{**ZOO_OPTIONS, "estimator": "fd", "m": 64, "h": 0.01})
    with pytest.raises(ValueError, match="estimator='fd'"):
        check_zoo_options(**{**ZOO_OPTIONS, "m": 64})


def test_unrecognised_projector_exact_or_clear_refusal():
    p, x = generic(), tokens(n=5)
    assert torch.isfinite(token_sensitivity(x, p)).all()

    class NotTraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D_IN, 8)

        def forward(self, z):
            return self.lin(z) * float(z.detach().abs().max())  # a host read: torch.func cannot trace it

    with pytest.raises(UsageError, match="estimator='fd', 'jvp' or 'naive'"):
        token_sensitivity(x, NotTraceable())
    assert token_sensitivity(x, NotTraceable(), estimator="fd").shape == (5,)


def test_wrapped_merger_exact_equals_bare():
    class Rows(nn.Module):
        def __init__(self, merger):
            super().__init__()
            self.merger = merger

        def forward(self, z):
            return self.merger(z.reshape(-1, D_V)).reshape(*z.shape[:-1], -1)

    q = qwen_merger()
    x = CASES["merger"][1](n=12)
    assert torch.equal(token_sensitivity(x, Rows(q)), token_sensitivity(x, q))
