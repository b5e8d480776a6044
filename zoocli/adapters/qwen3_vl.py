"""Qwen3-VL adapter: ViT -> 2x2 PatchMerger (the projector M) -> Qwen3 LLM with interleaved M-RoPE and DeepStack.

Qwen3-VL (Qwen team, "Qwen3-VL Technical Report", arXiv:2511.21631; transformers'
``Qwen3VLForConditionalGeneration``). Differences from Qwen2.5-VL that matter here:

- **No window attention** in the ViT: the patch rows come out of the tower in the processor's order, where
  every 4 consecutive rows are one 2x2 block, so X (``Encoded.vision``) is simply the merger input regrouped
  as one ``4*d_v`` row per merged token, already in raster order (no window index to undo).
- **The merger** (``Qwen3VLVisionPatchMerger``, ``use_postshuffle_norm=False``): LayerNorm over each
  patch's ``d_v`` (with mean subtraction and bias, unlike Qwen2.5-VL's RMSNorm), then ``.view(-1, 4*d_v)``,
  ``linear_fc1`` (4d_v -> 4d_v), GELU, ``linear_fc2`` (4d_v -> D). ``MergerProjector`` wraps it row-wise.
- **DeepStack**: ``len(deepstack_visual_indexes)`` more mergers (``deepstack_merger_list``, LayerNorm over
  the whole ``4*d_v`` block: "postshuffle") read the hidden states after ViT blocks
  ``deepstack_visual_indexes`` (8, 16, 24 in the 8B config) and give one [N, D] tensor each. The language
  model adds tensor j to the hidden states at the visual positions right after decoder layer j
  (``Qwen3VLTextModel._deepstack_process``, layers 0, 1, 2). ``encode`` captures the three tensors with
  forward hooks on the mergers (every v5 version returns them differently; the hooks see the same values).

Pruning before the LLM (``build_inputs``): the kept set indexes the main features, every deepstack tensor
(``LLMInputs.deepstack[j] = deepstack_j[kept]``) and the visual-position mask (``LLMInputs.visual_mask``,
the kept placeholder slots of the pruned sequence), in the same ascending order, so the deepstack row that
reaches a slot is the one of the token in that slot. Positions are the *original* M-RoPE ones, as for
Qwen2.5-VL (``position_ids`` [4, B, L]: a sequential text row, then the kept columns of ``get_rope_index``
on the unpruned ids), so kept tokens keep their (t, h, w).

Generation: ``Qwen3VLModel.forward`` builds the deepstack arguments only from the pixel values or from
``mm_encoder_outputs`` (5.18+), neither of which can carry a pruned set on 5.17, so the adapter runs the
language model itself with the arguments the stock forward passes it (``inputs_embeds``,
``attention_mask``, ``position_ids``, the cache, ``visual_pos_masks``, ``deepstack_visual_embeds``) and
``lm_head``, greedy, one token per step with the positions extended by +1 (what ``generate`` does with
explicit position ids); deepstack is only given to the prefill, as in the stock model (decoded tokens are
text). Keep-all gives the stock ``generate`` tokens (tests/test_adapter_qwen3_vl.py).

In-LLM pruning (FastV, SparseVLM; ``zoocli.prune_loop``): the loop drives the decoder layers itself and
injects ``deepstack[j]`` after layer j at the visual tokens still present. A stage at layer ``l`` drops
tokens before layer ``l`` runs: injections at layers < ``l`` went into the full sequence (a dropped
token's row, with its injection, leaves the sequence with it); injections at layers >= ``l`` are indexed
by the surviving visual tokens (``deepstack[j][present]``), so each kept token gets its own row and no
dropped token's row is added anywhere. With FastV's default K=2 on Qwen3-VL the stage falls between the
injections after layers 1 and 2.

The processor is built without torchvision (``Qwen3VLProcessor`` declares a video processor that needs
it), like Qwen2.5-VL's: AutoTokenizer + the PIL ``Qwen2VLImageProcessorPil`` (patch 16, merge 2) + a
subclass without the video processor.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ZooError
from ..timing import TokenClock, device_sync
from .base import Encoded, Generation, LLMInputs, Prepared, Scope
from .decoder import cache_keyword
from .qwen2_5_vl import (
    QWEN_SPECIAL_TOKENS,
    Qwen25VLAdapter,
    MergerProjector as Qwen25MergerProjector,
    chat_template_from_dir,
    rope_index,
    set_token_ids,
    offline_tokenizer,
    write_video_processor_config,
    special_ids,
)

# The Qwen3-VL Instruct chat template for image + text turns (no default system turn, unlike Qwen2.5-VL).
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of Qwen/Qwen3-VL-8B-Instruct: patch 16, merge 2, mean/std 0.5,
# 65,536 .. 16,777,216 pixels (64 .. 16,384 merged tokens)
REAL_IMAGE_PROCESSOR = dict(
    min_pixels=65536,
    max_pixels=16777216,
    patch_size=16,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)
# Tiny model: a 4x6 merged-token grid for a 3:2 image (8x12 patches of 16 px = 128x192 px)
TINY_IMAGE_PROCESSOR = dict(REAL_IMAGE_PROCESSOR, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 24)


@functools.cache
def processor_class() -> type:
    """``Qwen3VLProcessorNoVideo``, defined on first use."""
    from transformers import Qwen3VLProcessor

    class Qwen3VLProcessorNoVideo(Qwen3VLProcessor):
        """``Qwen3VLProcessor`` without the video processor (which needs torchvision); images only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
            )

    return Qwen3VLProcessorNoVideo


def make_processor(tokenizer, image_processor, chat_template: str | None = None):
    template = chat_template or getattr(tokenizer, "chat_template", None) or QWEN3_CHAT_TEMPLATE
    return processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def load_processor(path: str | Path):
    """The processor of a saved Qwen3-VL dir without AutoProcessor (which needs torchvision here)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return make_processor(tokenizer, image_processor, chat_template_from_dir(path))


def offline_processor(image_processor_kwargs: dict | None = None):
    from transformers import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(**(image_processor_kwargs or REAL_IMAGE_PROCESSOR))
    return make_processor(offline_tokenizer(), ip, QWEN3_CHAT_TEMPLATE)


class MergerProjector(Qwen25MergerProjector):
    """Qwen3-VL's main PatchMerger as a row-wise projector: [..., 4*d_v] -> [..., D] (LayerNorm
    per patch, then ``.view(-1, 4*d_v)`` and fc1 / GELU / fc2); the row layout of Qwen2.5-VL's."""

    def __init__(self, merger: nn.Module):
        if getattr(merger, "use_postshuffle_norm", False):
            raise ZooError("the Qwen3-VL projector is the main merger (LayerNorm per patch), not a deepstack one")
        super().__init__(merger, merger.norm.normalized_shape[0])


class Qwen3VLAdapter(Qwen25VLAdapter):
    family = "qwen3_vl"

    @classmethod
    def family_name(cls) -> str:
        return "Qwen3-VL"

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def model_class(cls):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    @classmethod
    def config_class(cls):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    @classmethod
    def load(cls, path: str | Path, device, dtype, meaningless: bool = False, model_id: str | None = None):
        """A checkpoint dir (real or :func:`build_tiny`) -> adapter."""
        device = torch.device(device)
        kw = {}
        if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            kw["device_map"] = str(device)
        model = cls.model_class().from_pretrained(path, dtype=dtype, use_safetensors=True, **kw)
        return cls(model.to(device), load_processor(path), model_id or str(path), meaningless=meaningless)

    @classmethod
    def from_config(cls, config_dict: dict, device, dtype, processor_path: str | Path | None = None,
                    model_id: str | None = None):
        """Random weights at the size of ``config_dict``; the offline tokenizer + the real image-processor
        settings unless ``processor_path`` holds the real processor files."""
        from transformers import GenerationConfig

        cfg = {k: v for k, v in copy.deepcopy(config_dict).items() if k != "_name_or_path"}
        config = cls.config_class().from_dict(cfg)
        processor = load_processor(processor_path) if processor_path else offline_processor()
        generation_config = GenerationConfig.from_model_config(config)
        if not processor_path:
            set_token_ids(config, generation_config, processor.tokenizer)
        with torch.device(device):
            model = cls.model_class()._from_config(config, dtype=dtype)
        model.generation_config = generation_config
        return cls(model.to(device), processor, model_id or "qwen3-vl (random weights)", meaningless=True)

    # ---- the contract -----------------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        """``MergerProjector`` over ``model.model.visual.merger`` (LayerNorm per patch -> 4*d_v -> MLP)."""
        if getattr(self, "_projector", None) is None:
            self._projector = MergerProjector(self.model.model.visual.merger)
        return self._projector

    @torch.no_grad()
    def encode(self, prepared: Prepared) -> Encoded:
        visual = self.model.model.visual
        grid = prepared.inputs["image_grid_thw"]  # [n_img, 3] (t, h, w) in patches
        merge = visual.spatial_merge_size
        main: list[Tensor] = []
        deep: dict[int, Tensor] = {}
        hooks = [visual.merger.register_forward_hook(lambda mod, args, out: main.append(args[0]))]
        for j, m in enumerate(visual.deepstack_merger_list):
            hooks.append(m.register_forward_hook(lambda mod, args, out, j=j: deep.__setitem__(j, out)))
        try:
            visual(prepared.inputs["pixel_values"].to(visual.dtype), grid_thw=grid)
        finally:
            for h in hooks:
                h.remove()
        hidden = main[0]  # [n_patches, d_v], 2x2 blocks consecutive, raster order of the blocks
        x = hidden.reshape(-1, merge * merge * hidden.shape[-1])  # [N, 4*d_v]
        features = self.projector(x)  # [N, D]
        deepstack = [deep[j] for j in range(len(deep))]  # [N, D] each

        scopes, start = [], 0
        img_w, img_h = prepared.image.size
        for i, (t, h, w) in enumerate(grid.tolist()):
            rows, cols, n = h // merge, w // merge, t * (h // merge) * (w // merge)
            idx = torch.arange(start, start + n)
            local = torch.arange(n) % (rows * cols)
            cells = torch.stack([local // cols, local % cols], dim=1)
            name = "image" if len(grid) == 1 else f"image {i + 1}"
            scopes.append(Scope(name, idx, (rows, cols), cells, (0.0, 0.0, float(img_w), float(img_h))))
            start += n
        n_pad = int((prepared.inputs["input_ids"] == self.image_token_id).sum())
        if n_pad != x.shape[0]:
            raise ZooError(f"{n_pad} image placeholders but {x.shape[0]} visual tokens")
        return Encoded(x, features, scopes, n_llm_visual=n_pad, state={"grid_thw": grid, "deepstack": deepstack})

    @torch.no_grad()
    def build_inputs(
        self, prepared: Prepared, encoded: Encoded, kept: Tensor, tokens: Tensor | None = None
    ) -> LLMInputs:
        """Qwen2.5-VL's pruned inputs (original M-RoPE positions) plus the deepstack rows of the kept
        tokens and the kept visual slots, in the same ascending order."""
        base = super().build_inputs(prepared, encoded, kept, tokens)
        ids = prepared.inputs["input_ids"]
        kept = torch.sort(kept.to(ids.device, torch.long)).values
        is_img = ids == self.image_token_id
        keep_col = ~is_img
        for b in range(ids.shape[0]):
            keep_col[b, is_img[b].nonzero().squeeze(1)[kept]] = True
        visual_mask = (ids[keep_col] == self.image_token_id).view(ids.shape[0], -1)  # [B, L]
        dev = base.inputs_embeds.device
        deepstack = [d[kept.to(d.device)].repeat(ids.shape[0], 1).to(dev) for d in encoded.state["deepstack"]]
        return LLMInputs(base.inputs_embeds, base.attention_mask, base.position_ids, base.n_visual,
                         visual_mask=visual_mask, deepstack=deepstack)

    @torch.no_grad()
    def generate_batch(self, inputs: LLMInputs, max_new_tokens: int) -> list[Generation]:
        """Greedy decoding through the language model's public forward (see the module docstring);
        rows that hit EOS are padded, as ``generate`` does."""
        from transformers import DynamicCache

        lm, head = self.model.model.language_model, self.model.lm_head
        gc = self.model.generation_config
        pad = gc.pad_token_id if gc.pad_token_id is not None else min(self.eos_ids, default=0)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        emb, mask, pos = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
        b = emb.shape[0]
        if pos is None:
            raise ZooError("Qwen3-VL inputs need explicit M-RoPE position ids")
        cache = DynamicCache(config=lm.config)
        ckw = {cache_keyword(type(lm)): cache}
        deep = None if inputs.deepstack is None else [d.to(emb.device, emb.dtype) for d in inputs.deepstack]
        clock = TokenClock(self.device)
        clock.start()
        out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True,
                 visual_pos_masks=inputs.visual_mask if deep is not None else None,
                 deepstack_visual_embeds=deep, **ckw)
        new = []
        unfinished = torch.ones(b, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            logits = head(out.last_hidden_state[:, -1]).float()
            tok = torch.argmax(logits, dim=-1)
            tok = torch.where(unfinished, tok, torch.full_like(tok, pad))
            clock.tick()
            new.append(tok)
            unfinished &= ~torch.isin(tok, eos)
            if not bool(unfinished.any()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
            out = lm(inputs_embeds=lm.embed_tokens(tok[:, None]), attention_mask=mask, position_ids=pos[..., -1:],
                     use_cache=True, **ckw)
        device_sync(self.device)
        rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(b)]
        gens = []
        for row in rows:
            ids = self.answer_ids(row, pad)
            gens.append(Generation(ids, self.decode(ids), clock.prefill_ms, clock.decode_ms))
        return gens


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE (e.g. Qwen3-VL-30B-A3B): the same ViT, merger and deepstack path, the same
    ``visual_pos_masks`` / ``deepstack_visual_embeds`` arguments of its text model; only the LLM's MLPs
    are sparse experts, which neither the pruning nor the prune loop looks into."""

    family = "qwen3_vl_moe"

    @classmethod
    def family_name(cls) -> str:
        return "Qwen3-VL-MoE"

    @classmethod
    def model_class(cls):
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration

    @classmethod
    def config_class(cls):
        from transformers import Qwen3VLMoeConfig

        return Qwen3VLMoeConfig


def tiny_config(tokenizer, second: bool = False, small: bool = False, moe: bool = False, vllm: bool = False) -> dict:
    """A tiny Qwen3-VL config dict whose special ids are ``tokenizer``'s. ``second``: other sizes (a wider
    ViT with 2 deepstack mergers, a 3-layer LLM with 6 heads) for the keep-all check on a second shape.
    ``small``: for timing, like small-llava: a 4-block ViT of width 256 (3 deepstack mergers) and a
    ~100M 14-layer Qwen3 LLM (head_dim 64), with the real image processor (one token per 32x32 px)."""
    ids = special_ids(tokenizer)
    vocab = -(-max(len(tokenizer), 512) // 64) * 64
    mrope = [4, 2, 2]
    if small:
        vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                      deepstack_visual_indexes=[0, 1, 2])
        text = dict(hidden_size=512, intermediate_size=4096, num_hidden_layers=14, num_attention_heads=8,
                    num_key_value_heads=8, head_dim=64)
        mrope = [12, 10, 10]  # 32 rotary frequencies, the real [24, 20, 20] of 64 halved
    elif second:
        vision = dict(depth=3, hidden_size=48, intermediate_size=96, num_heads=3, out_hidden_size=96,
                      deepstack_visual_indexes=[0, 2])
        text = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=3, head_dim=16)
    else:
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      deepstack_visual_indexes=[0, 1, 2])
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
        if vllm:  # vLLM's CPU attention takes head_dim >= 32: 16 rotary frequencies
            text.update(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
            mrope = [6, 5, 5]
    if moe:  # 4 experts, 2 per token, every layer sparse
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)
    return dict(
        model_type="qwen3_vl_moe" if moe else "qwen3_vl",
        vision_config=dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304 if small else 64, hidden_act="gelu_pytorch_tanh",
                           initializer_range=0.02 if small else 0.3),
        text_config=dict(
            text,
            vocab_size=vocab,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            # head_dim 16: 8 rotary frequencies, interleaved T/H/W as in the real [24, 20, 20] of 64
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope,
                             "mrope_interleaved": True},
            bos_token_id=ids["endoftext"],
            eos_token_id=ids["im_end"],
            pad_token_id=ids["endoftext"],
            initializer_range=0.02 if small else 0.3,  # tiny: answers depend on positions and kept tokens
        ),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )


def build_tiny(out_dir: Path, second: bool = False, small: bool = False, moe: bool = False,
               vllm: bool = False) -> None:
    """Write a tiny (or ``small``; ``moe``: Qwen3-VL-MoE) random checkpoint dir (model + processor +
    chat template), seed 0."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    cls = Qwen3VLMoeAdapter if moe else Qwen3VLAdapter
    processor = offline_processor(REAL_IMAGE_PROCESSOR if small else TINY_IMAGE_PROCESSOR)
    config = cls.config_class().from_dict(tiny_config(processor.tokenizer, second=second, small=small, moe=moe,
                                                      vllm=vllm))
    torch.manual_seed(0)
    model = cls.model_class()(config).eval()
    ids = special_ids(processor.tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["endoftext"], pad_token_id=ids["endoftext"], eos_token_id=[ids["im_end"], ids["endoftext"]]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    for name in ("processor_config.json", "tokenizer_config.json"):  # name the stock class, like real checkpoints
        if (p := out_dir / name).is_file() and (cfg := json.loads(p.read_text())).get("processor_class"):
            cfg["processor_class"] = "Qwen3VLProcessor"  # the MoE checkpoints use it too
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_video_processor_config(out_dir, "Qwen3VLVideoProcessor",
                                 REAL_IMAGE_PROCESSOR if small else TINY_IMAGE_PROCESSOR, "Qwen3VLProcessor")


def build_vllm_tiny(out_dir: Path) -> None:
    """``vllm-tiny-qwen3-vl``: tiny-qwen3-vl with an LLM vLLM's CPU attention takes (head_dim 32)."""
    build_tiny(out_dir, vllm=True)


def build_tiny_moe(out_dir: Path) -> None:
    """``tiny-qwen3-vl-moe``: tiny-qwen3-vl with sparse-expert MLPs (Qwen3-VL-MoE)."""
    build_tiny(out_dir, moe=True)


def build_small(out_dir: Path) -> None:
    """``small-qwen3-vl``: Qwen3-VL's token geometry (the real image processor) with small towers."""
    build_tiny(out_dir, small=True)


__all__ = ["QWEN_SPECIAL_TOKENS", "Qwen3VLAdapter", "Qwen3VLMoeAdapter", "MergerProjector", "build_tiny", "tiny_config"]
