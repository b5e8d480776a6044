"""zoocli.greedy: the Gram-form greedy of ZOO-Prune, the sum ablation and DivPrune.

Against an obvious float64 reference (picks equal up to the first float32 near-tie, documented in
zoocli/greedy.py), the row form, the unbatched call, and by its dispatched-op count.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoocli.greedy as G
from zoocli.methods.divprune import divprune_select
from zoocli.methods.zoo import sum_select, zoo_select
from zoocli.opcount import OpCounter
from zoocli.ops import COS_EPS

NEAR_TIE = 1e-5  # float32 scores in [0, 2]: rounding differences are ~1e-7


def reference(z: torch.Tensor, k: int, s: torch.Tensor | None, fuse) -> tuple[list[int], list]:
    """The greedy spelt out in float64 on one scope: picks and, per step, every token's score."""
    z = z.double()
    zn = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = 1 - zn @ zn.T
    d[d < COS_EPS] = 0.0
    n = z.shape[0]
    if s is None:
        off = d + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64))
        first = off.amin(1) if n > 1 else torch.zeros(1, dtype=torch.float64)
        first = torch.where(torch.isinf(first), 0.0, first)
    else:
        s = s.double()
        span = s.max() - s.min()
        s_hat = (s - s.min()) / span if span > 0 else torch.ones_like(s)
        first = s_hat
    picks, steps = [], []
    score = first.clone()
    div = None
    for _ in range(min(k, n)):
        masked = score.clone()
        masked[picks] = float("-inf")
        steps.append(masked)
        i = int(torch.argmax(masked))  # the first maximum: lowest index
        picks.append(i)
        div = d[i].clone() if div is None else torch.minimum(div, d[i])
        score = div if fuse is None else (s_hat * div if fuse == "product" else s_hat + div)
    return picks, steps


def assert_matches_reference(got: list[int], want: list[int], steps: list) -> None:
    """Equal picks, or equal up to a step where the two candidates' exact scores are a near-tie."""
    for t, (a, b) in enumerate(zip(got, want)):
        if a != b:
            sc = steps[t]
            assert abs(float(sc[a]) - float(sc[b])) <= NEAR_TIE, (t, a, b, float(sc[a]), float(sc[b]))
            return
    assert len(got) == len(want)


def inputs(seed: int, b: int, n: int, dim: int, kind: str):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        z = torch.randn(b, n, dim, generator=g)
    elif kind == "clustered":  # near-duplicates around a few centres
        centres = torch.randn(b, 4, dim, generator=g)
        z = centres[:, torch.randint(0, 4, (n,), generator=g)] + 1e-3 * torch.randn(b, n, dim, generator=g)
    else:  # exact duplicates: a few distinct rows repeated
        base = torch.randn(b, 5, dim, generator=g)
        z = base[:, torch.randint(0, 5, (n,), generator=g)]
    s = torch.rand(b, n, generator=g)
    if kind == "duplicates":
        s = (s * 4).round() / 4  # tied scores too
    return z, s


METHODS = [("zoo", "product"), ("sum", "sum"), ("divprune", None)]


def run(method: str, z, s, k, lengths=None, backend="torch"):
    if method == "divprune":
        return divprune_select(z, k, lengths=lengths, backend=backend)
    fn = zoo_select if method == "zoo" else sum_select
    return fn(s, z, k, lengths=lengths, backend=backend)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 8), n=st.integers(1, 3000),
       dim=st.sampled_from([3, 16, 64]), kfrac=st.floats(0.0, 1.0),
       kind=st.sampled_from(["random", "clustered", "duplicates"]), which=st.sampled_from(METHODS))
def test_picks_equal_the_float64_reference(seed, b, n, dim, kfrac, kind, which):
    method, fuse = which
    k = max(1, int(kfrac * n)) if n <= 400 else max(1, int(kfrac * 64))  # the reference is O(N k)
    b = b if n <= 600 else 1
    z, s = inputs(seed, b, n, dim, kind)
    lengths = [n] + [max(1, n - 13 * r) for r in range(1, b)]
    got = run(method, z, s, k, lengths=lengths)
    assert got.shape == (b, min(k, n))
    for r, nr in enumerate(lengths):
        row = got[r].tolist()
        want, steps = reference(z[r, :nr], k, None if fuse is None else s[r, :nr], fuse)
        assert row[len(want):] == [-1] * (len(row) - len(want))
        assert len(set(row[:len(want)])) == len(want) and all(0 <= i < nr for i in row[:len(want)])
        assert_matches_reference(row[:len(want)], want, steps)


@pytest.mark.parametrize("method", ["zoo", "sum", "divprune"])
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates"])
def test_batched_rows_equal_the_unbatched_call(method, kind):
    z, s = inputs(7, 5, 300, 16, kind)
    lengths = [300, 290, 120, 300, 1]
    got = run(method, z, s, 60, lengths=lengths)
    for r, nr in enumerate(lengths):
        one = run(method, z[r, :nr], s[r, :nr], 60)
        assert torch.equal(got[r, :one.shape[0]], one)
        assert (got[r, one.shape[0]:] == -1).all()


@pytest.mark.parametrize("method", ["zoo", "sum", "divprune"])
def test_per_row_budgets_cut_each_row(method):
    z, s = inputs(3, 4, 200, 16, "random")
    full = run(method, z, s, 50)
    ks = [50, 10, 1, 33]
    got = run(method, z, s, ks)
    for r, k in enumerate(ks):
        assert torch.equal(got[r, :k], full[r, :k]) and (got[r, k:] == -1).all()


@pytest.mark.parametrize("method", ["zoo", "sum", "divprune"])
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates"])
def test_row_form_equals_gram_form(method, kind, monkeypatch):
    """Past GRAM_MAX_MB the row form runs: the same picks (here, the same up to near-ties)."""
    z, s = inputs(11, 3, 500, 32, kind)
    lengths = [500, 480, 77]
    gram = run(method, z, s, 80, lengths=lengths)
    monkeypatch.setattr(G, "GRAM_MAX_MB", 0)
    rows = run(method, z, s, 80, lengths=lengths)
    for r, nr in enumerate(lengths):
        want, steps = reference(z[r, :nr], 80, None if method == "divprune" else s[r, :nr],
                                {"zoo": "product", "sum": "sum", "divprune": None}[method])
        assert_matches_reference(gram[r, :len(want)].tolist(), want, steps)
        assert_matches_reference(rows[r, :len(want)].tolist(), want, steps)


def test_score_matrix_running_min_is_the_score_bit_for_bit():
    """The monotone identity behind the Gram form: min_i fl(s * d_ij) == fl(s * min_i d_ij)."""
    g = torch.Generator().manual_seed(5)
    d = torch.rand(40, 300, generator=g)
    s = torch.rand(300, generator=g)
    assert torch.equal((s * d).amin(0), s * d.amin(0))
    assert torch.equal((s + d).amin(0), s + d.amin(0))


def test_torch_gram_path_is_four_ops_per_step_and_no_sync():
    z, s = inputs(1, 5, 576, 64, "random")
    counts = {}
    for k in (32, 128):
        zoo_select(s, z, k, backend="torch")
        with OpCounter() as c:
            zoo_select(s, z, k, backend="torch")
        counts[k] = c.ops
        assert c.syncs == 0
    per_step = (counts[128] - counts[32]) / 96
    assert per_step <= 6, per_step
    assert per_step == 4


def test_unknown_backend_is_a_usage_error():
    z, s = inputs(1, 1, 10, 4, "random")
    with pytest.raises(ValueError, match="unknown selection backend 'cuda'"):
        zoo_select(s[0], z[0], 3, backend="cuda")
    with pytest.raises(ValueError, match="unknown selection backend"):
        divprune_select(z[0], 3, backend="")


def test_auto_is_torch_on_cpu():
    assert G.resolve_backend("auto", "cpu") == "torch"
