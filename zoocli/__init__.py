"""zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines).

The public API: ``token_sensitivity``, ``zoo_select``, ``divprune_select``, the method registry
(``METHODS``, ``Method``, ``register``, ``get_method``, ``select``, ``PruneInputs``, ``Selection``)
and ``load_adapter`` for models.

Where things live: ``methods/`` one file per paper (a ``Method`` object each: metadata, options and
their check, a selection ``fn`` or an in-LLM ``plan``); ``adapters/`` the only code that reads model
internals (``base`` the contract, ``decoder`` the pieces the prune loop drives, one file per
family); ``prune_loop`` in-LLM pruning on an adapter's decoder; ``pipeline`` encode -> select ->
generate, timed; ``sensitivity`` the zeroth-order estimator; ``ops`` the shared tensor helpers;
``timing`` the clocks and the TTFT / end-to-end definition; ``analysis`` ``score --vs-encoder``.

Importing ``zoocli``, ``zoocli.methods`` or ``zoocli.adapters`` does not import torch or
transformers: ``token_sensitivity`` and ``load_adapter`` load on first use.
"""

from __future__ import annotations


__version__ = "0.1.0"

from zoocli.methods import (
    METHODS, Method, PruneInputs, Selection, check_keep, get_method, register, select,
)
from zoocli.methods.divprune import divprune_select
from zoocli.methods.zoo import zoo_select


def load_adapter(*args, **kwargs):
    """Load a model family adapter (see ``zoocli.adapters.load_adapter``); imports transformers lazily."""
    from zoocli.adapters import load_adapter as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):
    if name == "token_sensitivity":  # imports torch: loaded on first use
        from zoocli.sensitivity import token_sensitivity

        return token_sensitivity
    raise AttributeError(f"module 'zoocli' has no attribute {name!r}")


__all__ = [
    "METHODS", "Method", "PruneInputs", "Selection", "divprune_select", "get_method",
    "load_adapter", "register", "select", "token_sensitivity", "zoo_select",
]
