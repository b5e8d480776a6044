"""The prune loop: a manual prefill + greedy decode over a decoder-only LLM, with in-LLM prune stages.

FastV and SparseVLM drop visual tokens INSIDE the LLM: at layer l they rank the visual tokens by the
attention some query rows give them at layer l-1, and layers >= l run on the shortened sequence. This
module does that without patching library classes, on the ``zoocli.adapters.decoder.Decoder`` an
adapter hands over (layers, norm, rotary, lm head, embeddings, a fresh KV cache, its attention
implementation and a recomputation of one layer's attention rows): no transformers import here.

Semantics:
- A ``PruneStage(layer=l, n_keep, scorer)`` prunes BEFORE decoder layer ``l`` (FastV's K). The
  scorer sees the attention of layer ``l - 1``, recomputed for the query rows it asks for only
  (``Decoder.attention_rows``). The model keeps its own attention implementation (SDPA/flash) for
  the actual forward. ``own_layer=True`` (PyramidDrop) scores on layer ``l``'s own attention over its
  input instead. The scorer may also read the stage layer's input states, the post-RoPE keys of the
  scored layer and the LLM's final norm (DART).
- Kept tokens keep their ORIGINAL position ids (FastV's inplace mode); for Qwen2.5-VL the three
  M-RoPE rows are sliced the same way.
- The cache of layers < l holds the full sequence, layers >= l the pruned one. Masks are built here
  per layer group (None where the attention implementation's own causal handling is exact, an
  explicit additive [1, 1, q, kv] mask otherwise), so no cache-length bookkeeping of transformers is
  relied on.
- Greedy decode: every new token gets position = last original position + 1 (+ step) in every
  layer group, as ``generate`` extends explicit position ids; the pruned set is fixed at prefill.

``generate_in_llm(adapter, inputs, visual, make_stages, max_new_tokens)`` runs the loop for the
pipeline: the stages come from the method's ``plan`` (built inside the timed prefill), the answer is
cut at EOS and decoded by the adapter, the first / last token times come from ``TokenClock``.

- Qwen3-VL's DeepStack (``deepstack``: one [N, D] tensor per injection layer, aligned with ``visual``):
  after decoder layer j, ``deepstack[j]`` is added at the visual tokens still present, each token its own
  row (``deepstack[j][present]``), as ``Qwen3VLTextModel`` adds it at its visual-position mask. A stage
  at layer l drops tokens before layer l: injections after layers < l went into the full sequence (a
  dropped token leaves with its injected row), injections after layers >= l reach the survivors only.
  Decoded tokens are text: no injection.

Batch size 1 only (as the official FastV / SparseVLM code). Sliding-window layers are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from zoocli.adapters.decoder import Decoder, decoder_of, select_pos
from zoocli.errors import UsageError
from zoocli.ops import stable_topk
from zoocli.timing import TokenClock, device_sync


@dataclass(frozen=True)
class StageContext:
    """What a scorer sees at a stage. Row indices are into the CURRENT (possibly already pruned) sequence."""

    layer: int  # the layer ``attention`` recomputes: stage layer - 1 (own_layer: the stage layer)
    visual: Tensor  # [n] current row indices of the visual tokens still present
    orig: Tensor  # [S] original sequence index of every current row
    hidden: Tensor  # [S, D] input hidden states of ``layer`` (before its input norm)
    attention: Callable[[Tensor], Tensor]  # rows [R] -> softmax weights [H, R, S], float32
    state: Tensor | None = None  # [S, D] input hidden states of the stage layer (= output of layer - 1)
    keys: Callable[[], Tensor] | None = None  # () -> [S, Hkv * hd] post-RoPE keys of ``layer`` on ``hidden``
    final_norm: Callable[[Tensor], Tensor] | None = None  # the LLM's final norm (before the LM head)

    def rows_of(self, orig_rows: Tensor) -> Tensor:
        """Current row indices of the given ORIGINAL sequence indices that are still present."""
        orig_rows = orig_rows.to(self.orig.device)
        return torch.isin(self.orig, orig_rows).nonzero().squeeze(1)


Scorer = Callable[[StageContext], Tensor]  # -> [n] one score per present visual token


def last_token_scorer(ctx: StageContext) -> Tensor:
    """FastV: the attention the last token gives each visual token, mean over heads."""
    last = torch.tensor([ctx.orig.numel() - 1], device=ctx.visual.device)
    return ctx.attention(last)[:, 0, ctx.visual].mean(dim=0)


def rows_scorer(orig_rows: Tensor) -> Scorer:
    """SparseVLM: attention from the given query rows (ORIGINAL sequence indices, e.g. the text
    raters) to each visual token, mean over heads and rows."""

    def score(ctx: StageContext) -> Tensor:
        rows = ctx.rows_of(orig_rows)
        if rows.numel() == 0:
            raise UsageError("no scoring rows left in the sequence")
        return ctx.attention(rows)[:, :, ctx.visual].mean(dim=(0, 1))

    return score


@dataclass(frozen=True)
class PruneStage:
    layer: int  # first decoder layer that runs on the pruned sequence; layer-1's attention is scored
    n_keep: int  # visual tokens kept (of those still present); >= present is a no-op
    scorer: Scorer = last_token_scorer
    # True: the scorer sees the stage layer's OWN attention on its input (PyramidDrop ranks with the
    # q/k of the first layer that runs on the pruned sequence), not layer - 1's
    own_layer: bool = False


@dataclass
class StageRecord:
    layer: int
    present: Tensor  # [n] visual-span indices (0..N-1) present before the stage
    scores: Tensor  # [n] the scorer's output, aligned with ``present``
    kept: Tensor  # [k] visual-span indices kept, ascending
    scored_layer: int | None = None  # the layer whose attention / keys the scorer saw


@dataclass
class LoopResult:
    tokens: Tensor  # [n_new] generated token ids (eos included if hit)
    stages: list[StageRecord]
    prefill_logits: Tensor  # [V] float32 logits of the last prompt position
    step_logits: list[Tensor] = field(default_factory=list)  # [V] per generated token, if asked

    @property
    def kept(self) -> list[Tensor]:
        return [s.kept for s in self.stages]


def _mask(impl: str, valid: Tensor, q_len: int, dtype: torch.dtype) -> Tensor | None:
    """Mask for ``q_len`` new rows attending to ``valid.numel()`` keys (cached + new), causal."""
    kv = valid.numel()
    if bool(valid.all()) and impl != "eager" and (q_len == 1 or q_len == kv):
        return None  # SDPA / flash: is_causal (prefill) or no mask (one query) is exact
    if impl not in ("eager", "sdpa"):
        raise UsageError(f"padding masks are supported with eager/sdpa attention only, not {impl}")
    if impl == "eager" and bool(valid.all()) and q_len == 1:
        return None
    q_idx = torch.arange(kv - q_len, kv, device=valid.device)
    allowed = (torch.arange(kv, device=valid.device)[None, :] <= q_idx[:, None]) & valid[None, :]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


# ---------------------------------------------------------------- the loop, step by step


@dataclass
class _Seq:
    """The current (possibly pruned) prefill sequence and its per-row bookkeeping."""

    h: Tensor  # [1, S, D] hidden states
    orig: Tensor  # [S] original index of each current row
    valid: Tensor  # [S] key validity (padding mask)
    vis: Tensor  # [n] current rows of the visual tokens still present
    text_pos: Tensor  # [1, S] position ids the layers take
    rope_pos: Tensor  # [1, S] or [3, 1, S] positions the rotary embedding takes
    pe: tuple[Tensor, Tensor]  # (cos, sin) of the current rows


def _check(dec: Decoder, inputs_embeds: Tensor, visual: Tensor, stages: Sequence[PruneStage]) -> list[PruneStage]:
    if not dec.full_attention:
        raise UsageError("sliding-window / non-full attention layers are not supported by the pruning loop")
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
        raise UsageError(f"batch size 1 only, got inputs_embeds of shape {tuple(inputs_embeds.shape)}")
    n_layers = len(dec.layers)
    stages = sorted(stages, key=lambda s: s.layer)
    seen = [s.layer for s in stages]
    if len(set(seen)) != len(seen) or any(not 1 <= l < n_layers for l in seen):
        raise UsageError(f"stage layers must be distinct and in [1, {n_layers - 1}], got {seen}")
    if visual.numel() and int(visual.max()) >= inputs_embeds.shape[1] - 1:
        raise UsageError("the visual span must end before the last prompt token")
    return stages


def _positions(dec: Decoder, position_ids: Tensor | None, length: int, dev) -> tuple[Tensor, Tensor]:
    """(text_pos [1, L] for the layers, rope_pos [1, L] / [3, 1, L] for the rotary embedding)."""
    if position_ids is None:
        position_ids = torch.arange(length, device=dev)[None]
    position_ids = position_ids.to(dev)
    if dec.mrope:
        if position_ids.ndim == 2:
            return position_ids, position_ids[None].expand(3, 1, -1)
        if position_ids.shape[0] == 4:
            return position_ids[0], position_ids[1:]
        return position_ids[0], position_ids
    if position_ids.ndim != 2:
        raise UsageError(f"position_ids must be [1, L] for this model, got {tuple(position_ids.shape)}")
    return position_ids, position_ids


def _apply_stage(dec: Decoder, i: int, stage: PruneStage, seq: _Seq, saved: Tensor, visual: Tensor,
                 saved_valid: Tensor, saved_pe) -> tuple[StageRecord, Tensor | None]:
    """Score the present visual tokens on layer ``i - 1``'s attention and keep the top ``n_keep``;
    prunes ``seq`` in place. Returns the stage record and the kept rows (None if nothing was dropped)."""
    dev = seq.h.device
    j, h, pe, valid = (i, seq.h, seq.pe, seq.valid) if stage.own_layer else (i - 1, saved, saved_pe, saved_valid)
    ctx = StageContext(
        layer=j, visual=seq.vis, orig=seq.orig, hidden=h[0],
        attention=lambda rows: dec.attention_rows(j, h, rows.to(dev), pe, valid),
        state=seq.h[0], keys=lambda: dec.keys(j, h, pe), final_norm=dec.final_norm,
    )
    scores = stage.scorer(ctx).float()
    present = torch.searchsorted(visual, seq.orig[seq.vis])
    keep_local = torch.sort(stable_topk(scores, min(stage.n_keep, seq.vis.numel()))).values
    kept_rows = seq.vis[keep_local]
    record = StageRecord(layer=i, present=present, scores=scores, kept=present[keep_local], scored_layer=j)
    if kept_rows.numel() == seq.vis.numel():
        return record, None
    drop = torch.ones(seq.orig.numel(), dtype=torch.bool, device=dev)
    drop[seq.vis] = False
    keep = torch.sort(torch.cat([drop.nonzero().squeeze(1), kept_rows])).values
    seq.h, seq.orig, seq.valid = seq.h[:, keep], seq.orig[keep], seq.valid[keep]
    seq.text_pos, seq.rope_pos = seq.text_pos[..., keep], seq.rope_pos[..., keep]
    seq.pe = tuple(select_pos(t, keep) for t in seq.pe)
    seq.vis = torch.searchsorted(keep, kept_rows)
    return record, kept_rows


def _inject(h: Tensor, seq: _Seq, visual: Tensor, rows: Tensor) -> Tensor:
    """DeepStack: ``h`` [1, S, D] + ``rows`` [N, D] (candidate order) at the visual tokens still present."""
    present = torch.searchsorted(visual, seq.orig[seq.vis])  # candidate index of each present visual row
    h = h.clone()
    h[0, seq.vis] = h[0, seq.vis] + rows[present].to(h.device, h.dtype)
    return h


def _prefill(dec: Decoder, seq: _Seq, visual: Tensor, stages: list[PruneStage], cache,
             deepstack: Sequence[Tensor] = ()):
    """Run every layer on the prefill, pruning before the stage layers (and adding ``deepstack[i]``
    after layer i). Returns (logits [V], records, group_of_layer: layer -> mask group, group_valid:
    key validity per group)."""
    by_layer = {s.layer: s for s in stages}
    mask = _mask(dec.attn_impl, seq.valid, seq.orig.numel(), seq.h.dtype)
    group_of_layer: list[int] = []
    group_valid: list[Tensor] = [seq.valid]
    records: list[StageRecord] = []
    saved = saved_valid = saved_pe = None
    for i in range(len(dec.layers)):
        if i in by_layer:
            record, kept = _apply_stage(dec, i, by_layer[i], seq, saved, visual, saved_valid, saved_pe)
            records.append(record)
            if kept is not None:
                mask = _mask(dec.attn_impl, seq.valid, seq.orig.numel(), seq.h.dtype)
                group_valid.append(seq.valid)
        group_of_layer.append(len(group_valid) - 1)
        if i + 1 in by_layer:
            saved, saved_valid, saved_pe = seq.h, seq.valid, seq.pe
        seq.h = dec.run_layer(i, seq.h, mask, seq.text_pos, cache, seq.pe)
        if i < len(deepstack):
            seq.h = _inject(seq.h, seq, visual, deepstack[i])
    return dec.logits(seq.h[:, -1:]), records, group_of_layer, group_valid


def _decode_step(dec: Decoder, tok: int, step: int, seq: _Seq, cache, group_of_layer, group_valid) -> Tensor:
    """One greedy step: embed ``tok`` at position last + 1 + step in every group -> logits [V]."""
    dev = seq.h.device
    h = dec.embed(torch.tensor([[tok]], device=dev))  # [1, 1, D]
    tp, rp = seq.text_pos[..., -1:] + 1 + step, seq.rope_pos[..., -1:] + 1 + step
    pe = dec.rotary(h, rp)
    group_valid[:] = [torch.cat([v, v.new_ones(1)]) for v in group_valid]
    masks = [_mask(dec.attn_impl, v, 1, h.dtype) for v in group_valid]
    for i in range(len(dec.layers)):
        h = dec.run_layer(i, h, masks[group_of_layer[i]], tp, cache, pe)
    return dec.logits(h)


@torch.no_grad()
def generate_pruned(
    model: nn.Module | Decoder,
    inputs_embeds: Tensor,
    visual: Tensor,
    stages: Sequence[PruneStage] = (),
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    on_prefill_end: Callable[[], None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    return_step_logits: bool = False,
    deepstack: Sequence[Tensor] | None = None,
) -> LoopResult:
    """Prefill ``inputs_embeds`` [1, L, D] with in-LLM pruning ``stages``, then greedy-decode.

    ``model``: an adapter's ``Decoder`` (or a HF model, read through ``decoder_of``). ``visual``
    [N]: the sequence indices of the visual tokens (ascending). ``position_ids``: None (0..L-1),
    [1, L], or for M-RoPE models [3, 1, L] / [4, 1, L] (row 0 = text positions, rows 1-3 M-RoPE).
    ``eos_token_id`` defaults to the model's generation config. ``on_prefill_end()`` runs once the
    prefill logits exist; ``on_token(step, id)`` after each generated token (step 0 = first token).
    The caller synchronises the device in its callbacks. ``deepstack`` (Qwen3-VL): one [N, D] tensor
    per injection layer, rows aligned with ``visual``, added after decoder layers 0, 1, ...
    """
    dec = model if isinstance(model, Decoder) else decoder_of(model)
    dev = inputs_embeds.device
    visual = visual.to(dev).long()
    stages = _check(dec, inputs_embeds, visual, stages)
    length = inputs_embeds.shape[1]
    text_pos, rope_pos = _positions(dec, position_ids, length, dev)
    valid = (attention_mask[0].bool() if attention_mask is not None else torch.ones(length, dtype=torch.bool)).to(dev)
    seq = _Seq(h=inputs_embeds, orig=torch.arange(length, device=dev), valid=valid, vis=visual.clone(),
               text_pos=text_pos, rope_pos=rope_pos, pe=dec.rotary(inputs_embeds, rope_pos))
    deepstack = list(deepstack or ())
    if any(d.shape[0] != visual.numel() for d in deepstack) or len(deepstack) > len(dec.layers):
        raise UsageError(f"deepstack needs at most {len(dec.layers)} tensors of {visual.numel()} rows (one per "
                         f"visual token), got {[tuple(d.shape) for d in deepstack]}")
    cache = dec.new_cache()
    logits, records, group_of_layer, group_valid = _prefill(dec, seq, visual, stages, cache, deepstack)
    result = LoopResult(tokens=torch.empty(0, dtype=torch.long, device=dev), stages=records,
                        prefill_logits=logits)
    if on_prefill_end is not None:
        on_prefill_end()
    eos = dec.eos(eos_token_id)
    new: list[int] = []
    for step in range(max_new_tokens):
        if return_step_logits:
            result.step_logits.append(logits)
        tok = int(torch.argmax(logits))
        new.append(tok)
        if on_token is not None:
            on_token(step, tok)
        if tok in eos or step == max_new_tokens - 1:
            break
        logits = _decode_step(dec, tok, step, seq, cache, group_of_layer, group_valid)
    result.tokens = torch.tensor(new, dtype=torch.long, device=dev)
    return result


# ---------------------------------------------------------------- the pipeline's entry point


@dataclass
class InLLMResult:
    ids: list[int]  # new token ids, EOS excluded
    text: str
    prefill_ms: float  # call -> first-token logits, method work included
    decode_ms: float  # first token -> last token
    selection_ms: float  # plan + stage scorers (already inside prefill_ms)
    kept: Tensor  # [k] candidate indices kept after the last stage, ascending
    scores: Tensor | None  # [N] the last stage's scores per candidate (NaN where already pruned)
    stages: list[dict[str, int]] = field(default_factory=list)  # per stage: layer, scored_layer, before, kept


def _timed(scorer: Scorer, dev, spent: list[float]) -> Scorer:
    def run(ctx: StageContext) -> Tensor:
        device_sync(dev)
        t = TokenClock.now()
        out = scorer(ctx)
        device_sync(dev)
        spent[0] += (TokenClock.now() - t) * 1e3
        return out

    return run


def _last_stage(res: LoopResult, n: int) -> tuple[Tensor, Tensor | None, list[dict[str, int]]]:
    """(kept candidates, last-stage scores per candidate, per-stage summary) of a loop result."""
    info = [{"layer": r.layer, "scored_layer": r.scored_layer, "before": int(r.present.numel()),
             "kept": int(r.kept.numel())} for r in res.stages]
    if not res.stages:
        return torch.arange(n), None, info
    last = res.stages[-1]
    scores = torch.full((n,), float("nan"))
    scores[last.present.cpu()] = last.scores.float().cpu()
    return last.kept.cpu(), scores, info


@torch.no_grad()
def generate_in_llm(adapter, inputs, visual: Tensor, make_stages: Callable[[], list[PruneStage]],
                    max_new_tokens: int) -> InLLMResult:
    """Prefill the unpruned ``inputs`` with the stages ``make_stages()`` returns (called inside the
    timed prefill), then greedy-decode on ``adapter.decoder()`` (batch size 1).

    ``prefill_ms`` runs from the call to the first token's logits and INCLUDES everything the method
    does inside the LLM; ``selection_ms`` is that method-only part (plan + scorers), reported
    separately but already inside ``prefill_ms``. Every clock read is device-synchronised."""
    dev = adapter.device
    clock = TokenClock(dev)
    clock.start()
    spent = [0.0]
    stages = make_stages()
    device_sync(dev)
    spent[0] += (TokenClock.now() - clock.t0) * 1e3
    stages = [replace(s, scorer=_timed(s.scorer, dev, spent)) for s in stages]
    dec = adapter.decoder()
    res = generate_pruned(dec, inputs.inputs_embeds, visual, stages,
                          attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                          max_new_tokens=max_new_tokens, on_prefill_end=clock.tick,
                          on_token=lambda step, tok: clock.tick(), deepstack=inputs.deepstack)
    ids = adapter.answer_ids(res.tokens.tolist())
    kept, scores, info = _last_stage(res, int(visual.numel()))
    return InLLMResult(ids=ids, text=adapter.decode(ids).strip(), prefill_ms=clock.prefill_ms,
                       decode_ms=clock.decode_ms, selection_ms=spent[0], kept=kept, scores=scores,
                       stages=info)
