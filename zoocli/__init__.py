"""zoo: visual-token pruning for vision-language models (ZOO-Prune and its baselines).

The public API: pruned generation from Python (``zoocli.api``: ``ask``, ``compare_methods``, ``score_tokens``
returning ``Answer`` / ``Comparison`` / ``Scores``, on a model from ``load_adapter`` (by name or
path) or ``wrap_model`` (a transformers model and processor already loaded)); the pieces:
``token_sensitivity``, ``zoo_select``, ``divprune_select``, the method registry (``METHODS``,
``Method``, ``register``, ``get_method``, ``select``, ``PruneInputs``, ``Selection``).

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

from zoocli.api import (
    Answer, Comparison, Scores, ask, compare_methods, load_adapter, score_tokens, wrap_model,
)
from zoocli.methods import (
    METHODS, Method, PruneInputs, Selection, check_keep, get_method, register, select,
)
from zoocli.methods.divprune import divprune_select
from zoocli.methods.zoo import zoo_select


def __getattr__(name: str):
    if name == "token_sensitivity":  # imports torch: loaded on first use
        from zoocli.sensitivity import token_sensitivity

        return token_sensitivity
    raise AttributeError(f"module 'zoocli' has no attribute {name!r}")


__all__ = [
    "METHODS", "Answer", "Comparison", "Method", "PruneInputs", "Scores", "Selection", "ask",
    "compare_methods", "divprune_select", "get_method", "load_adapter", "register", "score_tokens",
    "select", "token_sensitivity", "wrap_model", "zoo_select",
]
