"""zoocli.kernel_bench on tiny shapes: the rows the CLI renders, the exact / reference columns, and the
float64 Monte Carlo reference against the float64 Jacobian. Timings are never asserted."""

from __future__ import annotations

import copy

import torch

from zoocli.kernel_bench import bench_merger, markdown_table, mc_reference, sensitivity_bench
from zoocli.ops import spearman

CLI_KEYS = {"name", "spectrum", "median_ms", "min_ms", "max_ms", "d_in", "d_hidden", "d_out",
            "device", "torch", "threads"}


def test_rows_have_the_cli_keys_and_the_new_columns():
    rows = sensitivity_bench(n=16, d_in=16, d_hidden=32, d_out=24, m=4, repeats=1, warmup=1,
                             ranks=(4,), ref_tokens=6, ref_dirs=32, merger=(8, 4, 32, 20))
    assert all(CLI_KEYS <= set(r) for r in rows)
    names = [r["name"] for r in rows]
    assert names.count("exact") == 2 and sum("once, cached" in n for n in names) == 4
    for r in rows:
        if r["name"] in ("exact", "fd"):
            assert -1 <= r["spearman_vs_ref"] <= 1 and r["ref_tokens"] == 6 and r["speedup_vs_fd"] > 0
    assert "Spearman vs float64 ref" in markdown_table(rows)


def test_mc_reference_against_float64_jacobian():
    p = bench_merger(d_v=8, groups=4, d_hidden=24, d_out=12, seed=1)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.3, 3, 10)[:, None]
    p64 = copy.deepcopy(p).double()

    def rows(r):
        return p64(r.reshape(-1, 8)).reshape(r.shape[0], -1)

    ref = mc_reference(x, rows, n_dirs=1024, seed=0)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: rows(v[None])[0], xi) for xi in x.double()])
    rms = (jac.pow(2).sum((1, 2)) / 32).sqrt()
    assert ((ref / rms) < 1.001).all() and ((ref / rms) > 0.85).all()  # E||Ju|| <= sqrt(E||Ju||^2)
    assert spearman(ref, rms) >= 0.95


def test_structured_reference_equals_the_jvp_reference_on_the_same_directions():
    from zoocli.kernel_bench import _rows64, bench_projector, clip_like, structured_reference

    p = bench_projector(16, 40, 24, "decay", seed=2)
    x = clip_like(12, 16, seed=2)
    ha, hb = structured_reference(x, p, n_dirs=64, seed=5, chunk_mb=0.01)  # chunks of one token
    # the first half uses the same 32 directions (the same generator draws) as mc_reference
    torch.testing.assert_close(ha, mc_reference(x, _rows64(p), 32, seed=5), rtol=1e-10, atol=0)
    both = structured_reference(x, p, n_dirs=64, seed=5)  # one chunk: the same numbers
    torch.testing.assert_close(both[1], hb, rtol=1e-12, atol=0)
    assert not torch.equal(ha, hb)  # independent halves


def test_reference_columns_report_the_split_half_ceiling():
    rows = sensitivity_bench(n=16, d_in=16, d_hidden=32, d_out=24, m=4, repeats=1, warmup=0,
                             estimators=("fd",), ranks=(), ref_tokens=10, ref_dirs=64, merger=(8, 4, 32, 20))
    for r in rows:
        if "spearman_vs_ref" in r:
            split = r["ref_split_half_spearman"]
            assert -1 <= split <= 1 and r["ref_reliability"] == 2 * split / (1 + split)
    assert {r["ref"] for r in rows if "ref" in r} == {
        "float64 E_u||J u|| (structured: W2 (a_i * W1 u))", "float64 E_u||J u|| (jvp)"}
