"""The demo model: a small LLaVA-1.5-architecture checkpoint (transformers' ``LlavaForConditionalGeneration``:
CLIP vision tower -> Linear-GELU-Linear projector -> Llama) for the synthetic world of ``world.py``.

Geometry: 336 px images, patch 28 -> 12 x 12 = 144 visual tokens. The features are the vision
tower's last layer (``vision_feature_layer=-1``, CLS dropped): LLaVA-1.5 takes the second-to-last
layer of a pretrained CLIP; a tower trained from scratch for this has no reason to waste a layer.
The tokenizer and processor are the offline ones of ``zoocli.adapters.llava`` (called, not copied),
so the checkpoint loads through ``LlavaAdapter.load`` like any llava-hf checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zoocli.adapters.random_init import round_up

IMAGE_SIZE, PATCH = 336, 28
GRID = IMAGE_SIZE // PATCH  # 12
SIZES = dict(vision_hidden=128, vision_layers=2, vision_heads=4, vision_mlp=256,
             text_hidden=128, text_layers=2, text_heads=4, text_mlp=256)


def shipped_dir() -> Path:
    """Where the trained checkpoint ships inside the package."""
    return Path(__file__).resolve().parent.parent / "data" / "demo-llava"


def demo_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = SIZES
    vision = CLIPVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=s["vision_mlp"],
                              num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=s["vision_hidden"])
    text = LlamaConfig(hidden_size=s["text_hidden"], intermediate_size=s["text_mlp"],
                       num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                       num_key_value_heads=s["text_heads"], vocab_size=round_up(len(tokenizer), 64),
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       image_seq_length=GRID * GRID)


def new_model(seed: int):
    """(model, processor): randomly initialised with ``seed``, float32."""
    from zoocli.adapters.llava import LlavaAdapter, build_tokenizer

    tok = build_tokenizer()
    add_world_words(tok)
    config = demo_config(tok)
    torch.manual_seed(seed)
    model = LlavaAdapter.model_class()(config)
    init_positions(model)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model, LlavaAdapter.make_processor(config, tok)


def init_positions(model) -> None:
    """Start the vision tower's patch position embeddings as a 2-D sine-cosine table (a quarter of
    the channels each for sin/cos of the row and of the column, as in MAE), at the scale of the
    patch embeddings. CLIP's default (normal, std 0.02) is ~50x smaller than what the patch
    embedding of a 28 x 28 x 3 patch puts out; after the pre-LayerNorm the tower then cannot tell
    where a patch is, and in a probe it did not learn a patch's column or an object's side of the
    midline in 600 steps (with this start: 84% after 150). Trained like any other weight."""
    pe = model.model.vision_tower.embeddings.position_embedding.weight
    d = pe.shape[1] // 4
    freq = 1.0 / (100.0 ** (torch.arange(d, dtype=torch.float32) / d))
    rows, cols = torch.meshgrid(torch.arange(GRID, dtype=torch.float32), torch.arange(GRID, dtype=torch.float32),
                                indexing="ij")
    fy, fx = rows.reshape(-1, 1) * freq, cols.reshape(-1, 1) * freq
    with torch.no_grad():
        pe[1:] = torch.cat([fy.sin(), fy.cos(), fx.sin(), fx.cos()], dim=1)  # row 0 is the CLS position


def add_world_words(tokenizer) -> None:
    """Give the world's words one id each in the demo tokenizer (built here, saved with the
    checkpoint): every answer is then one token + ``</s>`` (the in-process BPE splits e.g. ``yellow``
    into five pieces), and the questions get ~2x shorter. Answers follow ``ASSISTANT:`` with no
    space, so the answer words are added bare; in questions they follow a space, so they are added
    with it (``" circle"``; the longest match wins, so ``" circles"`` is one id too)."""
    from tokenizers import AddedToken

    from zoocli.demo import world

    answers = [*world.COLORS, "left", "right"]
    nouns = [*world.KINDS, *(k + "s" for k in world.KINDS)]
    spaced = [" " + w for w in [*answers, *nouns, "color"]] + ["How"]
    tokenizer.add_tokens([AddedToken(w, normalized=False) for w in answers + spaced])


def load(path: Path):
    """(model, processor) of a checkpoint written by ``save``, float32."""
    from transformers import AutoProcessor

    from zoocli.adapters.llava import LlavaAdapter

    model = LlavaAdapter.model_class().from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    return model, AutoProcessor.from_pretrained(str(path))


def save(model, processor, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def pixel_values(images) -> Tensor:
    """The processor's pixel values for 336 x 336 RGB images, computed directly: the processor's
    resize and centre crop are identities at this size, so this is rescale + CLIP normalise
    (``tests/test_demo_model.py`` checks it against the processor). Each output value depends only
    on its byte and channel, so it is looked up in a [3, 256] table computed with the same float32
    operations (the same bits; ~3x faster than computing it per pixel, once per training step)."""
    u8 = np.stack([np.asarray(im) for im in images])  # [B, H, W, 3] uint8
    table = _normalise_table()
    return torch.from_numpy(np.stack([table[c][u8[..., c]] for c in range(3)], axis=1))  # [B, 3, H, W]


@functools.cache
def _normalise_table() -> np.ndarray:
    """[3, 256]: (byte / 255 - CLIP mean) / CLIP std per channel, in float32."""
    from zoocli.adapters.llava import CLIP_MEAN, CLIP_STD

    mean, std = np.asarray(CLIP_MEAN, dtype=np.float32), np.asarray(CLIP_STD, dtype=np.float32)
    return (np.arange(256, dtype=np.float32)[None, :] / 255.0 - mean[:, None]) / std[:, None]


def visual_features(model, pv: Tensor) -> Tensor:
    """[B, 144, D]: the projected visual tokens, the same calls as the adapter's ``encode``."""
    cfg = model.config
    hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
    x = hs[cfg.vision_feature_layer][:, 1:]
    return model.model.multi_modal_projector(x)

