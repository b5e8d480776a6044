"""The registry of token-selection methods and the contract they share.

A method is a pure function ``fn(inp: PruneInputs, keep: int, **options) -> Selection`` on tensors.
It never reads a model, a config, the environment or a global RNG: everything it may look at is in
``PruneInputs``, filled by the pipeline from the adapter with exactly the signals the method
declares in ``needs``.

``select(name, inp, keep)`` is the one entry point callers use: it enforces the contract for every
method (``keep <= 0`` is an error, ``keep >= N`` keeps everything, the result holds ``min(keep, N)``
distinct in-range indices) so each method body only handles ``0 < keep < N``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoocli.errors import UnknownNameError, UsageError

FAMILIES = frozenset({"llava", "llava_next", "qwen2_5_vl"})


@dataclass(frozen=True)
class PruneInputs:
    """What a method may look at, for one selection scope (one image, or one crop of it).

    ``features`` are the projected tokens Z, in the space the LLM reads; ``vision`` the
    pre-projector tokens X in the projector's input layout, so ``projector(vision)[i] == features[i]``.
    The optional signals are filled only when a method declares them in ``needs``:
    ``cls_attn`` [N] attention each token receives at the vision layer the features come from
    (VisionZip), ``vision_keys`` [N, Dk] that layer's keys (VisionZip's merge metric),
    ``text_attn`` [N] attention received inside the LLM (FastV), ``prompt`` [T, D] LLM input
    embeddings of the prompt tokens (ZSPAPrune). ``grid`` is (rows, cols) for one scope.
    """

    features: Tensor  # [N, D]
    vision: Tensor | None = None  # [N, Dv]
    projector: nn.Module | None = None  # [..., Dv] -> [..., D]
    cls_attn: Tensor | None = None  # [N]
    vision_keys: Tensor | None = None  # [N, Dk]
    text_attn: Tensor | None = None  # [N]
    prompt: Tensor | None = None  # [T, D]
    grid: tuple[int, int] | None = None
    seed: int = 0

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class Selection:
    """The kept tokens of one scope.

    ``idx`` [K] int64 indices into the scope's tokens, in pick order, distinct, in range.
    ``tokens`` [K, D] optional replacement embeddings aligned with ``idx`` (merging methods such as
    VisionZip: a merged token stands at its target's index); otherwise ``features[idx]`` is used.
    ``scores`` [N] optional per-token scores the method ranked by, for display.
    ``extra`` vision-space tokens [K, Dv] to be projected (merging before the projector), if any.
    """

    idx: Tensor
    tokens: Tensor | None = None
    scores: Tensor | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


MethodFn = Callable[..., Selection]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    summary: str
    paper: str
    needs: frozenset[str] = frozenset()
    stage: Literal["pre_llm", "in_llm"] = "pre_llm"
    families: frozenset[str] = FAMILIES
    deviation: str = ""  # how this differs from the official code; shown by `zoo methods`
    options: Mapping[str, Any] = field(default_factory=dict)  # option name -> default
    check: Callable[..., None] | None = None  # validates a full set of options (UsageError)


_METHODS: dict[str, Method] = {}
METHODS: Mapping[str, Method] = MappingProxyType(_METHODS)


def register(
    name: str,
    *,
    summary: str,
    paper: str,
    needs: frozenset[str] | set[str] = frozenset(),
    stage: Literal["pre_llm", "in_llm"] = "pre_llm",
    families: frozenset[str] | set[str] = FAMILIES,
    deviation: str = "",
    options: Mapping[str, Any] | None = None,
    check: Callable[..., None] | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: add ``fn`` to the registry under ``name``."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = Method(
            name, fn, summary, paper, frozenset(needs), stage, frozenset(families), deviation,
            MappingProxyType(dict(options or {})), check,
        )
        return fn

    return deco


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownNameError("method", name, _METHODS) from None


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"zoo"`` or ``"zoo:estimator=jvp:rank=128"`` -> (method name, options). Lets one run compare
    variants of a method side by side (``zoo bench --methods zoo,zoo:estimator=jvp``)."""
    name, *parts = spec.strip().split(":")
    method = get_method(name)
    opts: dict[str, Any] = {}
    for part in parts:
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise UsageError(f"method spec '{spec}': options are written name:key=value")
        if key not in method.options:
            raise UsageError(f"method '{name}' has no option '{key}'; its options: "
                             f"{', '.join(sorted(method.options)) or 'none'}")
        opts[key] = _parse_value(raw)
    if method.check is not None:
        method.check(**{**method.options, **opts})
    return name, opts


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def check_keep(keep: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise UsageError(f"keep must be an integer number of tokens, got {keep!r}")
    if keep <= 0:
        raise UsageError(f"keep must be at least 1, got {keep}")
    return keep


def select(name: str, inp: PruneInputs, keep: int, **options: Any) -> Selection:
    """Run method ``name`` on one scope under the shared contract (see the module docstring)."""
    method = get_method(name)
    check_keep(keep)
    unknown = set(options) - set(method.options)
    if unknown:
        raise UsageError(
            f"method '{name}' has no option {', '.join(sorted(unknown))}; "
            f"its options: {', '.join(sorted(method.options)) or 'none'}"
        )
    if method.check is not None:
        method.check(**{**method.options, **options})
    missing = [s for s in sorted(method.needs) if getattr(inp, s) is None]
    if missing:
        raise UsageError(f"method '{name}' needs {', '.join(missing)}, which were not provided")
    n = inp.n
    if keep >= n or name == "none":
        return Selection(idx=torch.arange(n, device=inp.features.device))
    sel = method.fn(inp, keep, **{**method.options, **options})
    idx = sel.idx
    assert idx.dtype == torch.long and idx.ndim == 1 and idx.numel() == keep, (name, idx.shape)
    return sel


# Registration happens on import of the method modules.
from zoocli.methods import basic as _basic  # noqa: E402,F401
from zoocli.methods import divprune as _divprune  # noqa: E402,F401
from zoocli.methods import zoo as _zoo  # noqa: E402,F401
from zoocli.methods import fastv as _fastv  # noqa: E402,F401
from zoocli.methods import sparsevlm as _sparsevlm  # noqa: E402,F401
from zoocli.methods import visionzip as _visionzip  # noqa: E402,F401
from zoocli.methods import zspaprune as _zspaprune  # noqa: E402,F401
