"""zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines).

The public API: ``token_sensitivity``, ``zoo_select``, ``divprune_select``, the method registry
(``METHODS``, ``register``, ``get_method``, ``select``) and ``load_adapter`` for models. The
names load on first use (PEP 562), so ``import zoocli`` (and `zoo --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "METHODS": "zoocli.methods", "Method": "zoocli.methods", "PruneInputs": "zoocli.methods",
    "Selection": "zoocli.methods", "get_method": "zoocli.methods", "register": "zoocli.methods",
    "select": "zoocli.methods", "divprune_select": "zoocli.methods.divprune",
    "zoo_select": "zoocli.methods.zoo", "token_sensitivity": "zoocli.sensitivity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zoocli' has no attribute {name!r}")


def load_adapter(*args, **kwargs):
    """Load a model family adapter (see ``zoocli.adapters.load_adapter``); imports transformers lazily."""
    from zoocli.adapters import load_adapter as _load

    return _load(*args, **kwargs)


__all__ = [
    "METHODS", "Method", "PruneInputs", "Selection", "divprune_select", "get_method",
    "load_adapter", "register", "select", "token_sensitivity", "zoo_select",
]
