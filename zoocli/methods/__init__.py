"""The registry of token-selection methods and the contract they share.

A method is one ``Method`` object in one file (``zoocli/methods/<paper>.py``), added with
``register(Method(...))`` (llm-style plugin objects; the older decorator form ``@register(name, ...)``
still works). It carries its metadata (summary, paper, deviation, families), the signals it
``needs``, its option defaults and an option ``check``, and its compute:

- pre-LLM methods (``stage="pre_llm"``): ``fn(inp: PruneInputs, keep, **options) -> Selection``, a
  pure function on tensors. It never reads a model, a config, the environment or a global RNG:
  everything it may look at is in ``PruneInputs``, filled by the pipeline from the adapter with
  exactly the signals the method declares in ``needs``.
- in-LLM methods (``stage="in_llm"``, FastV, SparseVLM): ``plan(view: LLMView, keep, **options)``
  returns the prune stages (``zoocli.prune_loop.PruneStage``) the prune loop runs inside the LLM.

``parse_method_spec("zoo:m=32")`` validates every option (names, types, ranges) at parse time,
before any model loads. ``select(name, inp, keep)`` is the one entry point for pre-LLM methods: it
enforces the contract (``keep <= 0`` is an error, ``keep >= N`` keeps everything, the result holds
``min(keep, N)`` distinct in-range indices) so each method body only handles ``0 < keep < N``.
``select_scopes(name, inps, keeps)`` is the same over several scopes (LLaVA-NeXT crops): a method
with a ``batch`` function runs them as one padded batch (its greedy loop has max-per-scope steps,
not the sum), the others one scope after another; the results are the same.

Importing this package does not import torch (``zoo methods`` lists the registry instantly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from zoocli.errors import UnknownNameError, UsageError

if TYPE_CHECKING:
    from torch import Tensor, nn

FAMILIES = frozenset({"llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision"})


@dataclass(frozen=True)
class PruneInputs:
    """What a pre-LLM method may look at, for one selection scope (one image, or one crop of it).

    ``features`` are the projected tokens Z, in the space the LLM reads; ``vision`` the
    pre-projector tokens X in the projector's input layout, so ``projector(vision)[i] == features[i]``.
    The optional signals are filled only when a method declares them in ``needs``:
    ``cls_attn`` [N] attention each token receives at the vision layer the features come from
    (VisionZip), ``vision_keys`` [N, Dk] that layer's keys (VisionZip's merge metric),
    ``text_attn`` [N] attention received inside the LLM (kept for external methods; no adapter
    provides it), ``prompt`` [T, D] LLM input embeddings of the prompt tokens (ZSPAPrune).
    ``grid`` is (rows, cols) for one scope and ``cells`` [N, 2] each token's (row, col) in it
    (LLaVA-NeXT crops cut by unpadding hold fewer cells than the grid); both None for a global
    selection over several crops.
    """

    features: Tensor  # [N, D]
    vision: Tensor | None = None  # [N, Dv]
    projector: nn.Module | None = None  # [..., Dv] -> [..., D]
    cls_attn: Tensor | None = None  # [N]
    vision_keys: Tensor | None = None  # [N, Dk]
    text_attn: Tensor | None = None  # [N]
    prompt: Tensor | None = None  # [T, D]
    grid: tuple[int, int] | None = None
    cells: Tensor | None = None  # [N, 2] (row, col) in ``grid``
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
    """

    idx: Tensor
    tokens: Tensor | None = None
    scores: Tensor | None = None

    def ascending(self) -> Selection:
        """The same kept set with ``idx`` ascending and ``tokens`` reordered with it: the order
        ``Adapter.build_inputs`` takes (``kept`` ascending, ``tokens`` row for row)."""
        order = self.idx.argsort()
        return Selection(self.idx[order], None if self.tokens is None else self.tokens[order], self.scores)


@dataclass(frozen=True)
class LLMView:
    """What an in-LLM method's ``plan`` may look at, for one prompt (batch size 1).

    ``visual`` [N] sequence positions of the candidates in the unpruned LLM input (ascending);
    ``text_after`` [T] positions of the (unpadded) text tokens after the image; ``layer0`` [L, D]
    the LLM input embeddings (the layer-0 states); ``n_layers`` the decoder depth.
    """

    n_layers: int
    visual: Tensor  # [N]
    text_after: Tensor  # [T]
    layer0: Tensor  # [L, D]

    @property
    def n(self) -> int:
        return int(self.visual.numel())


MethodFn = Callable[..., Selection]
PlanFn = Callable[..., list]  # (view: LLMView, keep: int, **options) -> list[PruneStage]


@dataclass(frozen=True)
class Method:
    """One token-selection method: metadata, declared signals, options and its compute.

    ``fn`` (pre-LLM) selects on ``PruneInputs``; ``plan`` (in-LLM) returns prune stages.
    ``options`` maps option name -> default; ``check(**options)`` raises ``UsageError`` for values
    the method cannot take (types are also checked against the defaults' types by ``validate``).
    """

    name: str
    fn: MethodFn | None
    summary: str
    paper: str
    needs: frozenset[str] = frozenset()
    stage: Literal["pre_llm", "in_llm"] = "pre_llm"
    families: frozenset[str] = FAMILIES
    deviation: str = ""  # how this differs from the official code; shown by `zoo methods`
    options: Mapping[str, Any] = field(default_factory=dict)  # option name -> default
    check: Callable[..., None] | None = None  # validates a full set of options (UsageError)
    plan: PlanFn | None = None  # in-LLM methods: the prune stages of one prompt
    # optional: several scopes at once, batch(inps, keeps, **options) -> [Selection], each equal to
    # fn(inp, keep) (``select_scopes``); methods whose kernels take a padded batch
    batch: Callable[..., list] | None = None

    def __post_init__(self):
        object.__setattr__(self, "needs", frozenset(self.needs))
        object.__setattr__(self, "families", frozenset(self.families))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if (self.stage == "in_llm") != (self.plan is not None) or (self.fn is None) == (self.plan is None):
            raise ValueError(f"method '{self.name}': a pre_llm method has fn, an in_llm method has plan")

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The full option set (defaults + ``options``), checked: names, types, then ``check``."""
        unknown = set(options) - set(self.options)
        if unknown:
            raise UsageError(f"method '{self.name}' has no option {', '.join(sorted(unknown))}; "
                             f"its options: {', '.join(sorted(self.options)) or 'none'}")
        for key, value in options.items():
            _check_type(self.name, key, value, self.options[key])
        full = {**self.options, **options}
        if self.check is not None:
            self.check(**full)
        return full


def _check_type(method: str, key: str, value: Any, default: Any) -> None:
    """An option value must have its default's type (an int where a float is expected is fine)."""
    if default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UsageError(f"{method}: option {key} must be {type(default).__name__}, got {value!r}")


_METHODS: dict[str, Method] = {}
METHODS: Mapping[str, Method] = MappingProxyType(_METHODS)


def register(method: Method | str, **metadata: Any):
    """Add a method to the registry. ``register(Method(...))`` adds and returns the object;
    ``@register("name", summary=..., paper=..., ...)`` decorates a pre-LLM ``fn`` (older form)."""
    if isinstance(method, Method):
        if method.name in _METHODS:
            raise ValueError(f"method '{method.name}' is registered twice")
        _METHODS[method.name] = method
        return method

    def deco(fn: MethodFn) -> MethodFn:
        register(Method(name=method, fn=fn, **metadata))
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownNameError("method", name, _METHODS) from None


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"zoo"`` or ``"zoo:estimator=jvp:rank=128"`` -> (method name, options), every option
    validated (name, type, range) before any model loads. Lets one run compare variants of a
    method side by side (``zoo bench --methods zoo,zoo:estimator=jvp``)."""
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
    try:
        method.validate(opts)
    except UsageError as e:  # name the spec at fault: "zoo:m=99999": m must be at most 65536
        raise UsageError(f"method spec '{spec.strip()}': {e}") from None
    return name, opts


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
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


def check_budgets(k, rows: int) -> list[int]:
    """One budget per row: ``k`` an integer (every row) or a list of ``rows`` integers, each >= 1."""
    if isinstance(k, (list, tuple)):
        if len(k) != rows:
            raise UsageError(f"{len(k)} budgets for {rows} rows")
        return [check_keep(v) for v in k]
    return [check_keep(k)] * rows


def _checked(name: str, method: Method, inps: list[PruneInputs], keeps: list[int], options) -> dict:
    """The shared contract's checks, in order (every keep, the options, the signals each scope
    needs); returns the options with their defaults."""
    for k in keeps:
        check_keep(k)
    full = method.validate(options)
    for inp in inps:
        missing = [s for s in sorted(method.needs) if getattr(inp, s) is None]
        if missing:
            raise UsageError(f"method '{name}' needs {', '.join(missing)}, which were not provided")
    return full


def select(name: str, inp: PruneInputs, keep: int, **options: Any) -> Selection:
    """Run pre-LLM method ``name`` on one scope under the shared contract (module docstring).

    ``Selection.idx`` comes in the method's pick order, not sorted: the greedy methods' (zoo, sum,
    divprune, ...) first pick first, the others in the order they produce; when ``keep`` covers
    all ``N`` tokens it is ``0..N-1``. ``Selection.ascending()`` gives the kept set in the ascending order that
    ``Adapter.build_inputs`` takes."""
    import torch

    method = get_method(name)
    if method.fn is None:
        raise UsageError(f"method '{name}' prunes inside the LLM: it runs through its plan "
                         "(zoocli.pipeline.run_method), not select")
    full = _checked(name, method, [inp], [keep], options)
    n = inp.n
    if keep >= n:
        return Selection(idx=torch.arange(n, device=inp.features.device))
    sel = method.fn(inp, keep, **full)
    idx = sel.idx
    want = n if name == "none" else keep  # the baseline keeps everything whatever the budget
    assert idx.dtype == torch.long and idx.ndim == 1 and idx.numel() == want, (name, idx.shape)
    return sel


def select_scopes(name: str, inps: list[PruneInputs], keeps: list[int], **options: Any) -> list[Selection]:
    """``[select(name, inp, keep) for inp, keep in zip(inps, keeps)]``, with the scopes that need
    a selection (``0 < keep < N``) run as one batch when the method has a ``batch`` function."""
    import torch

    method = get_method(name)
    if method.batch is None or method.fn is None:
        return [select(name, inp, k, **options) for inp, k in zip(inps, keeps, strict=True)]
    full = _checked(name, method, inps, keeps, options)
    todo = [i for i, (inp, k) in enumerate(zip(inps, keeps, strict=True)) if k < inp.n]
    out = [Selection(idx=torch.arange(inp.n, device=inp.features.device)) for inp in inps]
    if len(todo) == 1:
        out[todo[0]] = method.fn(inps[todo[0]], keeps[todo[0]], **full)
    elif todo:
        for i, sel in zip(todo, method.batch([inps[i] for i in todo], [keeps[i] for i in todo], **full),
                          strict=True):
            out[i] = sel
    for i in todo:
        idx = out[i].idx
        assert idx.dtype == torch.long and idx.ndim == 1 and idx.numel() == keeps[i], (name, idx.shape)
    return out


# Registration happens on import of the method modules.
from zoocli.methods import basic as _basic  # noqa: E402,F401
from zoocli.methods import divprune as _divprune  # noqa: E402,F401
from zoocli.methods import zoo as _zoo  # noqa: E402,F401
from zoocli.methods import fastv as _fastv  # noqa: E402,F401
from zoocli.methods import sparsevlm as _sparsevlm  # noqa: E402,F401
from zoocli.methods import visionzip as _visionzip  # noqa: E402,F401
from zoocli.methods import zspaprune as _zspaprune  # noqa: E402,F401
from zoocli.methods import zoo_norm as _zoo_norm  # noqa: E402,F401
from zoocli.methods import vispruner as _vispruner  # noqa: E402,F401
from zoocli.methods import cdpruner as _cdpruner  # noqa: E402,F401
from zoocli.methods import downsample as _downsample  # noqa: E402,F401
from zoocli.methods import mmtok as _mmtok  # noqa: E402,F401
from zoocli.methods import dart as _dart  # noqa: E402,F401
from zoocli.methods import pyramiddrop as _pyramiddrop  # noqa: E402,F401
