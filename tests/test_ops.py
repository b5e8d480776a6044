"""The shared helpers against slow, obvious float64 references."""

from __future__ import annotations

import itertools
import math

import torch

from zoocli.ops import average_ranks, cosine_distance, jaccard, spearman, stable_topk, unit_rows


def _ref_ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: (x[i], i))
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2
        i = j + 1
    return ranks


def _ref_spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ref_ranks(a), _ref_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else float("nan")


def test_average_ranks_and_spearman_match_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(2, 40, (1,), generator=g))
        a = torch.randint(0, 6, (n,), generator=g).double()  # many ties
        b = torch.randn(n, generator=g, dtype=torch.float64)
        assert average_ranks(a).tolist() == _ref_ranks(a.tolist())
        want = _ref_spearman(a.tolist(), b.tolist())
        got = spearman(a, b)
        assert (math.isnan(want) and math.isnan(got)) or abs(got - want) < 1e-12


def test_spearman_constant_is_nan_and_tie_rule_is_average():
    assert math.isnan(spearman(torch.ones(5), torch.arange(5.0)))
    # with position-broken ties this would be 1.0; with average ranks it is not
    a = torch.tensor([0.0, 0.0, 1.0, 2.0])
    b = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert abs(spearman(a, b) - _ref_spearman(a.tolist(), b.tolist())) < 1e-12
    assert spearman(a, b) < 1.0


def test_stable_topk_ties_to_lowest_index_and_batched():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert stable_topk(s, 3).tolist() == [1, 2, 4]
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 4, (6, 20), generator=g).float()
    for row, got in zip(batch, stable_topk(batch, 7)):
        want = sorted(range(20), key=lambda i: (-float(row[i]), i))[:7]
        assert got.tolist() == want


def test_unit_rows_and_cosine_distance_against_float64():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(30, 8, generator=g)
    z[5] = 3 * z[4]  # same direction: distance exactly 0
    zn = unit_rows(z)
    assert torch.allclose(zn.norm(dim=1), torch.ones(30))
    for i in range(30):
        z64 = z.double()
        ref = 1 - (z64 @ z64[i]) / (z64.norm(dim=1) * z64[i].norm())
        got = cosine_distance(zn, i)
        assert torch.allclose(got.double(), ref.clamp_min(0), atol=2e-6)
    assert cosine_distance(zn, 4)[5] == 0.0


def test_jaccard():
    assert jaccard([], []) == 1.0
    assert jaccard([1, 2], [2, 3]) == 1 / 3
    for a, b in itertools.product([[0], [0, 1], [2]], repeat=2):
        assert 0.0 <= jaccard(a, b) <= 1.0


def test_ttft_e2e_single_definition():
    from zoocli.timing import add_ttft_e2e

    ms = {"preprocess": 1.0, "vision": 2.0, "selection": 3.0, "build": 4.0, "prefill": 5.0, "decode": 6.0}
    assert add_ttft_e2e(dict(ms)) == {**ms, "ttft": 15.0, "e2e": 21.0}
    assert add_ttft_e2e(dict(ms), selection_in_prefill=True)["ttft"] == 12.0
    assert add_ttft_e2e({"prefill": 2.0})["e2e"] == 2.0
