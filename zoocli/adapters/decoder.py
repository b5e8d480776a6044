"""The decoder pieces of a HF VLM that the prune loop drives, read in one place.

``decoder_of(model) -> Decoder`` hands over the language model's public pieces (``layers``,
``norm``, ``rotary_emb``, ``lm_head``, the token embedding), its attention implementation, the
rotary function of its attention module, the EOS ids and a fresh ``transformers.DynamicCache``.
``Decoder.attention_rows`` recomputes one layer's softmax attention for a few query rows from that
layer's own input norm and q/k projections, as eager attention does. Nothing outside ``adapters/``
reads these internals: ``zoocli.prune_loop`` only calls the ``Decoder`` methods.

The language model is ``model.model.language_model`` (LlamaModel for LLaVA / LLaVA-NeXT,
Qwen2_5_VLTextModel for Qwen2.5-VL) or the model itself for a plain causal LM.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zoocli.errors import UsageError


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a VLM or a plain causal LM."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def eos_ids(model: nn.Module, eos_token_id: Any = None) -> frozenset[int]:
    """The EOS ids: ``eos_token_id`` if given (int or list), else the model's generation config."""
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(e) for e in eos_token_id)


# What zoo keeps of a checkpoint's generation config: the token ids (where to stop, what pads).
# Everything else in it (sampling, beams, repetition / length penalties, bad words, n-gram blocks,
# min_new_tokens, forced or suppressed tokens, ...) would change a greedy answer: it is dropped.
GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# transformers' greedy settings, spelled out (in a passed config, a field left None is filled from
# the model's generation config, which ``Adapter`` has already reduced to ``GENERATION_IDS``)
GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, length_penalty=1.0,
              no_repeat_ngram_size=0, min_length=0, temperature=1.0, top_k=50, top_p=1.0,
              num_return_sequences=1, output_scores=False, return_dict_in_generate=False, use_cache=True)


def greedy_config(source: Any = None, max_new_tokens: int | None = None, **ids: Any):
    """A fresh ``GenerationConfig`` for pure greedy decoding: ``GREEDY``, the token ids
    (``GENERATION_IDS``) of ``source`` (a checkpoint's generation config) unless given in ``ids``,
    and ``max_new_tokens``. Nothing else of ``source`` is carried over."""
    from transformers import GenerationConfig

    kw = {k: getattr(source, k, None) for k in GENERATION_IDS} | ids
    if max_new_tokens is not None:
        kw["max_new_tokens"] = max_new_tokens
    return GenerationConfig(**GREEDY, **{k: v for k, v in kw.items() if v is not None})


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


@functools.cache
def cache_keyword(layer_cls: type) -> str:
    """The keyword a decoder layer class takes its KV cache by: ``cache`` in newer transformers
    (where ``past_key_values`` is deprecated and warns), ``past_key_values`` in older ones (5.17).
    Read from the layer's own ``forward`` signature once per class."""
    params = inspect.signature(layer_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def select_pos(cos: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` of a rotary cos / sin table (the sequence dim is -2)."""
    return cos.index_select(-2, rows)


@dataclass
class Decoder:
    """What the prune loop may use of a decoder-only LLM (batch size 1)."""

    model: nn.Module  # the full model (only its pieces below are used)
    lm: nn.Module  # the language model: layers, norm, rotary_emb
    lm_head: nn.Module
    attn_impl: str  # "eager", "sdpa", "flash_attention_2", ...
    full_attention: bool  # False: some layers use sliding windows (refused by the loop)
    mrope: bool  # Qwen2.5-VL's 3-row M-RoPE positions

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.layers

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [1, T] -> input embeddings [1, T, D]."""
        lm = self.lm
        emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else lm.embed_tokens
        return emb(ids)

    def rotary(self, h: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self.lm.rotary_emb(h, pos)

    def logits(self, h_last: Tensor) -> Tensor:
        """Hidden states [1, 1, D] of the last row -> float32 logits [V]."""
        return self.lm_head(self.lm.norm(h_last))[0, -1].float()

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.config)

    def run_layer(self, i: int, h: Tensor, mask, pos: Tensor, cache, pe) -> Tensor:
        layer = self.lm.layers[i]
        out = layer(h, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=pe,
                    **{cache_keyword(type(layer)): cache})
        return out[0] if isinstance(out, tuple) else out

    def eos(self, eos_token_id: Any = None) -> frozenset[int]:
        return eos_ids(self.model, eos_token_id)

    def final_norm(self, h: Tensor) -> Tensor:
        """The LLM's final norm (the one before the LM head) applied to hidden states ``h``."""
        return self.lm.norm(h)

    def keys(self, i: int, hidden: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
        """Post-RoPE keys [S, Hkv * hd] of decoder layer ``i`` (what its KV cache holds) for its
        input ``hidden`` [1, S, D] and (cos, sin) ``pe``; heads concatenated per token, not repeated."""
        layer = self.lm.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)  # [1, S, D]
        hd, s = attn.head_dim, x.shape[1]
        k = attn.k_proj(x).view(1, s, -1, hd)  # [1, S, Hkv, hd]
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        cos, sin = pe
        k, _ = _rope_fn(attn, cos)(k, k, cos, sin)  # [1, Hkv, S, hd]
        return k[0].transpose(0, 1).reshape(s, -1)

    def attention_rows(self, i: int, hidden: Tensor, rows: Tensor, pe: tuple[Tensor, Tensor],
                       valid: Tensor) -> Tensor:
        """Softmax attention weights [H, R, S] (float32) of decoder layer ``i`` for query ``rows``.

        ``hidden`` [1, S, D] is the layer's input, ``pe`` its (cos, sin) for the S rows, ``valid``
        [S] bool the padding mask. Keys are causal in row order (row r sees rows <= r), GQA-aware.
        """
        layer = self.lm.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)  # [1, S, D]
        hd, s = attn.head_dim, x.shape[1]
        q = attn.q_proj(x[:, rows]).view(1, rows.numel(), -1, hd)  # [1, R, H, hd]
        k = attn.k_proj(x).view(1, s, -1, hd)  # [1, S, Hkv, hd]
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = pe
        rope = _rope_fn(attn, cos)
        q, _ = rope(q, q, select_pos(cos, rows), select_pos(sin, rows))
        k, _ = rope(k, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [1, H, S, hd] (= repeat_kv)
        w = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # [1, H, R, S]
        allowed = (torch.arange(s, device=rows.device)[None, :] <= rows[:, None]) & valid[None, :]  # [R, S]
        w = w + torch.where(allowed, 0.0, torch.finfo(w.dtype).min).to(w.dtype)
        return torch.softmax(w, dim=-1, dtype=torch.float32)[0]


def decoder_of(model: nn.Module) -> Decoder:
    """The ``Decoder`` of a HF VLM (or plain causal LM)."""
    lm = language_model(model)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    cfg = lm.config
    layer_types = getattr(cfg, "layer_types", None)
    return Decoder(
        model=model, lm=lm, lm_head=lm_head,
        attn_impl=getattr(cfg, "_attn_implementation", None) or "eager",
        full_attention=not (layer_types and any(t != "full_attention" for t in layer_types)),
        mrope=getattr(lm.rotary_emb, "mrope_section", None) is not None,
    )
