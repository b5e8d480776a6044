"""Defining behaviour of the baseline methods (VisionZip, FastV, SparseVLM, ZSPAPrune) on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from zoocli.errors import UsageError
from zoocli.methods import PruneInputs, get_method, select
from zoocli.methods.sparsevlm import (
    OFFICIAL_SCHEDULES,
    sparsevlm_layers,
    sparsevlm_raters,
    sparsevlm_schedule,
    sparsevlm_score,
)
from zoocli.methods.visionzip import split_budget


def _vz_inputs(n=12, dv=3, seed=0, cls_attn=None):
    g = torch.Generator().manual_seed(seed)
    vision = torch.randn(n, dv, generator=g)
    return PruneInputs(
        features=vision.clone(),  # identity projector: features == vision
        vision=vision,
        projector=torch.nn.Identity(),
        cls_attn=torch.rand(n, generator=g) if cls_attn is None else cls_attn,
        vision_keys=torch.randn(n, 4, generator=g),
    )


# ---------------------------------------------------------------- VisionZip


def test_visionzip_default_split_is_official():
    assert [split_budget(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_budget(10, dominant=7) == (7, 3)
    assert split_budget(10, contextual=4) == (6, 4)
    with pytest.raises(UsageError):
        split_budget(10, dominant=5, contextual=4)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep", [1, 2, 5, 11])
def test_visionzip_keeps_argmax_cls_attn_and_never_more_than_keep(seed, keep):
    inp = _vz_inputs(seed=seed)
    sel = select("visionzip", inp, keep)
    assert sel.idx.numel() == keep and sel.tokens.shape == (keep, 3)
    assert int(sel.idx[0]) == int(torch.argmax(inp.cls_attn))
    assert len(set(sel.idx.tolist())) == keep


def test_visionzip_dominant_is_topk_with_lowest_index_ties():
    cls_attn = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.5, 0.0, 0.3])
    sel = select("visionzip", _vz_inputs(n=8, cls_attn=cls_attn), 4, dominant=3)
    assert sel.idx[:3].tolist() == [1, 3, 2]
    # dominant tokens are the unmodified features
    assert torch.equal(sel.tokens[:3], _vz_inputs(n=8, cls_attn=cls_attn).features[[1, 3, 2]])


def test_visionzip_merged_token_is_target_plus_mean_of_assigned():
    # 2 dominant (idx 0, 1), remaining 2..7 (6 tokens), 2 contextual -> step 3, targets = rest[0], rest[3] = 2, 5
    cls_attn = torch.tensor([1.0, 0.9, 0, 0, 0, 0, 0, 0])
    vision = torch.arange(8 * 2, dtype=torch.float).view(8, 2) ** 1.5
    keys = torch.tensor([
        [0, 0], [0, 0],  # dominant, unused
        [1, 0],  # target A (idx 2)
        [1, 0.1], [0.2, 1],  # 3 -> A, 4 -> B
        [0, 1],  # target B (idx 5)
        [1, 0.2], [0.9, 0],  # 6 -> A, 7 -> A
    ])
    inp = PruneInputs(features=vision.clone(), vision=vision, projector=torch.nn.Identity(),
                      cls_attn=cls_attn, vision_keys=keys)
    sel = select("visionzip", inp, 4, dominant=2)
    assert sel.idx.tolist() == [0, 1, 2, 5]
    want_a = vision[2] + vision[[3, 6, 7]].mean(0)
    want_b = vision[5] + vision[[4]].mean(0)
    torch.testing.assert_close(sel.tokens[2], want_a)
    torch.testing.assert_close(sel.tokens[3], want_b)


def test_visionzip_unassigned_target_stays_itself_and_projector_is_applied():
    cls_attn = torch.tensor([1.0, 0, 0, 0])
    vision = torch.randn(4, 3)
    keys = torch.tensor([[0, 1.0], [1, 0], [0, 1], [1, 0.1]])
    proj = torch.nn.Linear(3, 2)
    with torch.no_grad():
        feats = proj(vision)
    inp = PruneInputs(features=feats, vision=vision, projector=proj, cls_attn=cls_attn, vision_keys=keys)
    sel = select("visionzip", inp, 3, dominant=1)  # keep 3 of 4: 1 dominant + 2 contextual
    assert sel.idx.tolist()[0] == 0
    # with 3 remaining and C=2: step 1, targets rest[0], rest[1] = 1, 2; token 3 -> most similar target (1)
    assert sel.idx.tolist() == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(sel.tokens[1], proj(vision[1] + vision[3]))
        torch.testing.assert_close(sel.tokens[2], proj(vision[2]))


def test_visionzip_declares_no_qwen():
    assert "qwen2_5_vl" not in get_method("visionzip").families


# ---------------------------------------------------------------- FastV


def test_fastv_is_topk_of_text_attn_with_lowest_index_ties():
    # FastV prunes inside the LLM: its plan is one stage before layer K (clamped to n_layers - 1);
    # the prune loop ranks the last token's attention with ops.stable_topk (ties to the lowest index).
    from zoocli.methods import LLMView
    from zoocli.ops import stable_topk

    ta = torch.tensor([0.2, 0.7, 0.1, 0.7, 0.05, 0.3])
    assert sorted(stable_topk(ta, 3).tolist()) == [1, 3, 5]
    m = get_method("fastv")
    view = LLMView(n_layers=32, visual=torch.arange(1, 7), text_after=torch.arange(7, 9),
                   layer0=torch.randn(9, 4))
    assert [(s.layer, s.n_keep) for s in m.plan(view, 3)] == [(2, 3)]
    assert [(s.layer, s.n_keep) for s in m.plan(view, 3, K=3)] == [(3, 3)]
    shallow = LLMView(n_layers=2, visual=view.visual, text_after=view.text_after, layer0=view.layer0)
    assert [s.layer for s in m.plan(shallow, 3)] == [1]
    assert m.stage == "in_llm" and m.options["K"] == 2 and m.needs == {"decoder"}


# ---------------------------------------------------------------- SparseVLM


@pytest.mark.parametrize("keep", sorted(OFFICIAL_SCHEDULES))
def test_sparsevlm_official_schedules_reproduced(keep):
    sched = sparsevlm_schedule(keep, 576, 32)
    assert [l for l, _ in sched] == [2, 6, 15]
    assert tuple(n for _, n in sched) == OFFICIAL_SCHEDULES[keep]


@pytest.mark.parametrize("n_visual", [576, 2880, 100])
@pytest.mark.parametrize("n_layers", [32, 28, 6])
def test_sparsevlm_schedule_is_monotone_and_bounded(n_visual, n_layers):
    prev_last = None
    for keep in range(1, n_visual + 1, max(1, n_visual // 97)):
        sched = sparsevlm_schedule(keep, n_visual, n_layers)
        layers = [l for l, _ in sched]
        counts = [n for _, n in sched]
        assert layers == sorted(set(layers)) and layers[-1] < n_layers - 1 and layers[0] >= 0
        assert all(a >= b for a, b in zip(counts, counts[1:])), (keep, counts)  # non-increasing
        assert all(1 <= c <= n_visual for c in counts)
        if prev_last is not None:
            assert counts[-1] >= prev_last  # a larger budget never keeps fewer at the end
        prev_last = counts[-1]


def test_sparsevlm_interpolates_between_official_budgets():
    lo, hi = OFFICIAL_SCHEDULES[96], OFFICIAL_SCHEDULES[128]
    mid = [n for _, n in sparsevlm_schedule(112)]
    assert mid == [round((a + b) / 2) for a, b in zip(lo, hi)]
    # scaled beyond the table
    assert [n for _, n in sparsevlm_schedule(32)] == [33, 15, round(17 / 2)]
    assert sparsevlm_layers(28) == [2, 5, 13]


def test_sparsevlm_raters_and_score():
    # visual tokens all point along e0; text token 1 is aligned with them, the others not
    vis = torch.tensor([[3.0, 0, 0], [2.0, 0.1, 0]])
    text = torch.tensor([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0], [0.9, 0, 0]])
    assert sparsevlm_raters(vis, text).tolist() == [1, 3]
    attn = torch.tensor([[[0.2, 0.4, 0.4], [0.4, 0.2, 0.4]], [[0.4, 0.0, 0.6], [0.2, 0.2, 0.6]]])  # [H=2,R=2,N=3]
    torch.testing.assert_close(sparsevlm_score(attn), torch.tensor([0.3, 0.2, 0.5]))
    # in-LLM: the prune loop keeps the stable top-k of the score (ties to the lowest index)
    from zoocli.ops import stable_topk

    assert stable_topk(sparsevlm_score(attn), 2).tolist() == [2, 0]


# ---------------------------------------------------------------- ZSPAPrune


def _zspa_inputs(seed=0, n=20, d=6):
    g = torch.Generator().manual_seed(seed)
    return PruneInputs(features=torch.randn(n, d, generator=g), prompt=torch.randn(4, d, generator=g))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [1, 3, 10])
def test_zspaprune_keeps_most_relevant_token(seed, keep):
    inp = _zspa_inputs(seed)
    z = inp.features / inp.features.norm(dim=-1, keepdim=True)
    q = inp.prompt.mean(0)
    rel = z @ (q / q.norm())
    sel = select("zspaprune", inp, keep)
    assert int(sel.idx[0]) == int(torch.argmax(rel))
    n_core = max(1, round(0.6 * keep))
    assert sel.idx[:n_core].tolist() == torch.sort(rel, descending=True, stable=True).indices[:n_core].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_zspaprune_fill_is_max_min_diverse(seed):
    inp = _zspa_inputs(seed)
    keep = 10
    idx = select("zspaprune", inp, keep, core_ratio=0.3).idx.tolist()
    z = inp.features / inp.features.norm(dim=-1, keepdim=True)
    cos = z @ z.T
    n_core = round(0.3 * keep)
    for t in range(n_core, keep):
        chosen = idx[:t]
        cand = [i for i in range(inp.n) if i not in chosen]
        maxsim = {i: float(cos[i, chosen].max()) for i in cand}
        assert maxsim[idx[t]] == pytest.approx(min(maxsim.values()), abs=1e-6)


def test_zspaprune_fill_prefers_far_tokens_over_near_duplicates():
    # the question aligns with e0; tokens 0-2 are near e0, token 3 orthogonal, token 4 a near-copy of 0
    feats = torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0.98, 0, 0.1], [0, 0, 1.0], [1.0, 0.01, 0]])
    inp = PruneInputs(features=feats, prompt=torch.tensor([[1.0, 0, 0]]))
    sel = select("zspaprune", inp, 2, core_ratio=0.5)
    assert sel.idx.tolist() == [0, 3]


def test_zspaprune_options_are_checked():
    inp = _zspa_inputs()
    with pytest.raises(UsageError):
        select("zspaprune", inp, 3, core_ratio=1.5)
    with pytest.raises(UsageError):
        select("zspaprune", inp, 3, prompt_scope="everything")
    assert select("zspaprune", inp, 4, prompt_scope="all_text").idx.numel() == 4
