"""Selection kernels against brute-force float64 references, and the registry contract for every method."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoocli import METHODS, PruneInputs, divprune_select, get_method, select, zoo_select
from zoocli.methods import LLMView
from zoocli.errors import UnknownNameError, UsageError
from zoocli.greedy import normalize_scores
from zoocli.methods.zoo import sum_select

# ---------------------------------------------------------------- brute-force references (float64)


def _cos64(z):
    """Cosine matrix in float64; identical directions are exactly 1 (as in exact arithmetic)."""
    z = z.double()
    n = z / z.norm(dim=-1, keepdim=True)
    cos = [[float(n[i] @ n[j]) for j in range(len(z))] for i in range(len(z))]
    return [[1.0 if abs(c - 1) < 1e-12 else c for c in row] for row in cos]


def ref_zoo(s, z, k, fuse="product"):
    """Alg. 1 written out with Python loops over every candidate, float64."""
    s = [float(v) for v in s.double()]
    lo, hi = min(s), max(s)
    s_hat = [1.0] * len(s) if hi == lo else [(v - lo) / (hi - lo) for v in s]
    cos = _cos64(z)
    picked: list[int] = []
    while len(picked) < k:
        best, best_i = None, None
        for i in range(len(s)):
            if i in picked:
                continue
            if not picked:
                score = s_hat[i]
            else:
                div = 1 - max(cos[i][j] for j in picked)
                score = s_hat[i] * div if fuse == "product" else s_hat[i] + div
            if best is None or score > best:  # strict: ties keep the lowest index
                best, best_i = score, i
        picked.append(best_i)
    return picked


def ref_divprune(z, k):
    cos = _cos64(z)
    n = len(cos)
    dist = [[1 - c for c in row] for row in cos]
    nearest = [min(dist[i][j] for j in range(n) if j != i) if n > 1 else 0.0 for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < k:
        cand = [i for i in range(n) if i not in picked]
        picked.append(max(cand, key=lambda i: (min(dist[i][j] for j in picked), -i)))
    return picked


def _cases():
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        n, d = 12 + 3 * trial, 5 + trial
        z = torch.randn(n, d, generator=g)
        s = torch.rand(n, generator=g)
        yield f"random{trial}", s, z
    # near-duplicates: clusters of tokens a small step apart
    base = torch.randn(4, 6, generator=g)
    z = torch.cat([base + 0.05 * torch.randn(4, 6, generator=g) for _ in range(4)])
    yield "near-duplicates", torch.rand(16, generator=g), z
    yield "constant-sensitivity", torch.full((15,), 3.0), torch.randn(15, 4, generator=g)
    # exact duplicate tokens: divergence is exactly zero, ties resolve to the lowest index
    zd = torch.randn(5, 4, generator=g).repeat(3, 1)
    yield "exact-duplicates", torch.rand(15, generator=g), zd


CASES = list(_cases())


@pytest.mark.parametrize("name,s,z", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_zoo_select_matches_bruteforce(name, s, z, k):
    assert zoo_select(s, z, k).tolist() == ref_zoo(s, z, k)


@pytest.mark.parametrize("name,s,z", CASES, ids=[c[0] for c in CASES])
def test_sum_fusion_matches_bruteforce(name, s, z):
    assert sum_select(s, z, 7).tolist() == ref_zoo(s, z, 7, fuse="sum")


@pytest.mark.parametrize("name,s,z", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_divprune_select_matches_bruteforce(name, s, z, k):
    assert divprune_select(z, k).tolist() == ref_divprune(z, k)


def test_zoo_first_pick_is_most_sensitive_and_picks_are_distinct():
    g = torch.Generator().manual_seed(1)
    s, z = torch.rand(50, generator=g), torch.randn(50, 8, generator=g)
    idx = zoo_select(s, z, 50)
    assert idx[0] == torch.argmax(s)
    assert sorted(idx.tolist()) == list(range(50))


def test_normalize_constant_is_ones_not_nan():
    assert torch.equal(normalize_scores(torch.full((4,), 2.5)), torch.ones(4))
    out = normalize_scores(torch.tensor([1.0, 3.0, 2.0]))
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 0.5]))


def test_divprune_picks_one_token_per_cluster():
    g = torch.Generator().manual_seed(2)
    centers = torch.eye(3, 8) * 10
    z = torch.cat([c + 0.1 * torch.randn(10, 8, generator=g) for c in centers])
    idx = divprune_select(z, 3)
    assert sorted(int(i) // 10 for i in idx) == [0, 1, 2]


# ---------------------------------------------------------------- registry contract, every method


def _inputs_for(method, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv, d = 6, 5
    proj = torch.nn.Sequential(torch.nn.Linear(dv, 8), torch.nn.GELU(), torch.nn.Linear(8, d))
    vision = torch.randn(n, dv, generator=g)
    with torch.no_grad():
        feats = proj(vision)
    full = dict(
        features=feats, vision=vision, projector=proj,
        cls_attn=torch.rand(n, generator=g), vision_keys=torch.randn(n, 4, generator=g),
        text_attn=torch.rand(n, generator=g), prompt=torch.randn(3, d, generator=g),
        grid=(1, n), seed=seed,
    )
    return PruneInputs(**full)


# Contract tests run over every pre-LLM method (``select``); in-LLM methods (FastV, SparseVLM) have
# no selection function and are tested through their ``plan`` below.
PRE_LLM = sorted(n for n, m in METHODS.items() if m.stage == "pre_llm")
IN_LLM = sorted(n for n, m in METHODS.items() if m.stage == "in_llm")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(PRE_LLM), n=st.integers(1, 40), keep=st.integers(1, 60),
       seed=st.integers(0, 3))
def test_every_method_keeps_k_distinct_in_range(name, n, keep, seed):
    inp = _inputs_for(get_method(name), n, seed)
    opts = {"m": 8, "estimator": "fd"} if "m" in get_method(name).options else {}
    sel = select(name, inp, keep, **opts)
    idx = sel.idx
    want = n if name == "none" else min(keep, n)
    assert idx.dtype == torch.long and idx.ndim == 1 and idx.numel() == want
    assert len(set(idx.tolist())) == want
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    for t in (sel.tokens, sel.scores):
        if t is not None:
            assert torch.isfinite(t).all()
    if sel.tokens is not None:
        assert sel.tokens.shape[0] == want


@pytest.mark.parametrize("name", PRE_LLM)
def test_keep_at_least_n_keeps_all(name):
    inp = _inputs_for(get_method(name), 9)
    assert select(name, inp, 9).idx.tolist() == list(range(9))
    assert select(name, inp, 100).idx.tolist() == list(range(9))


@pytest.mark.parametrize("name", PRE_LLM)
@pytest.mark.parametrize("keep", [0, -3])
def test_nonpositive_keep_is_a_clear_error(name, keep):
    with pytest.raises(UsageError, match="keep must be at least 1"):
        select(name, _inputs_for(get_method(name), 9), keep)


@pytest.mark.parametrize("name", PRE_LLM)
def test_methods_are_deterministic(name):
    inp = _inputs_for(get_method(name), 20, seed=3)
    opts = {"m": 8, "estimator": "fd"} if "m" in get_method(name).options else {}
    a, b = select(name, inp, 6, **opts), select(name, inp, 6, **opts)
    assert torch.equal(a.idx, b.idx)


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownNameError) as e:
        get_method("fastestv")
    msg = str(e.value)
    assert "unknown method 'fastestv'" in msg
    for name in ("zoo", "divprune", "none"):
        assert name in msg


def test_unknown_option_is_refused():
    with pytest.raises(UsageError, match="has no option"):
        select("divprune", _inputs_for(None, 8), 3, m=4)


def test_missing_signal_is_refused():
    inp = PruneInputs(features=torch.randn(8, 4))
    with pytest.raises(UsageError, match="needs"):
        select("zoo", inp, 3)


def test_random_depends_on_seed():
    a = select("random", _inputs_for(None, 40, seed=0), 10).idx
    b = select("random", _inputs_for(None, 40, seed=1), 10).idx
    assert not torch.equal(a, b)


def test_sensitivity_ablation_is_topk():
    inp = _inputs_for(None, 30)
    sel = select("sensitivity", inp, 5, m=16, estimator="fd")
    top = torch.sort(sel.scores, descending=True, stable=True).indices[:5]
    assert sel.idx.tolist() == top.tolist()


def test_zoo_registered_defaults_match_paper():
    # the default estimator is exact (no m / h); the sampled estimators default to the paper's m, h
    from zoocli.sensitivity import SAMPLED_DEFAULTS as opts

    assert get_method("zoo").options["estimator"] == "exact"
    assert opts["m"] == 64 and opts["h"] == 0.01


def test_small_exhaustive_tie_order():
    """All-equal tokens and sensitivities: every greedy resolves ties to the lowest index."""
    z = torch.ones(6, 3)
    s = torch.ones(6)
    for k in range(1, 7):
        assert zoo_select(s, z, k).tolist() == list(range(k))
        assert divprune_select(z, k).tolist() == list(range(k))


def _view(n_layers: int, n: int = 12, length: int = 30, seed: int = 0) -> LLMView:
    g = torch.Generator().manual_seed(seed)
    return LLMView(n_layers=n_layers, visual=torch.arange(2, 2 + n), text_after=torch.arange(2 + n, length),
                   layer0=torch.randn(length, 8, generator=g))


def test_every_method_has_exactly_one_compute():
    assert IN_LLM == ["dart", "fastv", "pyramiddrop", "sparsevlm"]
    for m in METHODS.values():
        assert (m.fn is None) == (m.stage == "in_llm") == (m.plan is not None)


@pytest.mark.parametrize("name", IN_LLM)
@pytest.mark.parametrize("n_layers", [2, 3, 4, 32])
@pytest.mark.parametrize("keep", [1, 5, 12, 40])
def test_in_llm_plan_contract(name, n_layers, keep):
    """A plan: stage layers distinct, ascending, in [1, n_layers); counts in [1, N], non-increasing;
    the same plan for the same prompt."""
    view = _view(n_layers)
    stages = get_method(name).plan(view, keep)
    layers, counts = [s.layer for s in stages], [s.n_keep for s in stages]
    assert stages and layers == sorted(set(layers)) and all(1 <= l < n_layers for l in layers)
    assert all(1 <= c <= view.n for c in counts) and counts == sorted(counts, reverse=True)
    again = get_method(name).plan(_view(n_layers), keep)
    assert [(s.layer, s.n_keep) for s in again] == list(zip(layers, counts))


@pytest.mark.parametrize("name", IN_LLM)
def test_in_llm_methods_refuse_select_and_one_layer(name):
    with pytest.raises(UsageError, match="prunes inside the LLM"):
        select(name, _inputs_for(None, 8), 3)
    with pytest.raises(UsageError, match="at least 2 LLM layers"):
        get_method(name).plan(_view(1), 3)


@pytest.mark.parametrize("spec", ["fastv:K=abc", "fastv:K=0", "fastv:K=1.5", "zoo:m=abc", "zoo:h=abc",
                                  "zoo:chunk_mb=x", "zspaprune:core_ratio=abc", "visionzip:dominant=abc",
                                  "sensitivity:m=abc", "sum:m=abc"])
def test_option_values_are_checked_at_parse_time(spec):
    """Regression: ``fastv:K=abc`` used to pass parsing and fail only after the model loaded."""
    from zoocli.methods import parse_method_spec

    with pytest.raises(UsageError):
        parse_method_spec(spec)


def test_import_of_registry_and_adapters_skips_torch_and_transformers():
    """``zoo methods`` / ``zoo models`` / spec parsing stay fast: no torch, no transformers."""
    import subprocess
    import sys

    code = (
        "import sys, zoocli.methods, zoocli.adapters\n"
        "from zoocli.methods import METHODS, parse_method_spec\n"
        "from zoocli.errors import UsageError\n"
        "rows = [(m.name, m.stage, sorted(m.needs), dict(m.options), m.paper) for m in METHODS.values()]\n"
        "assert {'zoo', 'divprune', 'fastv', 'norm', 'vispruner', 'cdpruner', 'downsample', 'dart', 'pyramiddrop'} <= {r[0] for r in rows}, rows\n"
        "assert parse_method_spec('fastv:K=3') == ('fastv', {'K': 3})\n"
        "try:\n    parse_method_spec('fastv:K=abc')\nexcept UsageError:\n    pass\n"
        "else:\n    raise SystemExit('fastv:K=abc accepted')\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_selectors_refuse_a_bad_k_with_a_value_error():
    """``divprune_select(z, 0)`` / ``zoo_select(s, z, 0)``: a clear ValueError, not an IndexError;
    the library's UsageError is a ValueError, so plain Python callers can catch it as one."""
    from zoocli.errors import UnknownNameError, UsageError

    z, s = torch.randn(5, 3), torch.rand(5)
    for call in (lambda: divprune_select(z, 0), lambda: zoo_select(s, z, 0),
                 lambda: divprune_select(z, 1.5)):
        with pytest.raises(ValueError, match="keep"):
            call()
    assert issubclass(UsageError, ValueError) and issubclass(UnknownNameError, ValueError)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")
