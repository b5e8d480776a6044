"""zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines).

The public API: ``token_sensitivity``, ``zoo_select``, ``divprune_select``, the method registry
(``METHODS``, ``register``, ``get_method``, ``select``) and ``load_adapter`` for models.
"""

__version__ = "0.1.0"

from zoocli.methods import METHODS, Method, PruneInputs, Selection, get_method, register, select
from zoocli.methods.divprune import divprune_select
from zoocli.methods.zoo import zoo_select
from zoocli.sensitivity import token_sensitivity


def load_adapter(*args, **kwargs):
    """Load a model family adapter (see ``zoocli.adapters.load_adapter``); imports transformers lazily."""
    from zoocli.adapters import load_adapter as _load

    return _load(*args, **kwargs)


__all__ = [
    "METHODS", "Method", "PruneInputs", "Selection", "divprune_select", "get_method",
    "load_adapter", "register", "select", "token_sensitivity", "zoo_select",
]
