"""Qwen2.5-VL adapter: ViT (window attention) -> 2x2 PatchMerger (the projector M) -> Qwen2 LLM with M-RoPE.

Candidates are the merged (2x2) visual tokens of each image in raster order, one per ``<|image_pad|>``.
``Encoded.vision`` holds X, the pre-merger ViT hidden states regrouped as one ``4*d_v`` row per merged
token (the merger's own ``.view(-1, 4*d_v)`` layout) and un-permuted from the ViT's window order back to
raster order, so ``projector(X) == get_image_features(...).pooler_output`` row for row.

Kept tokens are fed through ``inputs_embeds`` (works on every transformers >= 5.17; no
``mm_encoder_outputs``): the text ids are embedded, the unkept placeholders are dropped and the kept
merged embeddings fill the remaining placeholder slots. Positions are the *original* ones: M-RoPE is
computed by the model's ``get_rope_index`` on the unpruned ids and the kept columns are gathered, so a
kept image token keeps its (t, h, w) and the text after the image keeps its position.

``position_ids`` layout, ``[4, B, L]`` (L = pruned prompt length):
  row 0      text positions ``attention_mask.cumsum(-1) - 1`` (0 on padding): sequential over the pruned
             sequence; transformers uses it for masks (packed-sequence detection) and attention kernels, not RoPE
  rows 1..3  the M-RoPE (temporal, height, width) positions of the kept columns, from the unpruned ids
This is the layout transformers builds itself in ``_prepare_position_ids_for_generation``; ``generate``
extends every row by ``last + 1`` per new token, which is what the stock model does (text after the image
continues from max position + 1), so ``model.model.rope_deltas`` is never read (set anyway for consistency).

The processor is built without torchvision (``Qwen2_5_VLProcessor`` declares a video processor that
needs it): AutoTokenizer + AutoImageProcessor (-> ``Qwen2VLImageProcessorPil`` when torchvision is
absent) + ``Qwen2_5_VLProcessorNoVideo``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import ZooError
from ..text import user_text
from ..timing import TokenClock
from .base import Adapter, Encoded, Generation, LLMInputs, Prepared, Scope
from .prompt import prompt_batch, question_ids

# The official Qwen2-VL / Qwen2.5-VL chat template (chat_template.json of the Instruct checkpoints).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2 special tokens, in the real vocabulary's order (ids differ in the offline tokenizer).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# preprocessor_config.json of Qwen/Qwen2.5-VL-7B-Instruct (CLIP mean/std, 4..16384 merged tokens).
REAL_IMAGE_PROCESSOR = dict(
    min_pixels=3136,
    max_pixels=12845056,
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)

# Tiny model: a 4x6 merged-token grid for a 3:2 image (8x12 patches of 14 px = 112x168 px), 2 ViT windows.
TINY_IMAGE_PROCESSOR = dict(REAL_IMAGE_PROCESSOR, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 24)


@functools.cache
def processor_class() -> type:
    """``Qwen2_5_VLProcessorNoVideo``, defined on first use (importing transformers is slow)."""
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` without the video processor (which needs torchvision); images only.
        ``ProcessorMixin`` reads the sub-processors from this ``__init__`` signature."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
            )

    return Qwen2_5_VLProcessorNoVideo


def make_processor(tokenizer, image_processor, chat_template: str | None = None):
    """The Qwen2.5-VL processor (images only) from a tokenizer and an image processor."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or QWEN_CHAT_TEMPLATE
    return processor_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def chat_template_from_dir(path: Path) -> str | None:
    """The processor chat template saved in a checkpoint dir (``chat_template.jinja`` or ``.json``)."""
    if (p := path / "chat_template.jinja").is_file():
        return p.read_text()
    if (p := path / "chat_template.json").is_file():
        return json.loads(p.read_text()).get("chat_template")
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (p := path / name).is_file() and isinstance(t := json.loads(p.read_text()).get("chat_template"), str):
            return t
    return None


def load_processor(path: str | Path):
    """The processor of a saved Qwen2.5-VL dir without AutoProcessor (which needs torchvision here)."""
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:  # -> Qwen2VLImageProcessorPil without torchvision (5.18+)
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(path)
    except ImportError:  # 5.17: AutoImageProcessor itself needs torchvision
        from transformers import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return make_processor(tokenizer, image_processor, chat_template_from_dir(path))


def offline_tokenizer(vocab_size: int = 512):
    """A working byte-level tokenizer with the Qwen special tokens (ids are not the real ones)."""
    from .tokenizer import build_byte_tokenizer

    return build_byte_tokenizer(
        QWEN_SPECIAL_TOKENS,
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        vocab_size=vocab_size,
    )


def offline_processor(image_processor_kwargs: dict | None = None, vocab_size: int = 512):
    """The offline tokenizer + a PIL image processor configured like the real one (or as given)."""
    from transformers import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(**(image_processor_kwargs or REAL_IMAGE_PROCESSOR))
    return make_processor(offline_tokenizer(vocab_size), ip, QWEN_CHAT_TEMPLATE)


def special_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "endoftext": ids["<|endoftext|>"],
        "im_end": ids["<|im_end|>"],
    }


def set_token_ids(config, generation_config, tokenizer) -> None:
    """Make the model's special ids those of ``tokenizer`` (the offline tokenizer has its own ids)."""
    ids = special_ids(tokenizer)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, key, ids[key])
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = ids["endoftext"], ids["im_end"], ids["endoftext"]
    if len(tokenizer) > text.vocab_size:
        raise ZooError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {text.vocab_size}")
    if generation_config is not None:
        generation_config.bos_token_id = ids["endoftext"]
        generation_config.pad_token_id = ids["endoftext"]
        generation_config.eos_token_id = [ids["im_end"], ids["endoftext"]]


def rope_index(base_model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """``get_rope_index`` on the unpruned ids -> [3, B, L] M-RoPE positions (signature varies across v5)."""
    params = inspect.signature(base_model.get_rope_index).parameters
    kw: dict[str, Any] = {"image_grid_thw": inputs["image_grid_thw"], "attention_mask": inputs.get("attention_mask")}
    if "mm_token_type_ids" in params:
        mm = inputs.get("mm_token_type_ids")
        if mm is None:  # text 0, image 1
            mm = (inputs["input_ids"] == base_model.config.image_token_id).int()
        kw["mm_token_type_ids"] = mm
    pos, _ = base_model.get_rope_index(inputs["input_ids"], **kw)
    return pos


def _window_index(visual: nn.Module, grid_thw: Tensor) -> Tensor:
    """The ViT's window order of the merged tokens (the public function its forward uses)."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # older v5: a method of the vision model
        return visual.get_window_index(grid_thw)[0]
    merge, window, patch = visual.spatial_merge_size, visual.window_size, visual.patch_size
    return get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=window, patch_size=patch)[0]


class MergerProjector(nn.Module):
    """Qwen2.5-VL's PatchMerger as a row-wise projector: [..., 4*d_v] -> [..., D].

    The stock merger takes the ViT's [4n, d_v] patch rows (ln_q is an RMSNorm over each patch's d_v, then
    ``.view(-1, 4*d_v)`` and the MLP); one row of ``Encoded.vision`` is one merged token's four patches."""

    def __init__(self, merger: nn.Module, d_v: int | None = None):
        super().__init__()
        self.merger = merger  # shared weights: model.model.visual.merger
        self.d_v = merger.ln_q.weight.shape[0] if d_v is None else d_v  # patch width

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return self.merger(x.reshape(-1, self.d_v)).reshape(*lead, -1)  # [..., D]


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    # transformers' smart_resize (Qwen2-VL image processor) raises above 200:1
    max_aspect = 200.0
    aspect_reason = "transformers' smart_resize, which fits it to whole 28 px patches, refuses longer images"

    @classmethod
    def family_name(cls) -> str:
        return "Qwen2.5-VL"

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device, dtype, meaningless: bool = False, model_id: str | None = None):
        """A checkpoint dir (real or :func:`build_tiny`) -> adapter."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        device = torch.device(device)
        kw = {}
        if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            kw["device_map"] = str(device)  # load straight onto the device (needs accelerate)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True, **kw)
        return cls(model.to(device), load_processor(path), model_id or str(path), meaningless=meaningless)

    @classmethod
    def from_config(
        cls, config_dict: dict, device, dtype, processor_path: str | Path | None = None, model_id: str | None = None
    ):
        """Random weights at the size of ``config_dict`` (a config.json dict, flat hub or nested v5 form).

        The processor is loaded from ``processor_path`` (a dir with the real tokenizer / preprocessor
        files) if given; otherwise it is the offline tokenizer + the real image-processor settings, and
        the model's special token ids are set to the offline tokenizer's ids."""
        from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig.from_dict(copy.deepcopy(config_dict))
        processor = load_processor(processor_path) if processor_path else offline_processor()
        generation_config = GenerationConfig.from_model_config(config)
        if not processor_path:
            set_token_ids(config, generation_config, processor.tokenizer)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
        model.generation_config = generation_config
        return cls(model.to(device), processor, model_id or "qwen2.5-vl (random weights)", meaningless=True)

    # ---- the contract -----------------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        """``MergerProjector`` over ``model.model.visual.merger`` (ln_q per patch -> 4*d_v -> MLP)."""
        if getattr(self, "_projector", None) is None:
            self._projector = MergerProjector(self.model.model.visual.merger)
        return self._projector

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def prepare(self, image: Image.Image, question: str) -> Prepared:
        self.check_image(image.size)
        image = image.convert("RGB")
        question = user_text(question)  # undecodable bytes -> U+FFFD; token-like text stays text
        batch = prompt_batch(  # the question is tokenised as plain text (zoocli.adapters.prompt)
            self.processor,
            lambda text: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            question, lambda prompt: self.processor(text=[prompt], images=[image], return_tensors="pt"))
        self.check_context(int(batch["input_ids"].shape[1]))
        inputs = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, Tensor)}
        q_ids = question_ids(self.processor.tokenizer, question)
        return Prepared(image, question, inputs, torch.tensor(q_ids, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def encode(self, prepared: Prepared) -> Encoded:
        visual = self.model.model.visual
        grid = prepared.inputs["image_grid_thw"]  # [n_img, 3] (t, h, w) in patches
        merge = visual.spatial_merge_size
        captured: list[Tensor] = []
        hook = visual.merger.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
        try:  # the merger's input is the pre-merger hidden state, in window order, on every version
            visual(prepared.inputs["pixel_values"].to(visual.dtype), grid_thw=grid)
        finally:
            hook.remove()
        hidden = captured[0]  # [n_patches, d_v], window order
        window_index = _window_index(visual, grid).to(hidden.device)  # [N]
        x = hidden.reshape(-1, merge * merge * hidden.shape[-1])[torch.argsort(window_index)]  # [N, 4*d_v] raster
        features = self.projector(x)  # [N, D]

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
        return Encoded(x, features, scopes, n_llm_visual=n_pad, state={"grid_thw": grid, "window_index": window_index})

    def visual_positions(self, prepared: Prepared, encoded: Encoded) -> Tensor:
        """[N] positions of the candidates (the ``<|image_pad|>`` slots, raster order) in the unpruned
        LLM sequence, ascending."""
        return (prepared.inputs["input_ids"][0] == self.image_token_id).nonzero().squeeze(1)

    @torch.no_grad()
    def build_inputs(
        self, prepared: Prepared, encoded: Encoded, kept: Tensor, tokens: Tensor | None = None
    ) -> LLMInputs:
        ids, mask = prepared.inputs["input_ids"], prepared.inputs["attention_mask"]  # [B, L]
        kept = kept.to(ids.device, torch.long)
        order = torch.argsort(kept)
        kept = kept[order]
        feats = encoded.features[kept] if tokens is None else tokens[order.to(tokens.device)]  # [K, D]

        pos3 = rope_index(self.model.model, prepared.inputs)  # [3, B, L] unpruned M-RoPE positions
        is_img = ids == self.image_token_id  # [B, L]; placeholders in candidate (raster) order
        keep_col = ~is_img
        for b in range(ids.shape[0]):  # per row: the same candidates of that row's image(s)
            cols = is_img[b].nonzero().squeeze(1)  # [N]
            keep_col[b, cols[kept]] = True
        # equal kept counts per row give a rectangular result; different per-row K would need left padding
        n_keep = keep_col.sum(1)
        if not bool((n_keep == n_keep[0]).all()):
            raise ZooError("rows of a batch keep different numbers of tokens")
        B, L = ids.shape[0], int(n_keep[0])
        ids_k = ids[keep_col].view(B, L)
        mask_k = mask[keep_col].view(B, L)
        pos3_k = pos3[:, keep_col].view(3, B, L)

        embeds = self.model.get_input_embeddings()(ids_k)  # [B, L, D]
        slots = ids_k == self.image_token_id  # [B, L], K per row
        embeds[slots] = feats.repeat(B, 1).to(embeds.device, embeds.dtype)
        text_row = (mask_k.long().cumsum(-1) - 1).masked_fill(mask_k == 0, 0)  # [B, L]
        # position_ids [4, B, L]: row 0 = text positions (mask building), rows 1-3 = original (t, h, w)
        position_ids = torch.cat([text_row[None], pos3_k], dim=0)
        return LLMInputs(embeds, mask_k, position_ids, n_visual=int(kept.numel()))

    @torch.no_grad()
    def generate(self, inputs: LLMInputs, max_new_tokens: int) -> Generation:
        return self.generate_batch(inputs, max_new_tokens)[0]

    @torch.no_grad()
    def generate_batch(self, inputs: LLMInputs, max_new_tokens: int) -> list[Generation]:
        """Pure greedy decoding (``decoder.greedy_config``: of the checkpoint's generation config only the token ids)."""
        from transformers import LogitsProcessorList

        from zoocli.adapters.decoder import greedy_config

        gc = greedy_config(self.model.generation_config, max_new_tokens)

        pos, mask = inputs.position_ids, inputs.attention_mask
        if pos is not None:
            # What transformers' own path would cache; only used when position_ids are not passed.
            self.model.model.rope_deltas = pos[1:].amax(dim=(0, 2))[:, None] + 1 - mask.sum(-1, keepdim=True)
        clock = TokenClock(self.device)
        clock.start()
        out = self.model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=mask,
            position_ids=pos,
            generation_config=gc,
            logits_processor=LogitsProcessorList([clock]),
        )
        # with inputs_embeds and no input_ids, generate returns the new tokens only
        gens = []
        for row in out.tolist():
            ids = self.answer_ids(row, gc.pad_token_id)
            gens.append(Generation(ids, self.decode(ids), clock.prefill_ms, clock.decode_ms))
        return gens


def tiny_config(tokenizer, vllm: bool = False) -> dict:
    """A tiny Qwen2.5-VL config dict whose special ids are ``tokenizer``'s (nested v5 form).
    ``vllm``: 2 LLM heads of 32 (vLLM's CPU attention takes head_dim >= 32)."""
    ids = special_ids(tokenizer)
    vocab = -(-max(len(tokenizer), 512) // 64) * 64
    return dict(
        model_type="qwen2_5_vl",
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,  # 4x4 merged tokens per window
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
            tokens_per_second=2,
            initializer_range=0.3,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2 if vllm else 4,  # head_dim 32 / 16 -> mrope_section sums to 16 / 8
            num_key_value_heads=1 if vllm else 2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [4, 6, 6] if vllm else [2, 3, 3]},
            bos_token_id=ids["endoftext"],
            eos_token_id=ids["im_end"],
            pad_token_id=ids["endoftext"],
            initializer_range=0.3,  # large enough that answers depend on positions and kept tokens
        ),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )


def build_tiny(out_dir: Path, vllm: bool = False) -> None:
    """Write a tiny random Qwen2.5-VL checkpoint dir (model + processor + chat template + the video
    processor's config, so the stock ``AutoProcessor`` and vLLM load it), seed 0."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    processor = offline_processor(TINY_IMAGE_PROCESSOR)
    config = Qwen2_5_VLConfig.from_dict(tiny_config(processor.tokenizer, vllm=vllm))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    ids = special_ids(processor.tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["endoftext"], pad_token_id=ids["endoftext"], eos_token_id=[ids["im_end"], ids["endoftext"]]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    for name in ("processor_config.json", "tokenizer_config.json"):  # name the stock class, like real checkpoints
        if (p := out_dir / name).is_file() and (cfg := json.loads(p.read_text())).get("processor_class"):
            cfg["processor_class"] = "Qwen2_5_VLProcessor"
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_video_processor_config(out_dir, "Qwen2VLVideoProcessor", TINY_IMAGE_PROCESSOR, "Qwen2_5_VLProcessor")


def build_vllm_tiny(out_dir: Path) -> None:
    """``vllm-tiny-qwen2.5-vl``: tiny-qwen2.5-vl with an LLM vLLM's CPU attention takes (head_dim 32)."""
    build_tiny(out_dir, vllm=True)


def write_video_processor_config(out_dir: Path, video_class: str, image_kwargs: dict, processor_class: str) -> None:
    """``video_preprocessor_config.json``: the video processor the stock Qwen / OneVision processors load (the
    image processor's geometry; zoo prunes images only). Written as JSON: instantiating a video
    processor needs torchvision, which zoo does not install."""
    cfg = {k: image_kwargs[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                        "size") if k in image_kwargs}
    cfg.update(video_processor_type=video_class, processor_class=processor_class)
    if "min_pixels" in image_kwargs:
        cfg["size"] = {"shortest_edge": image_kwargs["min_pixels"], "longest_edge": image_kwargs["max_pixels"]}
    (Path(out_dir) / "video_preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
