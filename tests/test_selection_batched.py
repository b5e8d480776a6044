"""Batched, sync-free greedy selection: zoo_select / sum_select / divprune_select on [B, N, D].

Every row of a batch (padded rows with ``lengths`` included) equals the unbatched call on that row,
on random cases with near-duplicates, exact duplicates and tied sensitivities; the greedy loops
make no host read (counted at the dispatcher: ``aten._local_scalar_dense`` is what ``.item()``,
``int(t)`` and ``bool(t)`` call). Device-parametrised: the cuda cases carry the ``gpu`` marker and
compare with the CPU result.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoocli.methods.divprune import divprune_select
from zoocli.methods.visionzip import contextual_merge
from zoocli.methods.zoo import sum_select, zoo_select
from zoocli.methods.zspaprune import zspaprune_select

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]

SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "item",
            "unique_dim", "_unique2", "unique_consecutive"}


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a device value back to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def syncs(fn, *args) -> int:
    with SyncCounter() as c:
        fn(*args)
    return c.count


def tricky(n: int, d: int, seed: int):
    """Sensitivities with ties and features with exact and near duplicates."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    z[1::5] = z[0::5][: z[1::5].shape[0]]  # exact duplicates
    z[2::7] = z[3::7][: z[2::7].shape[0]] * (1 + 1e-7 * torch.randn(z[2::7].shape[0], 1, generator=g))
    s = torch.randint(0, 4, (n,), generator=g).float()  # many ties
    s[::3] = torch.rand(s[::3].shape[0], generator=g)
    return s, z


def batch(lengths, d, seed):
    rows = [tricky(n, d, seed + b) for b, n in enumerate(lengths)]
    nmax = max(lengths)
    s = torch.zeros(len(rows), nmax)
    z = torch.zeros(len(rows), nmax, d)
    for b, (sb, zb) in enumerate(rows):
        s[b, : sb.shape[0]], z[b, : zb.shape[0]] = sb, zb
    return rows, s, z


def _row(picks: torch.Tensor, n: int, k: int) -> list[int]:
    got = picks.tolist()
    kk = min(k, n)
    assert got[kk:] == [-1] * (len(got) - kk)  # past the row's token count
    return got[:kk]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 7, 30])
def test_batched_rows_equal_unbatched(seed, k, device):
    lengths = [25, 40, 12, 40]
    rows, s, z = batch(lengths, 16, 10 * seed)
    dev = torch.device(device)
    ln = torch.tensor(lengths, device=dev)
    zs = zoo_select(s.to(dev), z.to(dev), k, lengths=ln).cpu()
    ss = sum_select(s.to(dev), z.to(dev), k, lengths=ln).cpu()
    ds = divprune_select(z.to(dev), k, lengths=ln).cpu()
    kk = min(k, max(lengths))
    assert zs.shape == ss.shape == ds.shape == (len(lengths), kk)
    for b, (sb, zb) in enumerate(rows):
        n = sb.shape[0]
        assert _row(zs[b], n, k) == zoo_select(sb, zb, k).tolist()
        assert _row(ss[b], n, k) == sum_select(sb, zb, k).tolist()
        assert _row(ds[b], n, k) == divprune_select(zb, k).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_unpadded_batch_equals_rows_without_lengths(device):
    rows, s, z = batch([33, 33, 33], 8, 5)
    dev = torch.device(device)
    zs, ds = zoo_select(s.to(dev), z.to(dev), 12).cpu(), divprune_select(z.to(dev), 12).cpu()
    for b, (sb, zb) in enumerate(rows):
        assert zs[b].tolist() == zoo_select(sb, zb, 12).tolist()  # the CPU result, unbatched
        assert ds[b].tolist() == divprune_select(zb, 12).tolist()


def test_all_tied_rows_pick_lowest_indices():
    z, s = torch.ones(2, 6, 3), torch.ones(2, 6)
    assert zoo_select(s, z, 4).tolist() == [[0, 1, 2, 3]] * 2
    assert divprune_select(z, 4, lengths=[6, 3]).tolist() == [[0, 1, 2, 3], [0, 1, 2, -1]]


def test_shape_errors():
    with pytest.raises(ValueError, match="sensitivities"):
        zoo_select(torch.zeros(2, 5), torch.zeros(2, 6, 3), 2)
    with pytest.raises(ValueError, match="lengths"):
        zoo_select(torch.zeros(2, 5), torch.zeros(2, 5, 3), 2, lengths=[5])
    with pytest.raises(ValueError):
        divprune_select(torch.zeros(5), 2)


@pytest.mark.parametrize("fn", ["zoo", "sum", "divprune", "zspaprune"])
def test_greedy_makes_no_host_read_per_step(fn):
    s, z = tricky(60, 16, 0)
    call = {
        "zoo": lambda k: zoo_select(s, z, k),
        "sum": lambda k: sum_select(s, z, k),
        "divprune": lambda k: divprune_select(z, k),
        "zspaprune": lambda k: zspaprune_select(z, torch.randn(3, 16), k),
    }[fn]
    few, many = syncs(call, 4), syncs(call, 40)
    assert few == many  # a fixed number, not one per step
    assert many <= 1
    b = torch.stack([z, z.flip(0)])
    assert syncs(lambda: zoo_select(torch.stack([s, s]), b, 40, lengths=[60, 50])) == 0
    assert syncs(lambda: divprune_select(b, 40, lengths=[60, 50])) == 0


def test_sync_counter_sees_item():
    """The counter itself catches the reads it is meant to catch."""
    t = torch.arange(5)
    assert syncs(lambda: t[2].item()) == 1
    assert syncs(lambda: int(t.sum())) == 1
    assert syncs(lambda: bool((t > 2).any())) >= 1
    assert syncs(lambda: t[torch.tensor(2)]) >= 1  # a 0-d index tensor is read back


def test_visionzip_merge_makes_no_host_read():
    g = torch.Generator().manual_seed(0)
    h, k = torch.randn(50, 8, generator=g), torch.randn(50, 6, generator=g)
    assert syncs(contextual_merge, h, k, 7) == 0
    targets, merged = contextual_merge(h, k, 7)
    # slow reference: every non-target joins its most similar target (cosine of keys)
    kn = k / k.norm(dim=-1, keepdim=True)
    want = h[targets].clone()
    others = [j for j in range(50) if j not in set(targets.tolist())]
    slots = {t: [] for t in range(7)}
    for j in others:
        slots[int(torch.argmax(kn[targets] @ kn[j]))].append(j)
    for t, js in slots.items():
        if js:
            want[t] += h[js].mean(0)
    assert torch.allclose(merged, want, atol=1e-5)
