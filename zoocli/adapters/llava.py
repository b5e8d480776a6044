"""LLaVA-1.5 and LLaVA-NeXT adapters (the offline random-weight LLaVA models: ``offline_llava``).

LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744):
CLIP ViT-L/14-336 -> 2-layer GELU MLP projector -> Vicuna. X = the CLIP hidden states of
``config.vision_feature_layer`` (CLS dropped for the "default" strategy), M = the projector, one
576-token scope.

LLaVA-NeXT (Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", 2024):
"anyres" tiling. The base image (resized to 336x336) and every 336x336 tile of the image resized
into the best grid pinpoint go through CLIP and the projector; the tiles are stitched into one big
grid, the rows / cols that only cover padding are removed ("unpad") and an ``image_newline``
embedding follows every row of the big grid. Candidates are the live patch rows (base first, then
the stitched grid in row-major order, i.e. exactly the LLM slot order); newline slots are never
candidates and are always kept. The slot -> X-row map comes from the library's own
``pack_image_features`` run on index values, so it cannot drift from transformers' unpadding.

Kept tokens are fed with ``inputs_embeds``: the text ids are embedded, unkept placeholder
positions are dropped, and the kept visual embeddings are ``masked_scatter``-ed into the remaining
placeholders (the same scatter transformers does). Positions are contiguous (renumbered by
``generate`` from the 2-D attention mask), as in most pruning papers.
"""

from __future__ import annotations

import copy

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from zoocli.adapters.base import Adapter, Encoded, EncoderProbe, Generation, LLMInputs, Prepared, Scope
from zoocli.adapters.prompt import prompt_batch, question_ids
from zoocli.adapters.random_init import init_on, round_up
from zoocli.text import user_text
from zoocli.timing import TokenClock, device_sync

# The llava-hf chat templates (LLaVA-1.5: "USER: <image>\n{q} ASSISTANT:"; LLaVA-NeXT vicuna:
# the same turn format, with an optional system turn printed verbatim).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer():
    """The offline byte-level tokenizer with LLaVA's special tokens (<image> is one id): the offline
    LLaVA models' (``offline_llava``, the shipped demo) and ``--random-weights``' when the real one is not cached."""
    from zoocli.adapters.tokenizer import build_byte_tokenizer

    return build_byte_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"], {"image_token": "<image>"},
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", vocab_size=512,
    )


# ----------------------------------------------------------------------------------------------
# adapters


class LlavaAdapter(Adapter):
    """LLaVA-1.5: one "image" scope, grid = (image_size / patch_size)^2 patch tokens."""

    family = "llava"
    chat_template = LLAVA_CHAT_TEMPLATE
    provides = Adapter.provides | {"cls_attn", "vision_keys"}
    # LLaVA-1.5 resizes the short side to the tower's input and keeps only the centre square:
    # a 20000x1 image becomes a 6.7M x 336 px strip (a 27 GB buffer) of which it sees 1/20000
    max_aspect: float | None = 20.0
    aspect_reason = ("it resizes the short side to its input size and keeps only the centre square, "
                     "so a longer image is mostly thrown away after a huge resize")

    @classmethod
    def family_name(cls) -> str:
        return "LLaVA-1.5"

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def model_class(cls):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str, dtype: torch.dtype, meaningless: bool = False):
        """From a checkpoint (HF id or local dir); raises OSError-family errors if it is not available."""
        from transformers import AutoProcessor

        model = cls.model_class().from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        model.to(device)
        processor = AutoProcessor.from_pretrained(str(path))
        return cls(model, processor, str(path), meaningless=meaningless)

    @classmethod
    def from_config(cls, config_dict: dict[str, Any], device: torch.device | str, dtype: torch.dtype):
        """Full-size random weights from a config dict (``--random-weights``). The processor is the
        real one if it is in the local HF cache, else one configured like it around the offline
        tokenizer (then the config's special-token ids are remapped onto that tokenizer)."""
        from transformers import AutoConfig, AutoProcessor

        cfg = dict(config_dict)
        name = cfg.pop("_name_or_path", None) or "random"
        config = AutoConfig.for_model(**cfg)
        try:
            processor = AutoProcessor.from_pretrained(name, local_files_only=True)
        except Exception:  # not cached (or no name): build it like the real one
            processor = cls.make_processor(config, build_tokenizer())
        tok = processor.tokenizer
        config.image_token_id = tok.convert_tokens_to_ids(processor.image_token)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            val = getattr(tok, key, None)
            if val is not None:
                setattr(config.text_config, key, val)
        if tok.pad_token_id is not None and hasattr(config, "pad_token_id"):
            config.pad_token_id = tok.pad_token_id
        if config.text_config.vocab_size < len(tok):
            config.text_config.vocab_size = round_up(len(tok), 64)
        model = init_on(cls.model_class(), config, device, dtype)
        gc = model.generation_config
        gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        return cls(model, processor, f"{name} (random weights)", meaningless=True)

    @classmethod
    def make_processor(cls, config, tokenizer):
        """A processor configured like llava-hf's for ``config`` (PIL backend, no torchvision)."""
        from transformers import LlavaImageProcessorPil, LlavaProcessor

        size = config.vision_config.image_size
        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=CLIP_MEAN, image_std=CLIP_STD, do_center_crop=True,
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1, chat_template=cls.chat_template,
        )

    # -- the contract ----------------------------------------------------------------------

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def prepare(self, image: Image.Image, question: str) -> Prepared:
        self.check_image(image.size)
        question = user_text(question)  # undecodable bytes -> U+FFFD; token-like text stays text
        batch = prompt_batch(  # the question is tokenised as plain text (zoocli.adapters.prompt)
            self.processor,
            lambda text: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            question, lambda prompt: self.processor(images=image, text=prompt, return_tensors="pt"))
        self.check_context(int(batch["input_ids"].shape[1]))
        inputs = {}
        for k, v in batch.items():
            if not isinstance(v, Tensor):
                continue
            v = v.to(self.device)
            inputs[k] = v.to(self.dtype) if v.is_floating_point() else v
        q = question_ids(self.processor.tokenizer, question)
        return Prepared(image=image, question=question, inputs=inputs,
                        question_ids=torch.tensor(q, dtype=torch.long, device=self.device))

    def _vision(self, pixel_values: Tensor, stash: dict | None = None) -> Tensor:
        """X for a batch of tiles: [T, P, Dv] (layer(s) per config, CLS dropped for "default").
        ``stash``, if given, receives ``signal_input`` (see ``vision_signals``): a reference, no compute."""
        cfg = self.model.config
        hs = self.model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        if stash is not None:
            stash["signal_input"] = _feature_layer_input(hs, cfg.vision_feature_layer)
        layers = cfg.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        xs = [hs[i] for i in layers]
        if cfg.vision_feature_select_strategy == "default":
            xs = [x[:, 1:] for x in xs]
        return torch.cat(xs, dim=-1) if len(xs) > 1 else xs[0]

    @torch.no_grad()
    def encode(self, prepared: Prepared) -> Encoded:
        stash: dict[str, Any] = {}
        x = self._vision(prepared.inputs["pixel_values"], stash)  # [1, P, Dv]
        feats = self.projector(x)  # [1, P, D], projected in the library's own layout (bit-identical)
        vision, features = x[0], feats[0]
        n = vision.shape[0]
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        grid = (side, side) if side * side == n else (1, n)
        idx = torch.arange(n, device=self.device)
        cells = torch.stack([idx // grid[1], idx % grid[1]], dim=1)
        scope = Scope("image", idx, grid, cells, self._image_box(prepared.image.size))
        return Encoded(vision=vision, features=features, scopes=[scope], n_llm_visual=n,
                       state={"slot_src": idx, "newline": None, **stash})

    @torch.no_grad()
    def vision_signals(self, prepared: Prepared, encoded: Encoded) -> dict[str, Tensor]:
        """VisionZip's signals, per candidate in candidate order: ``cls_attn`` [N] the CLS->patch
        attention (summed over heads) and ``vision_keys`` [N, Dk] the head-averaged keys, both at
        the vision layer the features come from (``vision_feature_layer``, -2). That one layer's
        attention is recomputed from its input hidden state (stashed by ``encode``) with its own
        ``layer_norm1`` / ``q_proj`` / ``k_proj`` and CLIP's scale: the CLS query row only, so the
        tower keeps its SDPA attention. LLaVA-NeXT: per tile, mapped to candidates via ``slot_row``."""
        from zoocli.errors import UsageError

        stash = encoded.state.get("signal_input")
        if stash is None:
            raise UsageError("VisionZip needs a single integer vision_feature_layer > 0 "
                             f"(this model has {self.model.config.vision_feature_layer!r})")
        layer_index, hidden = stash  # hidden [T, S, Dv]: the input of encoder layer ``layer_index``
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps it on some versions
        layer = tower.encoder.layers[layer_index]
        cls_attn, keys = clip_cls_attention(layer, hidden)  # [T, S], [T, S, hd]
        start = 1 if self.model.config.vision_feature_select_strategy == "default" else 0
        cls_attn = cls_attn[:, start:].reshape(-1)  # [T*P], X-row order
        keys = keys[:, start:].reshape(-1, keys.shape[-1])  # [T*P, hd]
        slot_row = encoded.state.get("slot_row")
        rows = slot_row[slot_row >= 0] if slot_row is not None else torch.arange(cls_attn.numel())
        rows = rows.to(cls_attn.device)
        return {"cls_attn": cls_attn[rows], "vision_keys": keys[rows]}

    def encoder_probe(self, prepared: Prepared, encoded: Encoded, float32: bool = True) -> EncoderProbe:
        """The CLIP tower from its input embeddings (after pre-layernorm) up to the feature layer,
        CLS dropped per the select strategy, then the projector; float32 copies when the model is
        in half precision. LLaVA-NeXT: the tiles of this image, candidates mapped via ``slot_row``."""
        from zoocli.errors import UsageError

        cfg = self.model.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise UsageError("--vs-encoder needs a single vision feature layer")
        tower, projector = self.model.model.vision_tower, self.projector
        if float32 and self.dtype != torch.float32:
            tower, projector = copy.deepcopy(tower).float(), copy.deepcopy(projector).float()
        vm = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a transformer in v4, not in v5
        pv = prepared.inputs["pixel_values"]
        if "n_tiles" in encoded.state:
            n_tiles = encoded.state["n_tiles"]
            pv = pv[0, :n_tiles] if pv.dim() == 5 else pv[:n_tiles]
            rows = encoded.state["slot_row"]
            rows = rows[rows >= 0]
        else:
            rows = torch.arange(encoded.features.shape[0], device=pv.device)
        emb = vm.pre_layrnorm(vm.embeddings(pv.float()))  # [T, 1+P, Dv]
        upto = layer if layer >= 0 else len(vm.encoder.layers) + 1 + layer  # hidden_states[k] = after k layers
        drop_cls = cfg.vision_feature_select_strategy == "default"

        def features(x: Tensor) -> Tensor:  # [B, 1+P, Dv] -> [B, P, D]
            for blk in vm.encoder.layers[:upto]:
                out = blk(x, None)
                x = out[0] if isinstance(out, tuple) else out
            return projector(x[:, 1:] if drop_cls else x)

        return EncoderProbe(emb=emb, rows=rows, patches=emb.shape[1] - int(drop_cls), offset=int(drop_cls),
                            features=features)

    def visual_positions(self, prepared: Prepared, encoded: Encoded) -> Tensor:
        """[N] positions of the candidates in the unpruned LLM sequence (ascending = candidate
        order); LLaVA-NeXT newline slots are not candidates and are left out."""
        ph = (prepared.inputs["input_ids"][0] == self.image_token_id).nonzero().squeeze(1)  # [S]
        return ph[encoded.state["slot_src"].to(ph.device) >= 0]

    def _image_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The original-image area the processor's (pad-to-square or) resize + center-crop covers."""
        w, h = size
        ip = self.processor.image_processor
        if getattr(ip, "do_pad", False):  # pad to a square, then resize: the square around the image
            s = max(w, h)
            return _box((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        if not getattr(ip, "do_center_crop", False):
            return (0.0, 0.0, float(w), float(h))
        short = _get(ip.size, "shortest_edge") or min(_get(ip.size, "height") or w, _get(ip.size, "width") or h)
        scale = short / min(w, h) if _get(ip.size, "shortest_edge") else None
        ch, cw = _get(ip.crop_size, "height"), _get(ip.crop_size, "width")
        if scale is None:  # resized to a fixed (height, width): the crop is a fraction of each side
            sh, sw = _get(ip.size, "height"), _get(ip.size, "width")
            bw, bh = min(cw / sw, 1.0) * w, min(ch / sh, 1.0) * h
        else:
            bw, bh = min(cw / scale, w), min(ch / scale, h)
        return _box((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)

    @torch.no_grad()
    def build_inputs(
        self, prepared: Prepared, encoded: Encoded, kept: Tensor, tokens: Tensor | None = None
    ) -> LLMInputs:
        kept = torch.as_tensor(kept, dtype=torch.long, device=self.device)
        n = encoded.features.shape[0]
        if kept.numel() and (kept.min() < 0 or kept.max() >= n or (kept[1:] <= kept[:-1]).any()):
            raise ValueError(f"kept must be ascending unique candidate indices in [0, {n})")
        feats = encoded.features
        if tokens is not None:
            if tokens.shape != (kept.numel(), feats.shape[1]):
                raise ValueError(f"tokens must be [{kept.numel()}, {feats.shape[1]}], got {list(tokens.shape)}")
            feats = feats.clone()
            feats[kept] = tokens.to(feats)
        slot_src: Tensor = encoded.state["slot_src"]  # [S] candidate index per LLM slot, -1 = newline
        slot_keep = slot_src < 0  # newlines always kept
        cand_slot = (slot_src >= 0).nonzero().squeeze(1)  # [N] the slot of each candidate
        slot_keep[cand_slot[kept]] = True
        vis = torch.empty(slot_src.numel(), feats.shape[1], dtype=feats.dtype, device=feats.device)
        vis[cand_slot] = feats
        if (slot_src < 0).any():
            vis[slot_src < 0] = encoded.state["newline"].to(vis)
        return self.splice(prepared.inputs["input_ids"], prepared.inputs["attention_mask"],
                           [slot_keep], [vis[slot_keep]])

    def splice(
        self, input_ids: Tensor, attention_mask: Tensor, slot_keep: list[Tensor], visual: list[Tensor]
    ) -> LLMInputs:
        """Embed ``input_ids`` [B, L], drop the placeholders whose ``slot_keep[b]`` is False and scatter
        ``visual[b]`` [k_b, D] into the remaining ones. B > 1 needs equal pruned lengths for now
        (left padding of unequal rows will come with the batched variant)."""
        embed = self.model.get_input_embeddings()
        rows_e, rows_m, n_vis = [], [], []
        for b in range(input_ids.shape[0]):
            ids, mask = input_ids[b], attention_mask[b]
            ph = ids == self.image_token_id  # [L]
            if int(ph.sum()) != slot_keep[b].numel():
                raise ValueError(f"{int(ph.sum())} image placeholders but {slot_keep[b].numel()} visual slots")
            keep = torch.ones_like(ph)
            keep[ph] = slot_keep[b]
            ids, mask = ids[keep], mask[keep]
            e = embed(ids)  # [L', D]
            e = e.masked_scatter((ids == self.image_token_id)[:, None].expand_as(e), visual[b].to(e.dtype))
            rows_e.append(e)
            rows_m.append(mask)
            n_vis.append(int(visual[b].shape[0]))
        if len({r.shape[0] for r in rows_e}) != 1:
            raise NotImplementedError("rows of different pruned lengths need left padding (not implemented yet)")
        return LLMInputs(inputs_embeds=torch.stack(rows_e), attention_mask=torch.stack(rows_m),
                         position_ids=None, n_visual=max(n_vis))

    @torch.no_grad()
    def generate(self, inputs: LLMInputs, max_new_tokens: int) -> Generation:
        """Greedy answer of a one-row input, timed (prefill = call to first-token logits)."""
        return self.generate_batch(inputs, max_new_tokens)[0]

    @torch.no_grad()
    def generate_batch(self, inputs: LLMInputs, max_new_tokens: int) -> list[Generation]:
        """Greedy answers for every row of a (left-padded, ``build_inputs_batch``) batch in one
        ``generate`` call; positions come from each row's attention mask, as at batch size 1.
        Timings are the batch's (every row gets the same prefill / decode times)."""
        from transformers import LogitsProcessorList

        from zoocli.adapters.decoder import greedy_config

        tok = self.processor.tokenizer
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = tok.pad_token_id
        if pad is None:
            pad = min(self.eos_ids, default=0)
        clock = TokenClock(self.device)
        clock.start()
        out = self.model.generate(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
            generation_config=greedy_config(self.model.generation_config, max_new_tokens, pad_token_id=pad),
            logits_processor=LogitsProcessorList([clock]),
        )
        device_sync(self.device)
        if out.shape[1] > max_new_tokens:  # versions that also return the (embeds-only) prompt slots
            out = out[:, inputs.inputs_embeds.shape[1]:]
        gens = []
        for row in out.tolist():
            ids = self.answer_ids(row)
            gens.append(Generation(ids=ids, text=self.decode(ids).strip(), prefill_ms=clock.prefill_ms,
                                   decode_ms=clock.decode_ms))
        return gens


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: scopes "base" (the whole image) then "crop 1..n" (anyres tiles)."""

    family = "llava_next"
    chat_template = LLAVA_NEXT_CHAT_TEMPLATE
    max_aspect = None  # anyres resizes into a pinpoint grid and pads: no blow-up at any aspect ratio

    @classmethod
    def family_name(cls) -> str:
        return "LLaVA-NeXT"

    @classmethod
    def model_class(cls):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def make_processor(cls, config, tokenizer):
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        size = config.vision_config.image_size
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
        return LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1, chat_template=cls.chat_template,
        )

    @torch.no_grad()
    def encode(self, prepared: Prepared) -> Encoded:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        cfg, inner = self.model.config, self.model.model
        vc = cfg.vision_config
        image_size = prepared.inputs["image_sizes"][0]  # (H, W) of the original image
        n_tiles = image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, vc.image_size)
        pv = prepared.inputs["pixel_values"]
        pv = pv[0, :n_tiles] if pv.dim() == 5 else pv[:n_tiles]
        stash: dict[str, Any] = {}
        x = self._vision(pv, stash)  # [T, P, Dv]
        feats = self.projector(x)  # [T, P, D], per tile as the library does (bit-identical)
        t, p = x.shape[:2]
        # slot map: run the library's own pack/unpad on row indices; -1 marks newline slots
        ar = torch.arange(t * p, device=x.device, dtype=torch.float64).view(t, p, 1)
        packed, _ = inner.pack_image_features([ar], image_size[None], cfg.vision_feature_select_strategy,
                                              image_newline=torch.tensor([-1.0], dtype=torch.float64, device=x.device))
        slot_row = packed[0][:, 0].round().long()  # [S] X row per LLM slot, -1 = newline
        rows = slot_row[slot_row >= 0]  # [N] X rows of the candidates, in slot order
        vision = x.reshape(t * p, -1)[rows]
        features = feats.reshape(t * p, -1)[rows]
        slot_src = torch.full_like(slot_row, -1)
        slot_src[slot_row >= 0] = torch.arange(rows.numel(), device=rows.device)

        side = vc.image_size // vc.patch_size
        h, w = (int(v) for v in image_size.tolist())
        nph, npw = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, vc.image_size)
        scopes = tile_scopes(rows, t, p, side, (0.0, 0.0, float(w), float(h)), self._tile_boxes(h, w, nph, npw))
        return Encoded(vision=vision, features=features, scopes=scopes, n_llm_visual=int(slot_row.numel()),
                       state={"slot_src": slot_src, "slot_row": slot_row, "newline": inner.image_newline,
                              "n_tiles": t, "tile_grid": (nph, npw), **stash})

    def _tile_boxes(self, h: int, w: int, nph: int, npw: int) -> list[tuple[float, float, float, float]]:
        """Each anyres tile's area in original-image pixels (row-major). The processor resizes the
        image to fit the best pinpoint (aspect kept, ceil-rounded) and pads it centred; the box maps
        the tile back through that (exact up to the rounding of the resize). A box may reach past
        the image where the tile covers padding: cells are the box split evenly, so it is not
        clipped (drawing clips)."""
        import math

        from transformers.image_processing_utils import select_best_resolution

        ip = self.processor.image_processor
        s = _get(ip.crop_size, "height") or self.model.config.vision_config.image_size
        bh, bw = select_best_resolution((h, w), [list(q) for q in ip.image_grid_pinpoints])
        if bw / w < bh / h:
            nw, nh = bw, min(math.ceil(h * bw / w), bh)
        else:
            nh, nw = bh, min(math.ceil(w * bh / h), bw)
        px, py = (bw - nw) // 2, (bh - nh) // 2
        sx, sy = nw / w, nh / h
        out = []
        for i in range(nph):
            for j in range(npw):
                x0, x1 = (j * s - px) / sx, ((j + 1) * s - px) / sx
                y0, y1 = (i * s - py) / sy, ((i + 1) * s - py) / sy
                out.append(_box(x0, y0, x1, y1))
        return out


# ----------------------------------------------------------------------------------------------
# helpers


def tile_scopes(rows: Tensor, t: int, p: int, side: int, image_box, tile_boxes=None) -> list[Scope]:
    """LLaVA-NeXT's scopes: ``rows`` [N] are the candidates' X rows (tile * p + patch, in LLM slot
    order); "base" holds tile 0's, "crop k" tile k's; cells are (row, col) in the tile's side x side
    grid (``scopes_by_tile``)."""
    within = rows % p
    return scopes_by_tile(rows // p, torch.stack([within // side, within % side], dim=1), t, side,
                          image_box, tile_boxes)


def scopes_by_tile(tile: Tensor, cells: Tensor, n_tiles: int, side: int, image_box, tile_boxes=None) -> list[Scope]:
    """The anyres scopes (LLaVA-NeXT, OneVision) from each candidate's ``tile`` [N] (0 = the base
    image) and its ``cells`` [N, 2] within the tile: "base", then "crop k" (none for a tile that only
    covered padding). ``tile_boxes``: each crop's area in image pixels (None: the whole image's,
    for a caller that draws nothing)."""
    scopes = []
    for k in range(n_tiles):
        idx = (tile == k).nonzero().squeeze(1)
        if k > 0 and idx.numel() == 0:
            continue  # a tile that only covered padding
        box = image_box if k == 0 or tile_boxes is None else tile_boxes[k - 1]
        scopes.append(Scope("base" if k == 0 else f"crop {k}", idx, (side, side), cells[idx], box))
    return scopes


def _feature_layer_input(hidden_states, feature_layer) -> tuple[int, Tensor] | None:
    """(encoder layer index, its input hidden state [T, S, Dv]) for the layer whose output is
    ``hidden_states[feature_layer]`` (hidden_states[0] = the embeddings, [i] = layer i-1's output);
    None for a list of layers or the embedding output (no attention there)."""
    if not isinstance(feature_layer, int):
        return None
    out = feature_layer if feature_layer >= 0 else len(hidden_states) + feature_layer
    if not 1 <= out < len(hidden_states):
        return None
    return out - 1, hidden_states[out - 1]


def clip_cls_attention(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """For a CLIP encoder ``layer`` and its input ``hidden`` [T, S, Dv]: (the softmax attention the
    CLS query (row 0) gives every token, summed over heads [T, S] (float32), the keys averaged over
    heads [T, S, hd]). Same arithmetic as eager ``CLIPAttention``: ``layer_norm1``, ``q_proj`` /
    ``k_proj``, scores scaled by ``head_dim ** -0.5``, fp32 softmax, no mask."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)  # [T, S, Dv]
    t, s = x.shape[:2]
    hd = attn.head_dim
    q = attn.q_proj(x[:, :1]).view(t, 1, -1, hd).transpose(1, 2)  # [T, H, 1, hd]
    k = attn.k_proj(x).view(t, s, -1, hd).transpose(1, 2)  # [T, H, S, hd]
    w = torch.matmul(q, k.transpose(2, 3)) * attn.scale  # [T, H, 1, S]
    w = torch.softmax(w, dim=-1, dtype=torch.float32)
    return w[:, :, 0].sum(dim=1), k.mean(dim=1)


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    return tuple(round(float(v), 4) + 0.0 for v in (x0, y0, x1, y1))  # type: ignore[return-value]


def _get(d, key):
    """A key of a size dict (plain dict or transformers ``SizeDict``)."""
    if d is None:
        return None
    if isinstance(d, dict):
        return d.get(key)
    return getattr(d, key, None)
