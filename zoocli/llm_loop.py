"""A manual prefill + greedy decode over a HF decoder-only language model, with in-LLM pruning stages.

FastV and SparseVLM drop visual tokens INSIDE the LLM: at layer l they rank the visual tokens by the
attention some query rows give them at layer l-1, and layers >= l run on the shortened sequence. This
module does that without patching library classes, from the model's public pieces:
``lm = model.model.language_model`` (LlamaModel for LLaVA / LLaVA-NeXT, Qwen2_5_VLTextModel for
Qwen2.5-VL), ``lm.layers``, ``lm.norm``, ``lm.rotary_emb``, ``model.lm_head`` and a
``transformers.DynamicCache``.

Semantics:
- A ``PruneStage(layer=l, n_keep, scorer)`` prunes BEFORE decoder layer ``l`` (FastV's K). The
  scorer sees the attention of layer ``l - 1``, recomputed for the query rows it asks for only: q for
  those rows and k for all rows from that layer's input hidden states (its input norm, q/k
  projections, optional q/k norms, rotary embedding, GQA repeat, causal + padding mask, fp32
  softmax, as eager attention does). The model keeps its own attention implementation (SDPA/flash)
  for the actual forward.
- Kept tokens keep their ORIGINAL position ids (FastV's inplace mode); for Qwen2.5-VL the three
  M-RoPE rows are sliced the same way.
- The cache of layers < l holds the full sequence, layers >= l the pruned one. Masks are built here
  per layer group (None where the attention implementation's own causal handling is exact, an
  explicit additive [1, 1, q, kv] mask otherwise), so no cache-length bookkeeping of transformers is
  relied on.
- Greedy decode: every new token gets position = last original position + 1 (+ step) in every
  layer group, as ``generate`` extends explicit position ids; the pruned set is fixed at prefill.

Batch size 1 only (as the official FastV / SparseVLM code). Sliding-window layers are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from zoocli.errors import UsageError


@dataclass(frozen=True)
class StageContext:
    """What a scorer sees at a stage. Row indices are into the CURRENT (possibly already pruned) sequence."""

    layer: int  # the layer whose attention ``attention`` recomputes (= stage layer - 1)
    visual: Tensor  # [n] current row indices of the visual tokens still present
    orig: Tensor  # [S] original sequence index of every current row
    hidden: Tensor  # [S, D] input hidden states of ``layer`` (before its input norm)
    attention: Callable[[Tensor], Tensor]  # rows [R] -> softmax weights [H, R, S], float32

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


@dataclass
class StageRecord:
    layer: int
    present: Tensor  # [n] visual-span indices (0..N-1) present before the stage
    scores: Tensor  # [n] the scorer's output, aligned with ``present``
    kept: Tensor  # [k] visual-span indices kept, ascending


@dataclass
class LoopResult:
    tokens: Tensor  # [n_new] generated token ids (eos included if hit)
    stages: list[StageRecord]
    prefill_logits: Tensor  # [V] float32 logits of the last prompt position
    step_logits: list[Tensor] = field(default_factory=list)  # [V] per generated token, if asked

    @property
    def kept(self) -> list[Tensor]:
        return [s.kept for s in self.stages]


# ---------------------------------------------------------------- helpers


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a VLM or a plain causal LM."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def _is_mrope(lm: nn.Module) -> bool:
    return getattr(lm.rotary_emb, "mrope_section", None) is not None


def _rope_fn(attn: nn.Module, cos: Tensor):
    mod = sys.modules[type(attn).__module__]
    if cos.ndim == 4 and hasattr(mod, "apply_multimodal_rotary_pos_emb"):
        # older transformers: M-RoPE cos/sin come as [3, B, S, hd] and are recomposed in the attention
        rp = getattr(attn, "rope_parameters", None) or getattr(attn, "rope_scaling", None) or {}
        section = rp["mrope_section"]
        return lambda q, k, c, s: mod.apply_multimodal_rotary_pos_emb(q, k, c, s, section)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        raise UsageError(f"{type(attn).__name__}: no apply_rotary_pos_emb in {mod.__name__}")
    return fn


def _select_pos(cos: Tensor, rows: Tensor) -> Tensor:
    return cos.index_select(-2, rows)


def attention_rows(layer: nn.Module, hidden: Tensor, rows: Tensor, pe: tuple[Tensor, Tensor], valid: Tensor) -> Tensor:
    """Softmax attention weights [H, R, S] (float32) of decoder ``layer`` for query ``rows``.

    ``hidden`` [1, S, D] is the layer's input, ``pe`` its (cos, sin) for the S rows, ``valid`` [S]
    bool the padding mask. Keys are causal in row order (row r sees rows <= r), GQA-aware.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)  # [1, S, D]
    hd = attn.head_dim
    s = x.shape[1]
    q = attn.q_proj(x[:, rows]).view(1, rows.numel(), -1, hd)  # [1, R, H, hd]
    k = attn.k_proj(x).view(1, s, -1, hd)  # [1, S, Hkv, hd]
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = pe
    rope = _rope_fn(attn, cos)
    q, _ = rope(q, q, _select_pos(cos, rows), _select_pos(sin, rows))
    k, _ = rope(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [1, H, S, hd] (= repeat_kv)
    w = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # [1, H, R, S]
    allowed = (torch.arange(s, device=rows.device)[None, :] <= rows[:, None]) & valid[None, :]  # [R, S]
    w = w + torch.where(allowed, 0.0, torch.finfo(w.dtype).min).to(w.dtype)
    return torch.softmax(w, dim=-1, dtype=torch.float32)[0]


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


def _topk_sorted(scores: Tensor, k: int) -> Tensor:
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _eos_set(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


# ---------------------------------------------------------------- the loop


@torch.no_grad()
def generate_pruned(
    model: nn.Module,
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
) -> LoopResult:
    """Prefill ``inputs_embeds`` [1, L, D] with in-LLM pruning ``stages``, then greedy-decode.

    ``visual`` [N]: the sequence indices of the visual tokens (ascending). ``position_ids``: None
    (0..L-1), [1, L], or for M-RoPE models [3, 1, L] / [4, 1, L] (row 0 = text positions, rows 1-3
    M-RoPE, the layout Qwen2_5_VLTextModel takes). ``eos_token_id`` defaults to the model's generation
    config. ``on_prefill_end()`` runs once the prefill logits exist; ``on_token(step, id)`` after each
    generated token (step 0 = first token). The caller synchronises the device in its callbacks.
    """
    lm = language_model(model)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    cfg = lm.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UsageError("sliding-window / non-full attention layers are not supported by the pruning loop")
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
        raise UsageError(f"batch size 1 only, got inputs_embeds of shape {tuple(inputs_embeds.shape)}")
    n_layers = len(lm.layers)
    stages = sorted(stages, key=lambda s: s.layer)
    layers_seen = [s.layer for s in stages]
    if len(set(layers_seen)) != len(layers_seen) or any(not 1 <= l < n_layers for l in layers_seen):
        raise UsageError(f"stage layers must be distinct and in [1, {n_layers - 1}], got {layers_seen}")
    dev = inputs_embeds.device
    length = inputs_embeds.shape[1]
    visual = visual.to(dev).long()
    if visual.numel() and int(visual.max()) >= length - 1:
        raise UsageError("the visual span must end before the last prompt token")

    # positions: rope_pos feeds rotary_emb ([1, L] or [3, 1, L]); text_pos [1, L] goes to the layers
    mrope = _is_mrope(lm)
    if position_ids is None:
        position_ids = torch.arange(length, device=dev)[None]
    position_ids = position_ids.to(dev)
    if mrope:
        if position_ids.ndim == 2:
            text_pos, rope_pos = position_ids, position_ids[None].expand(3, 1, -1)
        elif position_ids.shape[0] == 4:
            text_pos, rope_pos = position_ids[0], position_ids[1:]
        else:
            text_pos, rope_pos = position_ids[0], position_ids
    else:
        if position_ids.ndim != 2:
            raise UsageError(f"position_ids must be [1, L] for this model, got {tuple(position_ids.shape)}")
        text_pos, rope_pos = position_ids, position_ids
    valid = (attention_mask[0].bool() if attention_mask is not None else torch.ones(length, dtype=torch.bool)).to(dev)

    cache = DynamicCache(config=cfg)
    h = inputs_embeds
    orig = torch.arange(length, device=dev)  # original index of each current row
    vis_cur = visual.clone()  # current rows of the visual tokens still present
    pe = lm.rotary_emb(h, rope_pos)
    mask = _mask(impl, valid, length, h.dtype)
    by_layer = {s.layer: s for s in stages}
    group_of_layer: list[int] = []  # layer -> group index
    group_valid: list[Tensor] = [valid]  # per group: key validity of its cached rows
    records: list[StageRecord] = []
    saved_input: Tensor | None = None

    for i, layer in enumerate(lm.layers):
        if i in by_layer:
            stage = by_layer[i]
            ctx = StageContext(
                layer=i - 1, visual=vis_cur, orig=orig, hidden=saved_input[0],
                attention=lambda rows, _h=saved_input, _pe=pe, _v=valid, _lay=lm.layers[i - 1]: (
                    attention_rows(_lay, _h, rows.to(dev), _pe, _v)),
            )
            scores = stage.scorer(ctx).float()
            present = torch.searchsorted(visual, orig[vis_cur])
            keep_local = _topk_sorted(scores, min(stage.n_keep, vis_cur.numel()))
            kept_rows = vis_cur[keep_local]
            records.append(StageRecord(layer=i, present=present, scores=scores, kept=present[keep_local]))
            if kept_rows.numel() < vis_cur.numel():
                drop = torch.ones(orig.numel(), dtype=torch.bool, device=dev)
                drop[vis_cur] = False
                keep = torch.sort(torch.cat([drop.nonzero().squeeze(1), kept_rows])).values
                h, orig, valid = h[:, keep], orig[keep], valid[keep]
                text_pos, rope_pos = text_pos[..., keep], rope_pos[..., keep]
                pe = tuple(_select_pos(t, keep) for t in pe)
                vis_cur = torch.searchsorted(keep, kept_rows)
                mask = _mask(impl, valid, orig.numel(), h.dtype)
                group_valid.append(valid)
        group_of_layer.append(len(group_valid) - 1)
        if i + 1 in by_layer:
            saved_input = h
        out = layer(h, attention_mask=mask, position_ids=text_pos, past_key_values=cache,
                    use_cache=True, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out

    logits = lm_head(lm.norm(h[:, -1:]))[0, -1].float()  # [V]
    result = LoopResult(tokens=torch.empty(0, dtype=torch.long, device=dev), stages=records,
                        prefill_logits=logits)
    if on_prefill_end is not None:
        on_prefill_end()

    eos = _eos_set(model, eos_token_id)
    embed = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else lm.embed_tokens
    last_text = text_pos[..., -1:]  # [1, 1]
    last_rope = rope_pos[..., -1:]
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
        h = embed(torch.tensor([[tok]], device=dev))  # [1, 1, D]
        tp, rp = last_text + 1 + step, last_rope + 1 + step
        pe = lm.rotary_emb(h, rp)
        group_valid = [torch.cat([v, v.new_ones(1)]) for v in group_valid]
        masks = [_mask(impl, v, 1, h.dtype) for v in group_valid]
        for i, layer in enumerate(lm.layers):
            out = layer(h, attention_mask=masks[group_of_layer[i]], position_ids=tp, past_key_values=cache,
                        use_cache=True, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        logits = lm_head(lm.norm(h))[0, -1].float()
    result.tokens = torch.tensor(new, dtype=torch.long, device=dev)
    return result
