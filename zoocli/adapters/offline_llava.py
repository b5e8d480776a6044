"""The offline LLaVA models: random weights, real architectures, built locally (no download).

``tiny-llava`` / ``tiny-llava-next`` (56 px, 2+2 layers: the test models), ``small-llava`` (LLaVA-1.5
geometry, 576 tokens, a ~100M Llama) and ``small-llava-next`` (LLaVA-NeXT geometry, up to 2,880
tokens). Each ``build_*`` writes a checkpoint directory (``OFFLINE_MODELS`` in ``zoocli.adapters``
names them as "module:builder") and their configs; their tokenizer is ``llava.build_tokenizer``.
Answers are meaningless.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zoocli.adapters.llava import LlavaAdapter, LlavaNextAdapter, build_tokenizer
from zoocli.adapters.random_init import round_up


def tiny_llava_config(tokenizer, next_: bool = False, small: bool = False, vllm: bool = False):
    """Configs of the offline models. tiny: 56 px / patch 14 (4x4 tokens per tile), 2+2 layers;
    tiny NeXT: pinpoints up to 2x2 tiles so anyres gives several crops and unpadding;
    small: LLaVA-1.5 geometry (336 px -> 576 tokens), projector 256->512->512 and a ~100M Llama.
    ``vllm``: the tiny LLM with 2 heads of 32 (vLLM's CPU attention takes head_dim >= 32)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vocab = round_up(len(tokenizer), 64)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if small:
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                  num_attention_heads=4, image_size=336, patch_size=14, projection_dim=256)
        text = LlamaConfig(hidden_size=512, intermediate_size=4096, num_hidden_layers=14, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=4096, **ids)
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
        heads = dict(num_attention_heads=2, num_key_value_heads=1) if vllm else \
            dict(num_attention_heads=4, num_key_value_heads=2)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **heads,
                           vocab_size=vocab, max_position_embeddings=2048, **ids)
    common = dict(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    side = vision.image_size // vision.patch_size
    if next_:
        s = vision.image_size
        return LlavaNextConfig(**common, image_seq_length=side * side,
                               image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [s, 3 * s], [3 * s, s]])
    return LlavaConfig(**common, image_seq_length=side * side)


def _build(out_dir: Path, next_: bool, small: bool, vllm: bool = False) -> None:
    """Write an offline LLaVA (NeXT with ``next_``) checkpoint with random weights (seed 0) and
    its processor to ``out_dir``."""
    adapter_cls = LlavaNextAdapter if next_ else LlavaAdapter
    tok = build_tokenizer()
    config = tiny_llava_config(tok, next_=next_, small=small, vllm=vllm)
    torch.manual_seed(0)
    model = adapter_cls.model_class()(config).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    processor = adapter_cls.make_processor(config, tok)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    if vllm:
        legacy_tower_names(Path(out_dir) / "model.safetensors")


def legacy_tower_names(path: Path) -> None:
    """Rename the CLIP tower's tensors ``vision_tower.X`` -> ``vision_tower.vision_model.X`` in a
    safetensors file: the layout llava-hf's checkpoints have, which vLLM's LLaVA loader reads
    (transformers 5 saves the short form and reads both)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def build_tiny_llava(out_dir: Path) -> None:
    _build(Path(out_dir), next_=False, small=False)


def build_tiny_llava_next(out_dir: Path) -> None:
    _build(Path(out_dir), next_=True, small=False)


def build_small_llava(out_dir: Path) -> None:
    _build(Path(out_dir), next_=False, small=True)


def build_small_llava_next(out_dir: Path) -> None:
    """LLaVA-NeXT's real geometry with small-llava's small towers: 336-px tiles of 24x24 tokens
    (CLIP patch 14) and llava-v1.6's pinpoints (up to 2x2 tiles + the base image = 2,880 visual
    tokens), so budgets like 640/320/160 really prune."""
    _build(Path(out_dir), next_=True, small=True)


def build_vllm_tiny_llava(out_dir: Path) -> None:
    """``vllm-tiny-llava``: tiny-llava with an LLM vLLM's CPU attention takes (head_dim 32)."""
    _build(Path(out_dir), next_=False, small=False, vllm=True)


def build_vllm_tiny_llava_next(out_dir: Path) -> None:
    """``vllm-tiny-llava-next``: tiny-llava-next with an LLM vLLM's CPU attention takes (head_dim 32)."""
    _build(Path(out_dir), next_=True, small=False, vllm=True)
