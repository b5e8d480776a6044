"""zoo's vLLM model classes: vLLM's own LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision / Qwen2.5-VL /
Qwen3-VL (and Qwen3-VL-MoE) classes, subclassed so that each image keeps only the tokens zoo's
method picks.

How a request flows:
1. The processor (API-server side) reads the engine's defaults (``hf_overrides`` -> config ``zoo``)
   and the request's ``zoo_*`` ``mm_processor_kwargs`` (``settings``), calls the HF processor
   without them, emits each image's *kept* count of placeholders, and attaches the settings to each
   image as a fixed-size byte field ``zoo_settings`` (so they reach the model, and are part of
   the image's cache hash through ``mm_processor_kwargs``).
2. The model (worker side) runs vLLM's vision tower, takes the pre-projector tokens X (LLaVA: the
   tower's selected layer; Qwen: the merger's input, window order undone) and the projected
   tokens Z (LLaVA-NeXT / OneVision: per tile, then vLLM's own merge gives the LLM rows and, run on
   indices / coordinates, which slot is a newline and which tile a candidate sits in), and runs
   zoo's own selection (``zoocli.pipeline.select_encoded``: ``token_sensitivity``,
   the greedy, the fused Triton kernel on CUDA) with the projector rebuilt as transformers' own
   module from the checkpoint's tensors, as zoo's HF path has it, over the same candidates and
   scopes as zoo's adapters (NeXT / OneVision: the live patch rows in slot order, scopes "base" and
   "crop k", the budget split per crop unless ``budget_scope`` is ``global``). It returns Z at the
   kept rows, ascending (NeXT / OneVision: and every newline slot, in place).
3. Qwen (M-RoPE): each kept row carries its original 3-D position and the unpruned text offset
   (``workarounds.media_positions``); the runner strips them and moves the text after the image to
   where it is unpruned. Qwen3-VL's deepstack rows are the same rows (vLLM concatenates them to the
   main features), so the same kept set prunes them.

Videos pass unpruned on Qwen2.5-VL (with vLLM's EVS if the engine asks for it) and LLaVA-OneVision
(vLLM's own pooled rows); Qwen3-VL videos are refused while zoo's plugin serves (their timestamp
layout is not handled yet).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from zoocli.adapters.base import Encoded, Scope
from zoocli.integrations.vllm import workarounds
from zoocli.integrations.vllm.settings import ZooSettings, engine_settings, request_settings, strip_request_keys

SETTINGS_FIELD = "zoo_settings"


# ----------------------------------------------------------------------------------------------
# shared pieces


class Selector:
    """What a zoo model holds for selection: the engine's default settings, the projector's
    checkpoint tensors, and transformers' projector module rebuilt from them on first use."""

    def __init__(self, vllm_config, marker: str, build_projector):
        cfg = vllm_config.model_config.hf_config
        self.default, allow = engine_settings(getattr(cfg, "zoo", None))
        workarounds.check_version(allow)
        self.kept = workarounds.KeptWeights(marker)
        self.build_projector = build_projector  # (hf_config, tensors, dtype) -> nn.Module
        self.config = cfg
        self.dtype = vllm_config.model_config.dtype
        self._projector: nn.Module | None = None
        self.history: deque[list[int]] = deque(maxlen=256)  # the last images' kept rows (``LLM.apply_model``)

    def projector(self, device) -> nn.Module:
        if self._projector is None:
            with torch.inference_mode(False):
                self._projector = self.build_projector(self.config, self.kept.tensors).to(device, self.dtype).eval()
        return self._projector

    def kept_rows(self, spec, x: Tensor, z: Tensor, scopes: list[Scope]) -> Tensor:
        """Ascending kept rows of one image: ``x`` [N, Dv] pre-projector, ``z`` [N, D] projected."""
        settings = ZooSettings.from_bytes(spec)
        n = z.shape[0]
        keep = settings.keep_for(n)
        if keep >= n:
            kept = torch.arange(n, device=z.device)
        else:
            name, options = settings.method_name_options()
            kept = _select(name, options, settings, keep, x, z, scopes, self.projector(z.device))
        self.history.append(kept.tolist())
        return kept


@workarounds.normal_mode
def _select(name, options, settings, keep, x, z, scopes, projector) -> Tensor:
    from zoocli.pipeline import select_encoded

    enc = Encoded(vision=x, features=z, scopes=scopes, n_llm_visual=z.shape[0])
    return select_encoded(name, enc, keep, projector=projector, scope=settings.budget_scope,
                          seed=settings.seed, options=options).kept


def grid_scope(rows: int, cols: int, device) -> list[Scope]:
    """One scope laid out as a rows x cols grid (LLaVA-1.5's patches, one Qwen image's merged tokens)."""
    idx = torch.arange(rows * cols, device=device)
    cells = torch.stack([idx // cols, idx % cols], dim=1)
    return [Scope("image", idx, (rows, cols), cells, (0.0, 0.0, float(cols), float(rows)))]


def settings_rows(specs, n: int) -> list:
    """The per-image ``zoo_settings`` field as a list of n byte rows (None: not given)."""
    if specs is None:
        return [None] * n
    rows = list(specs.unbind(0)) if isinstance(specs, Tensor) else list(specs)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} zoo settings rows for {n} images")
    return rows


class ProcessorMixin:
    """The processor side, shared by every family: settings in, HF processor called without them,
    the settings attached per image, the kept count emitted per image."""

    def zoo_settings(self, mm_kwargs: Mapping[str, Any]) -> ZooSettings:
        default, _ = engine_settings(getattr(self.info.get_hf_config(), "zoo", None))
        return request_settings(default, mm_kwargs)

    zoo_takes_videos = True

    def zoo_image_count(self, out) -> int:
        """The images the HF processor returned (LLaVA: one ``pixel_values`` entry each)."""
        pv = out.get("pixel_values")
        return 0 if pv is None else len(pv)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        settings = self.zoo_settings(hf_kwargs)
        if not self.zoo_takes_videos and mm_items.get_count("video", strict=False):
            raise ValueError("zoo's vLLM plugin does not take videos on this model (their timestamp layout "
                             "is not handled): send images, or serve the stock model")
        out = super()._apply_hf_processor_main(mm_items, strip_request_keys(hf_kwargs))
        n = self.zoo_image_count(out)
        if n:
            out[SETTINGS_FIELD] = torch.tensor([settings.to_bytes()] * n, dtype=torch.uint8)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, strip_request_keys(hf_processor_mm_kwargs)))
        fields[SETTINGS_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        """The stock updates, each image's placeholders cut to its kept count (the stock count is
        the image's candidate count: LLaVA's patches, Qwen's merged tokens)."""
        settings = self.zoo_settings(hf_processor_mm_kwargs)
        updates = super()._get_prompt_updates(mm_items, strip_request_keys(hf_processor_mm_kwargs), out_mm_kwargs)

        def image_replacement(item_idx: int, stock):
            ids = list(stock(item_idx) if callable(stock) else stock)
            item = out_mm_kwargs["image"][item_idx]
            if SETTINGS_FIELD not in item:  # embeddings given: nothing to prune
                return ids
            return ids[:self.zoo_kept_count(item, len(ids), settings)]

        return [PromptReplacement(modality="image", target=u.target,
                                  replacement=partial(image_replacement, stock=u.replacement))
                if u.modality == "image" else u for u in updates]

    def zoo_kept_count(self, item, n_stock: int, settings: ZooSettings) -> int:
        """The placeholders one image keeps: here every stock placeholder is a candidate."""
        return settings.keep_for(n_stock)


def _rename_clip(weights: Iterable[tuple[str, Tensor]]):
    """transformers 5 saves LLaVA's CLIP / SigLIP tower as ``vision_tower.<module>``; vLLM's tower
    reads ``vision_tower.vision_model.<module>`` (the older layout, which real llava-hf checkpoints have)."""
    for name, tensor in weights:
        for head in ("vision_tower.", "model.vision_tower."):
            if name.startswith(head) and not name[len(head):].startswith("vision_model."):
                name = head + "vision_model." + name[len(head):]
                break
        yield name, tensor


# ----------------------------------------------------------------------------------------------
# LLaVA-1.5


class ZooLlavaMultiModalProcessor(ProcessorMixin, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(ZooLlavaMultiModalProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class ZooLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 keeping zoo's picks of each image's patch tokens (one scope, the patch grid)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.zoo = Selector(vllm_config, "multi_modal_projector.", _projector(
            "transformers.models.llava.modeling_llava:LlavaMultiModalProjector"))

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return super().load_weights(self.zoo.kept.watch(_rename_clip(weights)))

    def embed_multimodal(self, **kwargs: object):
        specs = kwargs.pop(SETTINGS_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values" or specs is None:
            return self._process_image_input(image_input)
        x = self._process_image_pixels(image_input)  # [B, P, Dv] (or per-image tuple)
        xs = list(x.unbind(0)) if isinstance(x, Tensor) else list(x)
        out = []
        for xi, spec in zip(xs, settings_rows(specs, len(xs))):
            z = self.multi_modal_projector(xi)  # [P, D]
            side = int(round(xi.shape[0] ** 0.5))
            rows, cols = (side, side) if side * side == xi.shape[0] else (1, xi.shape[0])
            out.append(z[self.zoo.kept_rows(spec, xi, z, grid_scope(rows, cols, z.device))])
        return out


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT and LLaVA-OneVision (anyres: a base tile, then the image's tiles stitched into one
# grid, unpadded, a newline slot after every stitched row)


def anyres_counts(info, height: int, width: int) -> tuple[int, int]:
    """(candidates, newline slots) of one ``height`` x ``width`` image, from vLLM's own processing
    info (the stock placeholder count is their sum): the base tile's tokens plus the unpadded
    stitched grid's (OneVision: after anyres_max_9's downsampling), and one newline per stitched row."""
    cfg = info.get_hf_config()
    enc = info.get_vision_encoder_info()
    base = get_num_selected_vision_tokens(enc.get_num_image_tokens(image_width=width, image_height=height),
                                          cfg.vision_feature_select_strategy)
    nph, npw = get_anyres_image_grid_shape((height, width), cfg.image_grid_pinpoints, enc.get_image_size())
    unpadded, newlines = info._get_num_unpadded_features(
        original_height=height, original_width=width, npatches=enc.get_patch_grid_length(),
        num_patch_height=nph, num_patch_width=npw)
    return base + unpadded, newlines


class AnyresProcessorMixin(ProcessorMixin):
    """Each image's placeholders: its kept candidates plus every newline slot."""

    def zoo_kept_count(self, item, n_stock: int, settings: ZooSettings) -> int:
        height, width = (int(v) for v in item["image_sizes"].data.tolist())
        n, newlines = anyres_counts(self.info, height, width)
        if n + newlines != n_stock:
            raise RuntimeError(f"{n} candidates + {newlines} newlines, but {n_stock} stock placeholders "
                               f"for a {width}x{height} image")
        return settings.keep_for(n) + newlines


class ZooAnyresMixin:
    """The model side of zoo's LLaVA-NeXT / OneVision. Per image: the tiles through vLLM's tower
    (X, pre-projector) and projector (Z), the stock LLM rows from vLLM's own merge of Z, the slot
    layout from the same merge run on tile-row indices / stitched coordinates (``zoo_layout``),
    zoo's selection over the candidates (the non-newline slots, in slot order) with scopes "base",
    "crop k" as zoo's adapters have them, and the LLM rows at the kept candidates and every newline."""

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return super().load_weights(self.zoo.kept.watch(_rename_clip(weights)))

    def _zoo_images(self, image_input, specs) -> list[Tensor]:
        sizes = image_input.get("image_sizes") if image_input["type"] == "pixel_values" else None
        if sizes is None or specs is None:  # embeddings given, or no sizes: the stock rows
            return list(self._process_image_input(image_input))
        pv = image_input["pixel_values"]
        per_image = list(pv.unbind(0)) if isinstance(pv, Tensor) else list(pv)
        xs = self._image_pixels_to_features(self.vision_tower, torch.cat(per_image))
        out = []
        for x, size, spec in zip(xs.split([len(v) for v in per_image]), sizes,
                                 settings_rows(specs, len(per_image))):
            z = self.multi_modal_projector(x)  # [T, P, D]
            merged, cand_slot, vision, scopes = self.zoo_layout(size, x, z)
            kept = self.zoo.kept_rows(spec, vision, merged[cand_slot], scopes)
            keep_slot = torch.ones(merged.shape[0], dtype=torch.bool, device=merged.device)
            keep_slot[cand_slot] = False
            keep_slot[cand_slot[kept.to(cand_slot.device)]] = True
            out.append(merged[keep_slot])
        return out

    def _zoo_grid(self, size) -> tuple[int, int, int]:
        """(tokens per tile side, stitched tile rows, tile cols) of an image of ``size`` (H, W)."""
        vc = self.config.vision_config
        nph, npw = get_anyres_image_grid_shape(tuple(int(v) for v in size.tolist()),
                                               self.config.image_grid_pinpoints, vc.image_size)
        return vc.image_size // vc.patch_size, nph, npw


def _projector(path: str):
    """Build transformers' projector class ``module:Class`` for a config from checkpoint tensors."""

    def build(config, tensors: dict[str, Tensor]) -> nn.Module:
        import importlib

        module, name = path.split(":")
        proj = getattr(importlib.import_module(module), name)(config)
        proj.load_state_dict(tensors)
        return proj

    return build


class ZooLlavaNextMultiModalProcessor(AnyresProcessorMixin, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(ZooLlavaNextMultiModalProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class ZooLlavaNextForConditionalGeneration(ZooAnyresMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT keeping zoo's picks among each image's live patch rows (newlines kept)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.zoo = Selector(vllm_config, "multi_modal_projector.", _projector(
            "transformers.models.llava_next.modeling_llava_next:LlavaNextMultiModalProjector"))

    def embed_multimodal(self, **kwargs: object):
        specs = kwargs.pop(SETTINGS_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        return self._zoo_images(image_input, specs)

    def zoo_layout(self, size, x: Tensor, z: Tensor):
        """NeXT's merge is a gather (reshape, unpad) plus newlines: it is run on the tile-row index
        + 1 and on its negative, so a slot where both agree is a newline, any other holds that row."""
        from zoocli.adapters.llava import tile_scopes

        t, p = x.shape[:2]
        merged = self._merge_image_patch_embeddings(size, z, strategy="spatial_unpad")
        index = torch.zeros(t, p, z.shape[-1], dtype=torch.float32, device=z.device)
        index[..., 0] = torch.arange(1, t * p + 1, dtype=torch.float32, device=z.device).view(t, p)
        a = self._merge_image_patch_embeddings(size, index, strategy="spatial_unpad")
        b = self._merge_image_patch_embeddings(size, -index, strategy="spatial_unpad")
        cand_slot = (a != b).any(dim=1).nonzero().squeeze(1)
        rows = a[cand_slot, 0].round().long() - 1  # X row (tile * p + patch) of each candidate
        side, _, _ = self._zoo_grid(size)
        scopes = tile_scopes(rows, t, p, side, (0.0, 0.0, 0.0, 0.0))
        return merged, cand_slot, x.reshape(t * p, -1)[rows], scopes


class ZooLlavaOnevisionMultiModalProcessor(AnyresProcessorMixin, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(ZooLlavaOnevisionMultiModalProcessor, info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class ZooLlavaOnevisionForConditionalGeneration(ZooAnyresMixin, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision keeping zoo's picks among each image's slots other than the newlines
    (where anyres_max_9 downsamples, a candidate is a bilinear mix, as in zoo's adapter). Videos
    pass unpruned."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        workarounds.check_onevision_aspect(self.config)
        self.zoo = Selector(vllm_config, "multi_modal_projector.", _projector(
            "transformers.models.llava_onevision.modeling_llava_onevision:LlavaOnevisionMultiModalProjector"))

    def embed_multimodal(self, **kwargs: object):
        specs = kwargs.pop(SETTINGS_FIELD, None)
        out: list[Tensor] = []
        for modality, mm_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                out.extend(self._zoo_images(mm_input, specs))
            elif modality == "video":  # unpruned, vLLM's own rows
                out.extend(self._process_video_pixels(mm_input))
        return tuple(out)

    def zoo_layout(self, size, x: Tensor, z: Tensor):
        """As zoo's adapter: vLLM's merge run on Z (the stock rows), on X without newlines (the
        candidates' pre-projector rows, mixed as Z's where downsampled) and on the stitched (row,
        col) of every patch with a (-1, -1) newline (which slot is a newline, which crop a candidate
        sits in)."""
        from zoocli.adapters.llava_onevision import coord_scopes, stitched_coords

        t, p = x.shape[:2]
        side, nph, npw = self._zoo_grid(size)
        merge = partial(self._merge_image_patch_embeddings, size, strategy="spatial_unpad")
        merged = merge(z, image_newline=self.image_newline)
        vision = merge(x, image_newline=None)
        marker = torch.full((2,), -1.0, dtype=torch.float64, device=x.device)
        coords = merge(stitched_coords(t, p, side, npw, x.device), image_newline=marker)
        cand_slot = (coords[:, 0] > -0.5).nonzero().squeeze(1)
        if cand_slot.numel() != vision.shape[0] or coords.shape[0] != merged.shape[0]:
            raise RuntimeError(f"{cand_slot.numel()} candidate slots, {vision.shape[0]} packed X rows, "
                               f"{merged.shape[0]} LLM rows")
        scopes = coord_scopes(coords[cand_slot], p, side, nph, npw, (0.0, 0.0, 0.0, 0.0))
        return merged, cand_slot, vision, scopes


# ----------------------------------------------------------------------------------------------
# Qwen2.5-VL and Qwen3-VL


def _qwen25_projector(config, tensors: dict[str, Tensor]) -> nn.Module:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    from zoocli.adapters.qwen2_5_vl import MergerProjector

    vc = config.vision_config
    merger = Qwen2_5_VLPatchMerger(dim=vc.out_hidden_size, context_dim=vc.hidden_size,
                                   spatial_merge_size=vc.spatial_merge_size)
    merger.load_state_dict(tensors)
    return MergerProjector(merger)


def _qwen3_projector(config, tensors: dict[str, Tensor]) -> nn.Module:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    from zoocli.adapters.qwen3_vl import MergerProjector

    merger = Qwen3VLVisionPatchMerger(config.vision_config, use_postshuffle_norm=False)
    merger.load_state_dict(tensors)
    return MergerProjector(merger)


class QwenProcessorMixin(ProcessorMixin):
    def zoo_image_count(self, out) -> int:
        grid = out.get("image_grid_thw")
        return 0 if grid is None else len(grid)


class ZooQwenMixin:
    """The model side of zoo's Qwen classes: the merger's input captured, zoo's rows kept, every
    media item's positions appended for the runner's M-RoPE recompute."""

    zoo_mrope_recompute = True  # read by workarounds.mrope_recompute_switch
    zoo_window_order = True  # Qwen2.5-VL's ViT runs in window order; Qwen3-VL's does not

    def _zoo_init(self, vllm_config, build_projector) -> None:
        self.zoo = Selector(vllm_config, "visual.merger.", build_projector)
        self._zoo_merger_inputs: list[Tensor] = []
        workarounds.capture_input(self.visual.merger, self._zoo_merger_inputs)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return super().load_weights(self.zoo.kept.watch(weights))

    def get_encoder_cudagraph_config(self):
        """Encoder CUDA graphs off for every modality: their path bypasses ``embed_multimodal``,
        where zoo selects (stock vLLM switches them off the same way when EVS is on)."""
        import dataclasses

        return dataclasses.replace(super().get_encoder_cudagraph_config(), modalities=[])

    def _zoo_images(self, image_input, specs) -> list[Tensor]:
        grid = image_input["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        self._zoo_merger_inputs.clear()
        embeds = self._process_image_input(image_input)  # per image [N_i, D(+deepstack)], raster order
        rows_spec = settings_rows(specs, len(embeds))
        out = []
        if image_input["type"] != "pixel_values" or specs is None:
            x_all = None
        else:
            if len(self._zoo_merger_inputs) != 1:
                raise RuntimeError(f"the merger ran {len(self._zoo_merger_inputs)} times for one image batch")
            hidden = self._zoo_merger_inputs.pop()
            d_v = hidden.shape[-1]
            x_all = hidden.reshape(-1, merge * merge * d_v)  # [sum N, 4*Dv]
            if self.zoo_window_order:  # undo the ViT's window order, as the merger's output is
                meta = self.visual.prepare_encoder_metadata(grid.tolist())
                x_all = x_all[meta["reverse_indices"].to(x_all.device)]
        start = 0
        for emb, (t, h, w), spec in zip(embeds, grid.tolist(), rows_spec):
            pos = workarounds.media_positions((t, h, w), merge).to(emb.device, emb.dtype)
            if x_all is None or spec is None:
                kept = torch.arange(emb.shape[0], device=emb.device)
            else:
                x = x_all[start:start + emb.shape[0]]
                z = emb[:, :self.zoo_visual_dim]
                kept = self.zoo.kept_rows(spec, x, z, grid_scope(h // merge, w // merge, z.device))
            start += emb.shape[0]
            out.append(torch.cat([emb[kept], pos[kept.to(pos.device)]], dim=1))
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        """The request's M-RoPE positions before encoding, for a prompt whose images hold only their
        kept placeholders: text continues after each media item where it would unpruned (1 + the
        media's largest position), so it is right even when the image's tokens come from the
        prefix cache; an unpruned item's tokens get their grid positions, a pruned item's are
        placeholders until ``recompute_mrope_positions`` writes the kept tokens' own."""
        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        parts, st, next_pos = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = feature.mm_position.offset, feature.mm_position.length
            key = "image_grid_thw" if feature.modality == "image" else "video_grid_thw"
            t, h, w = (int(v) for v in feature.data[key].data.tolist())
            factor = 1.0
            if feature.modality == "video" and (sec := feature.data.get("second_per_grid_ts")) is not None:
                factor = float(sec.data.item()) * tokens_per_second
            parts.append(torch.arange(offset - st).expand(3, -1) + next_pos)  # text before
            base = next_pos + offset - st
            full = workarounds.media_positions((t, h, w), merge, factor)  # [T*H*W, 4]
            if length == full.shape[0]:
                parts.append(full[:, :3].T + base)
            else:
                parts.append(torch.full((3, length), base, dtype=torch.long))
            next_pos, st = base + int(full[0, 3]), offset + length
        parts.append(torch.arange(len(input_tokens) - st).expand(3, -1) + next_pos)
        positions = torch.cat(parts, dim=1).long()
        return positions, int(positions.max()) + 1 - len(input_tokens) if positions.numel() else 0

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[Tensor], mrope_positions,
                                  num_computed_tokens: int):
        """The runner's hook (on once zoo's models load): every media item carries 4 position
        columns (t, h, w, the unpruned text offset); vLLM's EVS recompute places them."""
        from vllm.multimodal.video_prune.evs import recompute_mrope_positions

        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = input_ids.to(device, torch.long) if isinstance(input_ids, Tensor) else \
            torch.tensor(input_ids, dtype=torch.long, device=device)
        embeds = [mm[:, :-4] for mm in multimodal_embeddings]
        positions = [mm[:, -4:].permute(1, 0).long() for mm in multimodal_embeddings]
        cfg = self.config
        pos, delta = recompute_mrope_positions(ids, positions, mrope_positions, num_computed_tokens,
                                               cfg.vision_start_token_id, cfg.image_token_id, cfg.video_token_id)
        return embeds, pos, delta


class ZooQwen2_5_VLMultiModalProcessor(QwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(ZooQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class ZooQwen2_5_VLForConditionalGeneration(ZooQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL keeping zoo's picks of each image's merged tokens (original 3-D positions)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.zoo_visual_dim = self.config.vision_config.out_hidden_size
        self._zoo_init(vllm_config, _qwen25_projector)

    def embed_multimodal(self, **kwargs: object):
        specs = kwargs.pop(SETTINGS_FIELD, None)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: list[Tensor] = []
        for modality, mm_input in by_modality.items():
            if modality == "image":
                out.extend(self._zoo_images(mm_input, specs))
            elif modality == "video":
                out.extend(self._zoo_videos(mm_input))
        return tuple(out)

    def _zoo_videos(self, video_input) -> list[Tensor]:
        """Videos unpruned (or pruned by vLLM's EVS when the engine asks for it), with positions."""
        if self.is_multimodal_pruning_enabled:  # EVS asked for: its rows, the unpruned text offset
            embeds = self._postprocess_video_embeds_evs(self._process_video_input(video_input), video_input)
            fixed = []
            for emb, thw, sec in zip(embeds, video_input["video_grid_thw"].tolist(),
                                     _seconds(video_input, len(embeds))):
                full = workarounds.media_positions(thw, self.visual.spatial_merge_size,
                                                   self.config.vision_config.tokens_per_second * sec)
                emb = emb.clone()
                emb[:, -1] = full[0, 3]
                fixed.append(emb)
            return fixed
        embeds = self._process_video_input(video_input)
        out = []
        for emb, thw, sec in zip(embeds, video_input["video_grid_thw"].tolist(), _seconds(video_input, len(embeds))):
            pos = workarounds.media_positions(thw, self.visual.spatial_merge_size,
                                              self.config.vision_config.tokens_per_second * sec)
            out.append(torch.cat([emb, pos.to(emb.device, emb.dtype)], dim=1))
        return out


def _seconds(video_input, n: int) -> list[float]:
    sec = video_input.get("second_per_grid_ts")
    return [1.0] * n if sec is None else [float(s) for s in torch.as_tensor(sec).long().tolist()]


class ZooQwen3VLMultiModalProcessor(QwenProcessorMixin, Qwen3VLMultiModalProcessor):
    zoo_takes_videos = False


class _ZooQwen3Model(ZooQwenMixin):
    zoo_window_order = False

    def _zoo_qwen3_init(self, vllm_config) -> None:
        self.zoo_visual_dim = self.visual_dim
        self._zoo_init(vllm_config, _qwen3_projector)

    def embed_multimodal(self, **kwargs: object):
        specs = kwargs.pop(SETTINGS_FIELD, None)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not by_modality:
            return None
        out: list[Tensor] = []
        for modality, mm_input in by_modality.items():
            if modality == "image":  # videos are refused by the processor
                out.extend(self._zoo_images(mm_input, specs))
        return tuple(out)


@MULTIMODAL_REGISTRY.register_processor(ZooQwen3VLMultiModalProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class ZooQwen3VLForConditionalGeneration(_ZooQwen3Model, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL keeping zoo's picks (deepstack rows pruned with the same kept set)."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._zoo_qwen3_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(ZooQwen3VLMultiModalProcessor, info=Qwen3VLMoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class ZooQwen3VLMoeForConditionalGeneration(_ZooQwen3Model, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE: the same vision path as Qwen3-VL."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._zoo_qwen3_init(vllm_config)
