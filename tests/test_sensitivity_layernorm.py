"""Token sensitivity at Qwen3-VL's LayerNorm merger and LLaVA-OneVision's projector, against float64.

References: the float64 autograd Jacobian of a functional float64 copy (LayerNorm by its formula), for
the closed form (``exact``, zoocli/sensitivity/exact.py) and the sampled estimators' fast path
(``fd`` / ``jvp`` with the LayerNorm linearised, zoocli/sensitivity/sampled.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zoocli.ops import spearman
from zoocli.sensitivity import projector_structure, token_sensitivity

D_V, D_OUT, P, N = 16, 24, 4, 40


def _vision_config(postshuffle_d=D_V):
    from transformers import Qwen3VLConfig

    vc = Qwen3VLConfig().vision_config
    vc.hidden_size, vc.out_hidden_size, vc.spatial_merge_size = postshuffle_d, D_OUT, 2
    return vc


def qwen3_merger(seed=0, postshuffle=False):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    p = Qwen3VLVisionPatchMerger(_vision_config(), use_postshuffle_norm=postshuffle).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (p.linear_fc1, p.linear_fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (2 / lin.in_features) ** 0.5)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
        p.norm.weight.copy_(0.5 + torch.rand(p.norm.weight.shape, generator=g))
        p.norm.bias.copy_(0.3 * torch.randn(p.norm.bias.shape, generator=g))
    return p


def onevision_projector(seed=0):
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

    cfg = LlavaOnevisionConfig()
    cfg.vision_config.hidden_size, cfg.text_config.hidden_size = P * D_V, D_OUT
    p = LlavaOnevisionMultiModalProjector(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (p.linear_1, p.linear_2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (2 / lin.in_features) ** 0.5)
    return p


def tokens(n=N, seed=0):
    """Rows of P*D_V: each patch with its own scale and mean offset (the LayerNorm then matters)."""
    g = torch.Generator().manual_seed(seed + 300)
    x = torch.randn(n, P, D_V, generator=g) * torch.exp(0.6 * torch.randn(n, P, 1, generator=g))
    x = x + 2.0 * torch.randn(n, P, 1, generator=g)
    return x.reshape(n, P * D_V)


def merger64(p):
    """A float64 functional copy of the Qwen3-VL merger: LayerNorm by its formula, then the MLP."""
    d = p.norm.weight.numel()
    g, b, eps = p.norm.weight.detach().double(), p.norm.bias.detach().double(), p.norm.eps
    fc1, act, fc2 = (copy.deepcopy(m).double() for m in (p.linear_fc1, p.act_fn, p.linear_fc2))

    def f(row):
        xp = row.reshape(-1, d)
        xc = xp - xp.mean(-1, keepdim=True)
        y = g * xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps) + b
        return fc2(act(fc1(y.reshape(-1, P * D_V)))).reshape(*row.shape[:-1], -1)

    return f


def jacobians(f, x):
    return torch.stack([torch.autograd.functional.jacobian(f, xi) for xi in x.double()])  # [N, d, d_in]


def rms(jac, d_in):
    return (jac.pow(2).sum((1, 2)) / d_in).sqrt()


def _f64(p):
    return merger64(p) if hasattr(p, "norm") else copy.deepcopy(p).double()


CASES = {
    "qwen3-merger": lambda: qwen3_merger(),
    "qwen3-deepstack-merger": lambda: qwen3_merger(postshuffle=True),
    "onevision-projector": lambda: onevision_projector(),
}


def test_reference_matches_the_module():
    for post in (False, True):
        p, x = qwen3_merger(postshuffle=post), tokens()
        want = p(x.reshape(-1, D_V) if not post else x)
        assert torch.allclose(merger64(p)(x.double()).float(), want, rtol=1e-4, atol=1e-5)


def test_structure_recognises_the_layernorm_mergers():
    for post, groups in ((False, P), (True, 1)):
        s = projector_structure(qwen3_merger(postshuffle=post))
        assert s is not None and s.norm is not None and s.norm.center and s.norm.groups == groups
    from zoocli.adapters.qwen3_vl import MergerProjector

    s = projector_structure(MergerProjector(qwen3_merger()))  # the adapter's row-wise wrapper is looked through
    assert s is not None and s.norm.center


def test_a_norm_after_the_mlp_is_not_taken_for_the_merger():
    """Same attribute names, another order: the probe sees it and the generic path takes over."""
    class Swapped(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.norm, self.linear_fc1, self.act_fn, self.linear_fc2 = (
                nn.LayerNorm(D_OUT), m.linear_fc1, m.act_fn, m.linear_fc2)

        def forward(self, x):
            return self.norm(self.linear_fc2(self.act_fn(self.linear_fc1(x.view(-1, P * D_V)))))

    assert projector_structure(Swapped(qwen3_merger())) is None


@pytest.mark.parametrize("case", list(CASES))
def test_exact_equals_float64_jacobian(case):
    p, x = CASES[case](), tokens()
    ref = rms(jacobians(_f64(p), x), x.shape[1])
    got = token_sensitivity(x, p)
    assert ref.std() / ref.mean() > 0.05  # the data spreads the sensitivities
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=0), (got.double() / ref - 1).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_spearman_against_float64_jacobian(case, dtype):
    """The weights and tokens as loaded (fp32 or bf16); the reference is the float64 Jacobian of the
    float64 module (bf16 weights upcast, so both see the same projector)."""
    p, x = copy.deepcopy(CASES[case]()).to(dtype), tokens().to(dtype)
    ref = rms(jacobians(_f64(copy.deepcopy(p).float()), x.float()), x.shape[1])
    got = token_sensitivity(x, p)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert spearman(got, ref) >= 0.99


@pytest.mark.parametrize("estimator", ["fd", "jvp"])
@pytest.mark.parametrize("case", ["qwen3-merger", "qwen3-deepstack-merger"])
def test_sampled_fast_path_matches_float64_monte_carlo(case, estimator):
    """fd / jvp take the structured path with the LayerNorm linearised: against E_u ||J u|| with the
    same directions' count from float64 Jacobians, and against the naive two-pass estimator."""
    p, x = CASES[case](), tokens()
    jac = jacobians(_f64(p), x)
    u = torch.randn(4096, x.shape[1], generator=torch.Generator().manual_seed(999), dtype=torch.float64)
    ref = torch.einsum("nod,kd->nko", jac, u / u.norm(dim=-1, keepdim=True)).norm(dim=-1).mean(1)
    got = token_sensitivity(x, p, m=512, seed=3, estimator=estimator)
    assert spearman(got, ref) >= 0.97
    assert float(((got.double() - ref).abs() / ref).mean()) < 0.05
    naive = token_sensitivity(x, p, m=64, estimator="naive")
    same = token_sensitivity(x, p, m=64, estimator=estimator)
    assert float(((same - naive).abs() / naive).max()) < (2e-3 if estimator == "fd" else 1e-2)


def test_sampled_rank_full_equals_full():
    p, x = qwen3_merger(), tokens()
    full = token_sensitivity(x, p, m=32, estimator="fd")
    assert torch.allclose(token_sensitivity(x, p, m=32, estimator="fd", rank=D_OUT), full, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen3-vl", "tiny-llava-onevision"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_on_the_tiny_models_projectors(name, dtype, zoo_model_cache):
    """The adapters' own projectors on encoded images: the closed form (Qwen3-VL's LayerNorm merger,
    OneVision's Linear-GELU-Linear) ranks like the float64 Jacobian, in fp32 and bf16."""
    import numpy as np
    from PIL import Image

    from zoocli.adapters import load_adapter

    a = load_adapter(name, device="cpu", dtype=dtype, cache_dir=zoo_model_cache)
    assert projector_structure(a.projector) is not None  # the closed form, not the torch.func fallback
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    enc = a.encode(a.prepare(img, "What is it?"))
    x = enc.vision
    proj64 = copy.deepcopy(a.projector).double()
    ref = rms(jacobians(lambda r: proj64(r[None])[0], x.float()), x.shape[1])
    got = token_sensitivity(x, a.projector)
    assert spearman(got, ref) >= 0.99
    if dtype == torch.float32:
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=0)
