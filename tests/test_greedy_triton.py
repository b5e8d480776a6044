"""The fused selection kernel (zoocli/greedy_triton.py): the same picks as the torch loop, bit for
bit, in one launch. Without a GPU it runs through Triton's CPU interpreter (conftest sets Triton's
own switch), so CI checks the very kernel a GPU runs; timings here mean nothing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import zoocli.greedy as G  # noqa: E402
from zoocli.opcount import OpCounter  # noqa: E402

from test_greedy import METHODS, inputs, reference, assert_matches_reference, run  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def both(method, z, s, k, lengths=None):
    dev = DEVICES[-1]
    z, s = z.to(dev), s.to(dev)
    return run(method, z, s, k, lengths, backend="torch"), run(method, z, s, k, lengths, backend="triton")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8), n=st.integers(1, 3000),
       dim=st.sampled_from([3, 16, 64]), kfrac=st.floats(0.0, 1.0),
       kind=st.sampled_from(["random", "clustered", "duplicates"]), which=st.sampled_from(METHODS),
       ragged=st.booleans(), per_row=st.booleans())
def test_fused_equals_torch(seed, b, n, dim, kfrac, kind, which, ragged, per_row):
    method, _ = which
    b = min(b, max(1, 4000 // n))  # the interpreter runs the programs one after another
    k = max(1, int(kfrac * min(n, max(1, 200 // b))))
    z, s = inputs(seed, b, n, dim, kind)
    lengths = [n] + [max(1, n - 37 * r) for r in range(1, b)] if ragged else None
    ks = [max(1, k - 3 * r) for r in range(b)] if per_row else k
    want, got = both(method, z, s, ks, lengths)
    assert got.dtype == torch.long and torch.equal(got, want)


@pytest.mark.slow
def test_fused_runs_k_up_to_n_at_3000_tokens():
    z, s = inputs(2, 1, 3000, 16, "random")
    want, got = both("zoo", z, s, 3000)
    assert torch.equal(got, want)
    assert sorted(got[0].tolist()) == list(range(3000))


@pytest.mark.parametrize("method", ["zoo", "sum", "divprune"])
def test_fused_padding_budgets_and_duplicates(method):
    z, s = inputs(9, 6, 700, 32, "duplicates")
    lengths = [700, 699, 1, 2, 350, 640]
    want, got = both(method, z, s, [5, 700, 1, 9, 400, 64], lengths)
    assert torch.equal(got, want)
    for r, nr in enumerate(lengths):  # and the float64 reference, up to float32 near-ties
        k = [5, 700, 1, 9, 400, 64][r]
        ref, steps = reference(z[r, :nr], k, None if method == "divprune" else s[r, :nr],
                               {"zoo": "product", "sum": "sum", "divprune": None}[method])
        assert_matches_reference(got[r, :len(ref)].tolist(), ref, steps)
        assert (got[r, len(ref):] == -1).all()


def test_one_launch_few_ops_no_sync_whatever_k():
    """LLaVA-NeXT's per-crop shape: at most 30 ATen ops around one launch, the same for k = 32
    and k = 128, and no host sync."""
    z, s = inputs(1, 5, 576, 64, "random")
    ops = {}
    for k in (32, 128):
        run("zoo", z, s, k, backend="triton")
        with OpCounter() as c:
            run("zoo", z, s, k, backend="triton")
        assert c.launches == 1 and c.syncs == 0
        ops[k] = c.ops
    assert ops[32] == ops[128] <= 30


def test_triton_where_it_cannot_run_is_one_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, s = inputs(1, 1, 10, 4, "random")
    with pytest.raises(G.BackendError, match="cannot run here: the tensors are on cpu"):
        run("zoo", z[0], s[0], 3, backend="triton")
    assert G.resolve_backend("auto", "cpu") == "torch"


def test_triton_refuses_a_gram_matrix_over_the_cap(monkeypatch):
    monkeypatch.setattr(G, "GRAM_MAX_MB", 0)
    z, s = inputs(1, 1, 10, 4, "random")
    with pytest.raises(G.BackendError, match="Gram matrix"):
        run("divprune", z, s, 3, backend="triton")
