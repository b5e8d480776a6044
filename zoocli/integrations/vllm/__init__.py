"""zoo as a vLLM plugin: ZOO-Prune and the image-only baselines served by vLLM's engine.

``register`` is the ``vllm.general_plugins`` entry point (pyproject.toml): vLLM calls it in every
process it starts. It registers zoo's model classes lazily by name (``ModelRegistry``); an engine
uses one when its ``hf_overrides`` name it (``settings.engine_overrides``), so installing zoo
changes nothing for other models. Settings: ``settings``; vLLM's defects and their workarounds:
``workarounds``; the model and processor classes: ``models`` (imports vLLM).
"""

from __future__ import annotations

from zoocli.integrations.vllm.settings import ARCHITECTURES, VLLM_METHODS, ZooSettings, engine_overrides


def register() -> None:
    """Register zoo's architectures with vLLM's model registry (lazily, by name), and install the
    runner switch zoo's Qwen models need (``workarounds.mrope_recompute_switch``: it acts only on
    zoo's models, and must be in place before a model loads)."""
    from vllm import ModelRegistry

    from zoocli.integrations.vllm.workarounds import mrope_recompute_switch

    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"zoocli.integrations.vllm.models:{arch}")
    mrope_recompute_switch()


def kept_history(model) -> list[list[int]]:
    """The kept rows (ascending candidate indices) of the last images a zoo model encoded, oldest
    first (at most 256): ``llm.apply_model(kept_history)`` returns one list per worker."""
    return [list(rows) for rows in model.zoo.history]


__all__ = ["kept_history", "ARCHITECTURES", "VLLM_METHODS", "ZooSettings", "engine_overrides", "register"]
