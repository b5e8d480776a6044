"""The exact estimator's ``precision``: bf16 products rank tokens like float64 on every projector kind.

Kinds: LLaVA's Linear-GELU-Linear (HF module and nn.Sequential), Qwen2.5-VL's RMSNorm merger, Qwen3-VL's
LayerNorm mergers (per patch and the deepstack "postshuffle" one), LLaVA-OneVision's projector and an
unrecognised projector (the ``torch.func`` fallback). References: float64 autograd Jacobians
(tests/test_sensitivity_exact.py, tests/test_sensitivity_layernorm.py). bf16 matmuls run on the CPU,
so the bf16 path is tested here; ``tf32`` needs CUDA (the gpu-marked case).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import test_sensitivity as T
import test_sensitivity_layernorm as L
import torch
from test_sensitivity_exact import jacobian_rms

import zoocli.sensitivity.exact as E
from zoocli.errors import UsageError
from zoocli.methods import PruneInputs, get_method, parse_method_spec
from zoocli.ops import spearman
from zoocli.sensitivity import PRECISIONS, check_options, projector_structure, token_sensitivity


def _kinds():
    """name -> (projector, tokens [N, d_in], float64 ||J||_F / sqrt(d_in) of the projector as given)."""
    out = {}
    for name, (build, data, kind) in T.CASES.items():
        out[name] = (build, lambda data=data: data(n=160),
                     lambda p, x, kind=kind: jacobian_rms(p, x, kind))
    for name, build in L.CASES.items():
        out[name] = (build, lambda: L.tokens(n=160),
                     lambda p, x: L.rms(L.jacobians(L._f64(p), x), x.shape[1]))
    return out


KINDS = _kinds()


def test_every_kind_is_covered():
    """The seven kinds, with the structured path where one exists and the fallback for ``generic``."""
    assert set(KINDS) == {"llava", "sequential", "merger", "generic", "qwen3-merger",
                          "qwen3-deepstack-merger", "onevision-projector"}
    for name, (build, _, _) in KINDS.items():
        assert (projector_structure(build()) is None) == (name == "generic"), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-model", "bf16-model"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_products_rank_like_float64(kind, dtype):
    """precision=bf16 against the float64 Jacobian of the same weights: Spearman >= 0.99 and values
    within 3% (bf16 keeps 8 bits, the accumulations stay fp32); it really ran in bf16 (differs from fp32)."""
    build, data, ref_fn = KINDS[kind]
    p, x = copy.deepcopy(build()).to(dtype), data().to(dtype)
    ref = ref_fn(copy.deepcopy(p).float(), x.float())
    assert ref.std() / ref.mean() > 0.05  # the data spreads the sensitivities
    got = token_sensitivity(x, p, precision="bf16")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert spearman(got, ref) >= 0.99
    rel = (got.double() / ref - 1).abs().max()
    assert rel < 0.03, rel
    assert not torch.equal(got, token_sensitivity(x, p, precision="fp32"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_fp32_stays_exact_and_auto_is_fp32_on_cpu(kind):
    build, data, ref_fn = KINDS[kind]
    p, x = build(), data()
    f32 = token_sensitivity(x, p, precision="fp32")
    assert torch.allclose(f32.double(), ref_fn(p, x), rtol=1e-4, atol=0)
    assert torch.equal(token_sensitivity(x, p), f32)  # auto on CPU: bit for bit
    assert torch.equal(token_sensitivity(x, p, precision="auto"), f32)
    pb, xb = copy.deepcopy(p).to(torch.bfloat16), x.to(torch.bfloat16)  # a bf16 model on CPU too
    assert torch.equal(token_sensitivity(xb, pb), token_sensitivity(xb, pb, precision="fp32"))


def test_chunking_does_not_change_bf16_results():
    build, data, _ = KINDS["merger"]
    p, x = build(), data()
    base = token_sensitivity(x, p, precision="bf16")
    for mb in (0.001, 0.05):
        assert torch.allclose(token_sensitivity(x, p, precision="bf16", chunk_mb=mb), base, rtol=1e-6, atol=0)


def test_auto_resolution():
    def t(device, dtype):  # resolve_precision reads only the device type and the dtype
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert E.resolve_precision("auto", t("cuda", torch.bfloat16)) == "bf16"
    assert E.resolve_precision("auto", t("cuda", torch.float16)) == "bf16"  # fp32's exponent range
    assert E.resolve_precision("auto", t("cuda", torch.float32)) == "tf32"
    assert E.resolve_precision("auto", t("cuda", torch.float64)) == "fp32"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert E.resolve_precision("auto", t("cpu", dtype)) == "fp32"
    for given in ("fp32", "tf32", "bf16"):
        assert E.resolve_precision(given, t("cpu", torch.float32)) == given


def test_bf16_matrices_are_the_rounded_fp32_ones():
    """The cached M in bf16 is the fp32 build rounded; asking fp32 after a bf16-only cache builds it
    again in fp32 (never widens the rounded copy)."""
    s = projector_structure(KINDS["qwen3-merger"][0]())
    E.forget_matrices(s)
    m16 = E.exact_matrices(s, "cpu", torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    m32 = E.exact_matrices(s, "cpu")
    assert m32.dtype == torch.float32 and not torch.equal(m32, m16.float())
    assert torch.equal(m16, m32.to(torch.bfloat16))
    assert E.exact_matrices(s, "cpu", torch.bfloat16) is m16 and E.exact_matrices(s, "cpu") is m32
    E.forget_matrices(s)
    assert torch.equal(E.exact_matrices(s, "cpu"), m32)


@pytest.mark.parametrize("kw, match", [
    ({"precision": "fp16"}, "unknown precision 'fp16'; known: auto, fp32, tf32, bf16"),
    ({"precision": None}, "unknown precision"),
    ({"precision": "bf16", "estimator": "fd"}, "precision applies to the exact estimator, not fd"),
    ({"precision": "fp32", "estimator": "naive"}, "precision applies to the exact estimator"),
])
def test_bad_precision(kw, match):
    with pytest.raises(UsageError, match=match):
        check_options(**kw)
    with pytest.raises(UsageError, match=match):
        token_sensitivity(T.tokens(), T.mlp_seq(), **kw)


def test_tf32_needs_cuda():
    assert PRECISIONS == ("auto", "fp32", "tf32", "bf16")
    with pytest.raises(UsageError, match="precision='tf32' needs a CUDA device"):
        token_sensitivity(T.tokens(), T.mlp_seq(), precision="tf32")
    check_options(precision="auto", estimator="fd")  # the default goes with every estimator


def test_method_spec_takes_precision():
    name, opts = parse_method_spec("zoo:precision=fp32")
    assert (name, opts) == ("zoo", {"precision": "fp32"})
    assert get_method("zoo").options["precision"] == "auto"
    for spec in ("sensitivity:precision=bf16", "sum:precision=auto"):
        parse_method_spec(spec)
    with pytest.raises(UsageError, match="zoo:precision=fp64.*unknown precision 'fp64'"):
        parse_method_spec("zoo:precision=fp64")
    with pytest.raises(UsageError, match="precision applies to the exact estimator, not fd"):
        parse_method_spec("zoo:estimator=fd:precision=bf16")


def test_zoo_method_passes_precision_on():
    """The method's scores are token_sensitivity's with the precision asked for."""
    p, x = T.llava_projector(), T.tokens()
    with torch.no_grad():
        inp = PruneInputs(features=p(x), vision=x, projector=p, seed=0)
    method = get_method("zoo")
    for prec in ("fp32", "bf16"):
        sel = method.fn(inp, 8, **method.validate({"precision": prec, "backend": "torch"}))
        assert torch.equal(sel.scores, token_sensitivity(x, p, precision=prec))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_auto_ranks_like_float64(kind):
    """On CUDA, auto is bf16 for a bf16 model and TF32 for fp32: both rank like float64; fp32
    stays exact there, and the TF32 switch is left as it was."""
    build, data, ref_fn = KINDS[kind]
    before = torch.backends.cuda.matmul.allow_tf32
    for dtype in (torch.bfloat16, torch.float32):
        p, x = copy.deepcopy(build()).to(dtype), data().to(dtype)
        ref = ref_fn(copy.deepcopy(p).float(), x.float())
        got = token_sensitivity(x.cuda(), p.cuda()).cpu()
        assert spearman(got, ref) >= 0.99
        assert (got.double() / ref - 1).abs().max() < 0.03
    p, x = build(), data()
    got = token_sensitivity(x.cuda(), p.cuda(), precision="fp32").cpu()
    assert torch.allclose(got.double(), ref_fn(p, x), rtol=1e-4, atol=0)
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_derivative_kernel_equals_the_jvp(approximate):
    """act_prime's GELU shortcut gives the jvp's values bit for bit (fp32 and bf16 inputs)."""
    from zoocli.sensitivity.structure import act_prime

    act = torch.nn.GELU(approximate=approximate)
    for dtype in (torch.float32, torch.bfloat16):
        a0 = (3 * torch.randn(50, 70, generator=torch.Generator().manual_seed(3))).to(dtype)
        want = torch.func.jvp(act, (a0,), (torch.ones_like(a0),))[1]
        assert torch.equal(act_prime(act, a0), want)


def test_weight_casts_are_cached_per_dtype():
    """f32 / cast of a parameter: one copy per (parameter, dtype), rebuilt when the weight changes."""
    from zoocli.sensitivity.structure import cast, f32

    w = T.mlp_seq()[0].to(torch.bfloat16).weight
    c32, c16 = f32(w, torch.device("cpu")), cast(w, torch.device("cpu"), torch.float16)
    assert c32.dtype == torch.float32 and c16.dtype == torch.float16
    assert f32(w, torch.device("cpu")) is c32 and cast(w, torch.device("cpu"), torch.float16) is c16
    assert cast(w, torch.device("cpu"), torch.bfloat16).data_ptr() == w.data_ptr()  # its own dtype: no copy
    with torch.no_grad():
        w.mul_(2)
    again = f32(w, torch.device("cpu"))
    assert again is not c32 and torch.equal(again, 2 * c32)
