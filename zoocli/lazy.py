"""A module imported on first attribute use, so registries and metadata load without torch.

``from zoocli.lazy import torch`` in a method file lets ``zoo --help`` / ``zoo methods`` list the
registry without paying torch's import (about a second); the first ``torch.<name>`` inside a kernel
imports the real module. Only for modules whose attributes are used inside function bodies.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name``; the first attribute access imports it."""

    def __init__(self, name: str):
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str) -> Any:  # only called for names not yet cached
        value = getattr(self._module(), attr)
        setattr(self, attr, value)  # later reads are plain attribute reads (greedy loops read torch.* per step)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = LazyModule("torch")
ops = LazyModule("zoocli.ops")  # the shared tensor helpers (they import torch)
