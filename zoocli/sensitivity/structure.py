"""What a projector is made of: Linear-act-Linear, Qwen2.5-VL's merger, or anything else.

The sensitivity estimators (``zoocli.sensitivity.exact``, ``zoocli.sensitivity.sampled``) take fast paths
for the projector structures recognised here and the generic ``torch.func`` / two-pass path for the
rest. Recognised, from attributes and module types only (no model names):

- LLaVA / LLaVA-NeXT ``linear_1, act, linear_2``;
- the original LLaVA ``nn.Sequential(Linear, act, Linear)`` mm_projector;
- Qwen2.5-VL's ``Qwen2_5_VLPatchMerger``: ``ln_q`` (an RMSNorm over d_v per patch, checked
  numerically against the formula) then ``mlp`` = Linear, act, Linear on the s^2 * d_v rows;
- Qwen3-VL's ``Qwen3VLVisionPatchMerger``: ``norm`` (a LayerNorm with weight and bias, over d_v per
  patch, or over the whole s^2 * d_v row for the deepstack mergers' "postshuffle" norm) then
  ``linear_fc1``, ``act_fn``, ``linear_fc2``; the whole chain is checked numerically on a probe.

The activation is checked to act elementwise. A thin wrapper (no parameters of its own, one child
with a recognised structure, equal outputs on a probe) is looked through: the adapters' row-wise
``MergerProjector`` around the Qwen merger is one. ``projector_structure`` caches the result per projector.

Also here, shared by the estimators: fp32 (or other dtype) copies of tensors and modules (``f32``,
``cast``, ``module32``, ``module_as``, weakly cached), the rank-k SVD factor of the second Linear (``lowrank_factor``), the projector on
rows (``rows_fn``, ``probe_width``) and an elementwise activation's derivative (``act_prime``).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

# ---------------------------------------------------------------------------------------------
# caches (weak: they go away with the module / tensor)

_CAST: dict[torch.dtype, WeakTensorKeyDictionary] = {}  # target dtype -> tensor -> (key, copy)
_MOD: dict[torch.dtype, weakref.WeakKeyDictionary] = {}  # target dtype -> module -> (key, copy)
_SVD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tensor_key(t: Tensor, device: torch.device) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, str(t.device), str(device))


def f32(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` as float32 on ``device``; no copy when it already is, else a cached copy."""
    return cast(t, device, torch.float32)


def cast(t: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """``t`` as ``dtype`` on ``device``; no copy when it already is, else a copy cached per
    (tensor, dtype) and rebuilt when the tensor changes."""
    if t is None:
        return None
    src, t = t, t.detach()  # cached on ``src`` itself: each detach() is a new object
    if t.dtype == dtype and t.device == device:
        return t
    key = tensor_key(t, device)
    cache = _CAST.setdefault(dtype, WeakTensorKeyDictionary())
    hit = cache.get(src)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = t.to(device=device, dtype=dtype).contiguous()
    cache[src] = (key, c)
    return c


def module32(mod: nn.Module, device: torch.device) -> nn.Module:
    """An fp32 copy of ``mod`` on ``device`` (the module itself when it already is), cached."""
    return module_as(mod, device, torch.float32)


def module_as(mod: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A ``dtype`` copy of ``mod`` on ``device`` (the module itself when it already is), cached per
    (module, dtype)."""
    tensors = list(mod.parameters()) + list(mod.buffers())
    if all(t.dtype == dtype and t.device == device for t in tensors if t.is_floating_point()):
        return mod
    key = (tuple(tensor_key(t, device) for t in tensors), str(device))
    cache = _MOD.setdefault(dtype, weakref.WeakKeyDictionary())
    hit = cache.get(mod)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = copy.deepcopy(mod).to(device=device, dtype=dtype)
    cache[mod] = (key, c)
    return c


def lowrank_factor(linear: nn.Linear, k: int, device) -> Tensor:
    """B = V_k S_k [d_in, k] (fp32) with ||W v|| ~ ||v @ B||, from the rank-k SVD of the loaded W.

    Cached per module; recomputed when the weight tensor (data_ptr / _version / device) or k changes.
    """
    device = torch.device(device)
    w = linear.weight.detach()
    k = min(int(k), min(w.shape))
    key = (tensor_key(w, device), k)
    hit = _SVD.get(linear)
    if hit is not None and hit[0] == key:
        return hit[1]
    _, s, vh = torch.linalg.svd(w.to(device=device, dtype=torch.float32), full_matrices=False)
    b = (vh[:k].T * s[:k]).contiguous()  # [d_in, k]
    _SVD[linear] = (key, b)
    return b


# ---------------------------------------------------------------------------------------------
# structure detection


@dataclass
class Norm:
    weight: Tensor  # g [d_v]
    eps: float
    groups: int  # patches per row (spatial_merge_size ** 2)
    d_v: int
    center: bool = False  # LayerNorm (x - mean, then the variance); False: RMSNorm
    bias: Tensor | None = None  # the LayerNorm's beta [d_v]


@dataclass
class MLP:
    module: nn.Module  # the projector itself
    lin1: nn.Linear
    act: nn.Module
    lin2: nn.Linear
    norm: Norm | None = None  # the Qwen merger's RMSNorm (2.5-VL) / LayerNorm (3-VL), linearised


def is_elementwise(act: nn.Module, width: int) -> bool:
    """True when ``act`` maps each entry on its own (changing some entries leaves the others)."""
    if isinstance(act, nn.Linear):
        return False
    try:
        dev = next((t.device for t in list(act.parameters()) + list(act.buffers())), torch.device("cpu"))
        f = module32(act, dev)
        g = torch.Generator(device="cpu").manual_seed(1234)
        z = (2 * torch.randn(2, width, generator=g)).to(dev)
        z2 = z.clone()
        z2[:, ::2] += 1.0
        y, y2 = f(z), f(z2)
    except Exception:  # noqa: BLE001 - anything that cannot run on a [2, width] tensor is not elementwise
        return False
    return (isinstance(y, Tensor) and y.shape == z.shape
            and torch.equal(y[:, 1::2], y2[:, 1::2]) and bool(torch.isfinite(y).all()))


def _mlp_parts(lin1, act, lin2) -> bool:
    return (isinstance(lin1, nn.Linear) and isinstance(lin2, nn.Linear)
            and isinstance(act, nn.Module) and lin1.out_features == lin2.in_features
            and is_elementwise(act, lin1.out_features))


def _rmsnorm(ln: nn.Module, d_in: int) -> Norm | None:
    """The merger's ``ln_q`` as an RMSNorm (checked against the formula), else None."""
    w = getattr(ln, "weight", None)
    if isinstance(ln, nn.LayerNorm) or not isinstance(w, Tensor) or w.dim() != 1:
        return None
    if getattr(ln, "bias", None) is not None:
        return None
    eps = getattr(ln, "variance_epsilon", getattr(ln, "eps", None))
    if eps is None and isinstance(ln, nn.RMSNorm):
        eps = torch.finfo(w.dtype).eps
    d_v = w.numel()
    if eps is None or d_v == 0 or d_in % d_v:
        return None
    eps = float(eps)
    with torch.no_grad():
        f = module32(ln, w.device)
        gen = torch.Generator(device="cpu").manual_seed(4321)
        z = (1.5 * torch.randn(3, d_v, generator=gen)).to(w.device)
        want = w.detach().float() * z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
        try:
            got = f(z)
        except Exception:  # noqa: BLE001
            return None
        if not (isinstance(got, Tensor) and got.shape == z.shape
                and torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5)):
            return None
    return Norm(weight=w, eps=eps, groups=d_in // d_v, d_v=d_v)


def _layernorm(ln: nn.Module, d_in: int) -> Norm | None:
    """A Qwen3-VL merger's ``norm`` as an affine LayerNorm over one dim, else None."""
    if not isinstance(ln, nn.LayerNorm) or ln.weight is None or len(ln.normalized_shape) != 1:
        return None
    d_v = int(ln.normalized_shape[0])
    if d_v == 0 or d_in % d_v:
        return None
    return Norm(weight=ln.weight, eps=float(ln.eps), groups=d_in // d_v, d_v=d_v, center=True, bias=ln.bias)


def norm_rows(norm: Norm, xf: Tensor) -> Tensor:
    """The norm on rows [R, P*d_v] in float32 by its formula (RMSNorm, or LayerNorm with ``center``)."""
    xp = xf.view(xf.shape[0], norm.groups, norm.d_v)
    if norm.center:
        xp = xp - xp.mean(-1, keepdim=True)
    y = xp * torch.rsqrt(xp.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
    if norm.bias is not None:
        y = y + norm.bias.float()
    return y.reshape(xf.shape)


_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def projector_structure(p: nn.Module) -> MLP | None:
    """``_detect_structure`` once per projector (and parameter dtype / device): its numerical
    probes stay off the per-image path."""
    param = next(p.parameters(), None)
    key = None if param is None else (param.dtype, param.device)
    hit = _STRUCTURE.get(p)
    if hit is not None and hit[0] == key:
        return hit[1]
    s = _detect_structure(p)
    _STRUCTURE[p] = (key, s)
    return s


def _detect_structure(p: nn.Module) -> MLP | None:
    """The recognised structure of a projector, or None (generic).

    A thin wrapper is looked through: a module with no parameters of its own and a single child
    whose structure is recognised, provided the wrapper computes the same as the child on a probe
    (e.g. the adapters' row-wise ``MergerProjector`` around the Qwen2.5-VL merger)."""
    s = _structure_of(p)
    if s is not None:
        return s
    kids = list(p.children())
    if len(kids) != 1 or any(True for _ in p.parameters(recurse=False)):
        return None
    s = _structure_of(kids[0])
    if s is None:
        return None
    w = s.lin1.weight
    z = torch.randn(3, s.lin1.in_features, generator=torch.Generator().manual_seed(77)).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            got, want = p(z), rows_fn(s, kids[0])(z)
    except Exception:  # noqa: BLE001 - a wrapper that cannot take [R, d_in] rows is not row-wise
        return None
    tol = 10 * torch.finfo(w.dtype).eps
    if not (isinstance(got, Tensor) and got.shape == want.shape
            and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)):
        return None
    return s


def _structure_of(p: nn.Module) -> MLP | None:
    """The Linear-act-Linear structure of ``p`` itself (three recognised layouts), or None."""
    parts = [getattr(p, n, None) for n in ("linear_1", "act", "linear_2")]
    if all(isinstance(q, nn.Module) for q in parts) and _mlp_parts(*parts):
        return MLP(p, *parts)
    if isinstance(p, nn.Sequential) and len(p) == 3 and _mlp_parts(p[0], p[1], p[2]):
        return MLP(p, p[0], p[1], p[2])
    ln, mlp = getattr(p, "ln_q", None), getattr(p, "mlp", None)
    if (isinstance(ln, nn.Module) and isinstance(mlp, nn.Sequential) and len(mlp) == 3
            and _mlp_parts(mlp[0], mlp[1], mlp[2])):
        norm = _rmsnorm(ln, mlp[0].in_features)
        if norm is not None:
            return MLP(p, mlp[0], mlp[1], mlp[2], norm)
    parts = [getattr(p, n, None) for n in ("norm", "linear_fc1", "act_fn", "linear_fc2")]
    if all(isinstance(q, nn.Module) for q in parts) and _mlp_parts(*parts[1:]):
        norm = _layernorm(parts[0], parts[1].in_features)
        if norm is not None and _chain_holds(s := MLP(p, *parts[1:], norm)):
            return s
    return None


def _chain_holds(s: MLP) -> bool:
    """True when the module computes norm -> lin1 -> act -> lin2 on the rows (checked on a probe
    against the formula, in fp32): the Qwen3-VL merger's attributes say what it holds, not the order."""
    w = s.lin1.weight
    mod = module32(s.module, w.device)
    z = 1.5 * torch.randn(3, s.lin1.in_features, generator=torch.Generator().manual_seed(4321))
    z = z.to(w.device)
    with torch.no_grad():
        lin1, act, lin2 = (module32(m, w.device) for m in (s.lin1, s.act, s.lin2))
        want = lin2(act(lin1(norm_rows(s.norm, z))))
        try:
            got = rows_fn(s, mod)(z)
        except Exception:  # noqa: BLE001
            return False
    return (isinstance(got, Tensor) and got.shape == want.shape
            and torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5))


def rows_fn(s: MLP | None, mod32: nn.Module) -> Callable[[Tensor], Tensor]:
    """M on rows [R, d_in] -> [R, d] through the (fp32) module itself."""
    if s is not None and s.norm is not None:
        d_v = s.norm.d_v
        return lambda r: mod32(r.reshape(-1, d_v)).reshape(r.shape[0], -1)
    return mod32


def probe_width(rows: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """The output width of ``rows`` (one row of ``x`` through it)."""
    return int(rows(x[:1].float()).shape[-1])


def act_prime(act: nn.Module, a0: Tensor) -> Tensor:
    """act'(a0) for an elementwise activation: jvp with a ones tangent. For ``nn.GELU`` (LLaVA's,
    Qwen's) its derivative kernel directly, on a broadcast one: the same values bit for bit
    (tests/test_sensitivity_precision.py), without the jvp's primal pass and its [N, d_h] of ones."""
    if type(act) is nn.GELU:
        one = torch.ones((), dtype=a0.dtype, device=a0.device).expand_as(a0)
        return torch.ops.aten.gelu_backward(one, a0, approximate=act.approximate)
    return torch.func.jvp(act, (a0,), (torch.ones_like(a0),))[1]
