"""LLaVA-OneVision adapter (Li et al., "LLaVA-OneVision: Easy Visual Task Transfer", arXiv:2408.03326;
transformers' ``LlavaOnevisionForConditionalGeneration``).

SigLIP tower (no CLS token: ``vision_feature_select_strategy="full"``, the last layer) -> 2-layer GELU MLP
projector -> Qwen2. Tiling is LLaVA-NeXT's anyres (a base image + the tiles of the image resized into the
best pinpoint, stitched, unpadded, an ``image_newline`` after every row of the stitched grid) with two
differences, both read from ``LlavaOnevisionModel.pack_image_features``: the base image gets no newline,
and **anyres_max_N**: when the unpadded grid holds more than about N tiles' worth of patches
(``ratio = sqrt(h*w / (N*P)) > 1.1``) the projected grid is bilinearly downsampled to ``(h/ratio,
w/ratio)`` before the newlines are added.

Candidates and scopes follow LLaVA-NeXT: candidates are the LLM's visual slots except the newlines (base
first, then the stitched grid row-major), newline slots are always kept, scopes are "base" then "crop k"
(so ``--scope crop`` splits the budget per crop, ``global`` over all of them). The slot layout comes from
the library's own ``pack_image_features``, run three times: on the projected features (the stock LLM
tokens, bit for bit), on X (``Encoded.vision``: the same reshape / unpad / downsampling applied to the
pre-projector rows) and on the stitched (row, col) coordinates of every X row (which crop and cell a slot
sits in; newlines are marked by a -1 newline vector). Where no downsampling happens every step is a
gather, so ``projector(vision) == features`` row for row, as for LLaVA-NeXT. **Deviation where anyres_max
downsamples** (large images): a candidate is a bilinear mix of up to 4 projected rows; its ``vision`` row is
the same mix of the X rows, and ``projector(vision)`` is then only close to ``features`` (the projector is
not linear), so projector-sensitivity methods (ZOO, exact) score the projector at the mixed input. The
kept tokens fed to the LLM are always the stock (mixed) embeddings.

VisionZip is not served (SigLIP has no CLS attention); ``score --vs-encoder`` neither (CLIP only).
Kept tokens are fed with ``inputs_embeds`` and contiguous positions, as for LLaVA-NeXT.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import Tensor

from zoocli.adapters.base import Adapter, Encoded, Scope
from zoocli.adapters.llava import LlavaNextAdapter, scopes_by_tile
from zoocli.adapters.qwen2_5_vl import QWEN_SPECIAL_TOKENS, write_video_processor_config
from zoocli.adapters.random_init import init_on, round_up

# llava-hf/llava-onevision-qwen2-7b-ov-hf's chat template (Qwen2 turns, images before the text)
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


@functools.cache
def processor_class() -> type:
    """``LlavaOnevisionProcessor`` without its video processor (images only)."""
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionProcessorNoVideo(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    return LlavaOnevisionProcessorNoVideo


def build_tokenizer():
    """The offline byte-level tokenizer with Qwen2's special tokens plus ``<image>`` / ``<video>``."""
    from zoocli.adapters.tokenizer import build_byte_tokenizer

    return build_byte_tokenizer(
        QWEN_SPECIAL_TOKENS + ["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"},
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", vocab_size=512,
    )


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: scopes "base" then "crop 1..n", as LLaVA-NeXT."""

    family = "llava_onevision"
    chat_template = ONEVISION_CHAT_TEMPLATE
    provides = Adapter.provides  # no CLS attention / keys for VisionZip

    @classmethod
    def family_name(cls) -> str:
        return "LLaVA-OneVision"

    @classmethod
    def model_class(cls):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    @classmethod
    def load(cls, path: str | Path, device, dtype, meaningless: bool = False):
        """From a checkpoint (HF id or local dir). The processor is built from the checkpoint's tokenizer
        and image processor (AutoProcessor would need torchvision for the video processor)."""
        from transformers import AutoTokenizer

        model = cls.model_class().from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        model.to(device)
        try:  # -> LlavaOnevisionImageProcessorPil without torchvision (5.18+)
            from transformers import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(str(path))
        except ImportError:  # 5.17: AutoImageProcessor itself needs torchvision
            from transformers import LlavaOnevisionImageProcessorPil

            image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(str(path))
        processor = cls._processor(model.config, AutoTokenizer.from_pretrained(str(path)), image_processor)
        return cls(model, processor, str(path), meaningless=meaningless)

    @classmethod
    def _processor(cls, config, tokenizer, image_processor):
        vc = config.vision_config
        return processor_class()(
            image_processor=image_processor, tokenizer=tokenizer,
            num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=getattr(tokenizer, "chat_template", None) or cls.chat_template,
            vision_aspect_ratio=config.vision_aspect_ratio,
        )

    @classmethod
    def make_processor(cls, config, tokenizer):
        """A processor configured like llava-hf's for ``config`` (PIL backend, no torchvision)."""
        from transformers import LlavaOnevisionImageProcessorPil

        s = config.vision_config.image_size
        ip = LlavaOnevisionImageProcessorPil(
            size={"height": s, "width": s}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        )
        return cls._processor(config, tokenizer, ip)

    @classmethod
    def from_config(cls, config_dict, device, dtype):
        """Full-size random weights (``--random-weights``): the offline tokenizer with the config's
        special ids remapped onto it, the real processor settings."""
        from transformers import AutoConfig

        cfg = {k: v for k, v in dict(config_dict).items() if k != "_name_or_path"}
        config = AutoConfig.for_model(**cfg)
        tok = build_tokenizer()
        _set_ids(config, tok)
        if config.text_config.vocab_size < len(tok):
            config.text_config.vocab_size = round_up(len(tok), 64)
        processor = cls.make_processor(config, tok)
        model = init_on(cls.model_class(), config, device, dtype)
        _set_generation_ids(model.generation_config, tok)
        return cls(model, processor, f"{cfg.get('_name_or_path', 'llava-onevision')} (random weights)",
                   meaningless=True)

    def encoder_probe(self, prepared, encoded, float32: bool = True):
        return Adapter.encoder_probe(self, prepared, encoded, float32)

    @torch.no_grad()
    def encode(self, prepared) -> Encoded:
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        cfg, inner = self.model.config, self.model.model
        vc = cfg.vision_config
        image_size = prepared.inputs["image_sizes"][0]  # (H, W)
        n_tiles = image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, vc.image_size)
        pv = prepared.inputs["pixel_values"]
        pv = pv[0, :n_tiles] if pv.dim() == 5 else pv[:n_tiles]
        x = self._vision(pv)  # [T, P, Dv]
        feats = self.projector(x)  # [T, P, D], per tile as the library does
        t, p = x.shape[:2]
        side = vc.image_size // vc.patch_size
        nph, npw = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, vc.image_size)

        def pack(v: Tensor, newline: Tensor | None) -> Tensor:
            out, _ = inner.pack_image_features([v], image_size[None], image_newline=newline,
                                               vision_aspect_ratio=cfg.vision_aspect_ratio)
            return out[0]

        packed = pack(feats, inner.image_newline)  # [S, D]: the stock LLM tokens
        vision = pack(x, None)  # [N, Dv]: the same layout on X, no newlines
        # stitched (row, col) of every X row (base: its own tile's), newline slots -> -1
        coords = pack(stitched_coords(t, p, side, npw, x.device), torch.full((2,), -1.0, dtype=torch.float64,
                                                                              device=x.device))
        is_nl = coords[:, 0] < -0.5
        features = packed[~is_nl]
        if features.shape[0] != vision.shape[0]:
            raise ValueError(f"{features.shape[0]} visual slots but {vision.shape[0]} packed rows")
        slot_src = torch.full((packed.shape[0],), -1, dtype=torch.long, device=x.device)
        slot_src[~is_nl] = torch.arange(vision.shape[0], device=x.device)

        h, w = (int(v) for v in image_size.tolist())
        scopes = coord_scopes(coords[~is_nl], p, side, nph, npw, (0.0, 0.0, float(w), float(h)),
                              self._tile_boxes(h, w, nph, npw))
        return Encoded(vision=vision, features=features, scopes=scopes, n_llm_visual=int(packed.shape[0]),
                       state={"slot_src": slot_src, "newline": inner.image_newline, "n_tiles": t,
                              "tile_grid": (nph, npw)})


def stitched_coords(t: int, p: int, side: int, npw: int, device) -> Tensor:
    """[t, p, 2] float64: the (row, col) every tile's patch has in the stitched grid of the anyres
    tiles (tile 0, the base image, its own grid's), to run through the library's packing."""
    k = torch.arange(t, device=device).view(t, 1)
    q = torch.arange(p, device=device).view(1, p)
    gi, gj = torch.div(k - 1, npw, rounding_mode="floor").clamp(min=0), (k - 1).clamp(min=0) % npw
    coords = torch.stack([(gi * side + q // side).expand(t, p), (gj * side + q % side).expand(t, p)], dim=-1)
    return coords.to(torch.float64)


def coord_scopes(cand: Tensor, n_base: int, side: int, nph: int, npw: int, image_box,
                 tile_boxes=None) -> list[Scope]:
    """LLaVA-OneVision's scopes from the candidates' stitched (row, col) ``cand`` [N, 2] (the base
    tile's ``n_base`` first, whole; fractional where anyres_max downsampled): "base", then "crop k"
    for the tile each candidate's floored coordinates fall in (none for a tile that only covered
    padding); cells are the coordinates within the tile. ``tile_boxes``: each crop's area in image
    pixels (None: the whole image's, for a caller that draws nothing)."""
    ry, rx = cand[:, 0].floor().long(), cand[:, 1].floor().long()
    crop = torch.zeros(cand.shape[0], dtype=torch.long, device=cand.device)
    crop[n_base:] = 1 + (ry[n_base:] // side).clamp(0, nph - 1) * npw + (rx[n_base:] // side).clamp(0, npw - 1)
    cells = torch.stack([ry % side, rx % side], dim=1)
    return scopes_by_tile(crop, cells, 1 + nph * npw, side, image_box, tile_boxes)


def _set_ids(config, tok) -> None:
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    config.video_token_id = tok.convert_tokens_to_ids("<video>")
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = None, tok.eos_token_id, tok.pad_token_id


def _set_generation_ids(gc, tok) -> None:
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = None, tok.eos_token_id, tok.pad_token_id


def tiny_config(tokenizer, second: bool = False, small: bool = False, vllm: bool = False):
    """tiny: SigLIP 56 px / patch 14 (4x4 tokens per tile), 2+2 layers, pinpoints up to 2x2 tiles
    (anyres_max_9 never downsamples there). ``second``: other sizes and anyres_max_1, so the stitched
    grid of any multi-tile image is bilinearly downsampled. ``vllm``: the tiny model with 2 LLM heads
    of 32 (vLLM's CPU attention takes head_dim >= 32) and, besides the small pinpoints, 3x6 / 6x3
    tiles, so a wide image (120x48 px) takes 3x6 tiles and anyres_max_9 downsamples its stitched grid
    (10x24 -> 7x18) while a tall one (44x110 px) takes 2x1 and does not: both layouts under vLLM's own
    anyres_max_9 (it ignores the config's ``vision_aspect_ratio``)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vocab = round_up(len(tokenizer), 64)
    if small:  # OneVision's tile geometry (384 px / patch 14: 27x27 per tile) with small-llava's towers
        vision = SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                    num_attention_heads=4, image_size=384, patch_size=14)
        text = Qwen2Config(hidden_size=512, intermediate_size=4096, num_hidden_layers=14, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=8192)
    elif second:
        vision = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=3, image_size=70, patch_size=14)
        text = Qwen2Config(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                           num_key_value_heads=3, vocab_size=vocab, max_position_embeddings=4096, initializer_range=0.3)
    else:
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=56, patch_size=14)
        heads = dict(num_attention_heads=2, num_key_value_heads=1) if vllm else \
            dict(num_attention_heads=4, num_key_value_heads=2)
        text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **heads,
                           vocab_size=vocab, max_position_embeddings=4096, initializer_range=0.3)
    s = vision.image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s], [s, 3 * s], [3 * s, s]]
    if vllm:
        pinpoints = pinpoints[:4] + [[3 * s, 6 * s], [6 * s, 3 * s]]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1" if second else "anyres_max_9", tie_word_embeddings=False,
        image_grid_pinpoints=pinpoints,
    )
    _set_ids(config, tokenizer)
    return config


def build_tiny(out_dir: Path, second: bool = False, small: bool = False, vllm: bool = False) -> None:
    """Write a tiny (or ``small``) random LLaVA-OneVision checkpoint (seed 0) and its processor to ``out_dir``."""
    tok = build_tokenizer()
    config = tiny_config(tok, second=second, small=small, vllm=vllm)
    torch.manual_seed(0)
    model = LlavaOnevisionAdapter.model_class()(config).eval()
    _set_generation_ids(model.generation_config, tok)
    processor = LlavaOnevisionAdapter.make_processor(config, tok)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    vc = config.vision_config
    for name in ("processor_config.json", "tokenizer_config.json"):  # name the stock class, like real checkpoints
        if (p := out_dir / name).is_file() and (cfg := json.loads(p.read_text())).get("processor_class"):
            cfg["processor_class"] = "LlavaOnevisionProcessor"
            if name == "processor_config.json":  # and its settings, which the stock processor (vLLM's) reads
                cfg.setdefault("num_image_tokens", (vc.image_size // vc.patch_size) ** 2)
                cfg.setdefault("vision_feature_select_strategy", config.vision_feature_select_strategy)
                cfg.setdefault("vision_aspect_ratio", config.vision_aspect_ratio)
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    s = vc.image_size  # the stock processor (vLLM's) loads a video processor too
    write_video_processor_config(out_dir, "LlavaOnevisionVideoProcessor",
                                 {"size": {"height": s, "width": s}, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD},
                                 "LlavaOnevisionProcessor")


def build_small(out_dir: Path) -> None:
    """``small-llava-onevision``: 384-px SigLIP tiles (729 tokens each), pinpoints up to 2x2 tiles (base +
    4 tiles = 3,645 tokens + newlines; anyres_max_9 never downsamples there), a ~100M Qwen2 LLM."""
    build_tiny(out_dir, small=True)


def build_vllm_tiny(out_dir: Path) -> None:
    """``vllm-tiny-llava-onevision``: tiny-llava-onevision with an LLM vLLM's CPU attention takes
    (head_dim 32) and large pinpoints where anyres_max_9 downsamples (``tiny_config``)."""
    build_tiny(out_dir, vllm=True)
