"""Per-crop selection as one padded batch (``zoocli.methods.select_scopes``, used by
``pipeline.select_tokens``) equals the per-scope loop, for the methods with a batched kernel
(zoo, sum, sensitivity, divprune): on random scopes of different sizes with near-duplicates, and
on tiny-llava-next's crops; a greedy's first q picks with k = max quota are its picks with k = q."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoocli.methods import PruneInputs, get_method, select, select_scopes
from zoocli.methods.divprune import divprune_select
from zoocli.methods.zoo import sum_select, zoo_select
from zoocli.pipeline import encode_image, prune_inputs, select_tokens, split_budget

BATCHED = ["zoo", "sum", "sensitivity", "divprune"]
CASES = [pytest.param(m, {}, id=f"{m}-exact") for m in BATCHED] + [
    pytest.param(m, {"estimator": "fd", "m": 8}, id=f"{m}-fd") for m in ("zoo", "sum", "sensitivity")]


def _scopes(sizes, seed=0, d_in=12, d=16):
    g = torch.Generator().manual_seed(seed)
    proj = nn.Sequential(nn.Linear(d_in, 24), nn.GELU(), nn.Linear(24, d))
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = []
    for n in sizes:
        x = torch.randn(n, d_in, generator=g)
        x[n // 2] = x[0] + 1e-6  # a near-duplicate
        with torch.no_grad():
            out.append(PruneInputs(features=proj(x), vision=x, projector=proj, seed=3))
    return out


def _same(a, b):
    assert torch.equal(a.idx, b.idx)
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None:
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method,opts", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_scopes_equal_the_per_scope_loop(method, opts, seed):
    inps = _scopes([9, 30, 17, 30, 4], seed)
    keeps = [3, 11, 17, 5, 8]  # 17 and 8 keep the whole scope
    assert get_method(method).batch is not None
    loop = [select(method, inp, k, **opts) for inp, k in zip(inps, keeps)]
    for a, b in zip(select_scopes(method, inps, keeps, **opts), loop):
        _same(a, b)


@pytest.mark.parametrize("fn", [zoo_select, sum_select, divprune_select])
def test_first_q_greedy_picks_with_k_max_are_the_picks_with_k_q(fn):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(40, 8, generator=g)
    z[7] = z[3]  # an exact duplicate
    args = (z,) if fn is divprune_select else (torch.rand(40, generator=g).round(decimals=1), z)
    full = fn(*args, 25)
    for q in (1, 2, 9, 24):
        assert torch.equal(fn(*args, q), full[:q])


def test_methods_without_a_batch_kernel_run_the_loop():
    inps = _scopes([9, 12])
    assert get_method("random").batch is None
    for a, b in zip(select_scopes("random", inps, [3, 4]), [select("random", i, k) for i, k in zip(inps, [3, 4])]):
        _same(a, b)


@pytest.mark.parametrize("method,opts", CASES)
@pytest.mark.parametrize("keep", [5, 23])
def test_llava_next_crops_as_one_batch_equal_the_per_crop_loop(tiny_llava_next, rand_image, method, opts, keep):
    adapter = tiny_llava_next
    enc = encode_image(adapter, rand_image(90, 40), "q?")
    scopes = enc.encoded.scopes
    assert len(scopes) > 2
    sel = select_tokens(adapter, enc.prepared, enc.encoded, method, keep, seed=3, options=opts)
    quotas = split_budget(keep, [len(s.index) for s in scopes])
    want = []
    for s, q in zip(scopes, quotas):
        if q:
            inp = prune_inputs(get_method(method), enc.encoded, adapter.projector, s.index, s.grid, 3, {}, s.cells)
            want.append(s.index[select(method, inp, q, **opts).idx])
    assert torch.equal(sel.kept, torch.sort(torch.cat(want)).values)
    assert sel.per_scope == quotas
