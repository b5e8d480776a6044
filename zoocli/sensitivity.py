"""Zeroth-order token sensitivity at the multimodal projector (ZOO-Prune, Eq. 2-3 and Prop. 3.1).

"Zeroth-Order Gradient Estimation for Training-Free Visual Token Pruning" (ZOO-Prune, 2025;
shared/papers/zoo-prune-paper.txt). For pre-projector tokens x_i and the projector M:

    S(i) = 1/m sum_j || M(x_i + h u_j) - M(x_i - h u_j) || / 2h          (Eq. 2-3)

with m unit-norm Gaussian directions u_j shared by every token. Prop. 3.1: S(i) = E_u ||J(x_i) u||
+ O(h^2). ``token_sensitivity`` computes it with one of these estimators:

``exact`` (default)
    S(i) = ||J(x_i)||_F / sqrt(d_in) = sqrt(E_u ||J u||^2), the closed form of the m -> inf,
    h -> 0 limit in root-mean-square form: no directions, no step, no seed, no sampling noise
    (``zoocli.sensitivity_exact``, which derives it for both recognised structures). ``m``, ``h``
    and ``seed`` belong to the sampled estimators below; given with ``exact`` they are a
    ``SampledOptionError`` (a ``ValueError``). Their defaults when not given: m=64, h=0.01, seed=0.
``fd`` (Eq. 2-3 as the paper writes it)
    For a Linear-act-Linear projector (LLaVA / LLaVA-NeXT ``linear_1, act, linear_2``; the original
    LLaVA ``nn.Sequential(Linear, act, Linear)`` mm_projector) the perturbation is applied after the
    first Linear, which is exact by linearity: a0 = W1 x + b1 and W1(x +- h u) + b1 = a0 +- h W1 u,
    with W1 u computed once per direction and shared by all tokens. The activation difference
    act(a0 + h t) - act(a0 - h t) is formed in float32, scaled by 1/(2h), and the second Linear is
    applied once to it (its bias cancels). Cost per (token, direction) row: one d x d_h product plus
    elementwise work, instead of two full projector passes.
``jvp``
    The h -> 0 limit of ``fd``: W2 (act'(a0) (.) W1 u), with act'(a0) computed once per token
    (``torch.func.jvp`` of the elementwise activation with a ones tangent, so any elementwise
    activation module works). For an unrecognised projector, ``torch.func.jvp`` of the whole fp32
    module.
``naive``
    The plain two-pass reference: x + h u and x - h u through the projector itself (an fp32 copy),
    chunked. The benchmark baseline, and what ``fd`` falls back to for a projector whose structure
    is not recognised.
``rank=k`` (with ``fd`` or ``jvp``)
    ||W2 v|| ~ ||S_k V_k^T v||, from the rank-k truncated SVD W2 = U S V^T of the *loaded* second
    Linear weight, in fp32 (U has orthonormal columns, so it drops out of the norm). Each row then
    costs k x d_h instead of d x d_h. The factor is cached per Linear module and recomputed when the
    weight tensor (data_ptr / _version / device) or k changes, so the SVD is not a per-call cost.
    This is the paper's LLaVA-NeXT low-rank option (k=128) applied to the second Linear only: the
    first Linear is exact and shared across tokens here, so truncating it would save nothing.

Qwen2.5-VL's ``Qwen2_5_VLPatchMerger`` (``ln_q`` RMSNorm over d_v per patch, then a view to
rows of s^2 * d_v, then ``mlp`` = Linear, GELU, Linear) is recognised too. Rows of ``x`` are the
s^2 * d_v concatenation of one merged token's patches and M(x) = merger(x.reshape(-1, d_v)). The
RMSNorm is nonlinear. **Choice:** it is linearised at x (its exact JVP, per patch p,
J_p u_p = g (.) (u_p / r_p - x_p (x_p . u_p) / (d_v r_p^3)), r_p = sqrt(mean(x_p^2) + eps)), and
the rest of Eq. 2 stays exact: a+- = a0 +- h W1 (J u). This agrees with Eq. 2 to O(h^2), the
order of the finite-difference truncation error itself (Prop. 3.1). It keeps the cost at one
W1-sized product per direction plus cheap per-token terms, using the block structure of W1 over
the patches: W1 J u = sum_p [W1_p (g (.) u_p) / r_p - W1_p (g (.) x_p) (x_p . u_p) / (d_v r_p^3)].
The first term is shared by all tokens. Structures are detected from attributes and module types
(no model names). The activation is checked to act elementwise and the RMSNorm is checked
numerically against its formula. A thin wrapper (no parameters of its own, one child with a
recognised structure, equal outputs on a probe) is looked through: the adapters' row-wise
``MergerProjector`` around the Qwen merger is one. Anything else takes the generic fp32 path.

Other choices and deviations (official code: AIM-SKKU/ZOO-Prune ``llava_arch.py``):

- **Precision.** Everything is float32 whatever the model dtype: perturbation, activation
  difference, norms, the first Linear. The official code runs the finite difference in fp16, where
  h*u (about 3e-4 per entry) is mostly rounded away; in bf16 it ranks tokens close to randomly.
  The one exception: on CUDA with fp16/bf16 weights, the big W2 product runs in the weight dtype
  on the already 1/(2h)-scaled fp32 difference, so no small quantity is rounded. On CPU, or with
  fp32 weights, it is fp32 too. A bf16 model therefore ranks tokens like its fp32 copy.
- **Directions.** They come from ``torch.Generator(device=x.device).manual_seed(seed)``. The
  official code uses the unseeded global CUDA RNG. The same directions are used for every token,
  as in the official code.
- **Memory.** (token, direction) pairs are processed in chunks whose temporaries stay under
  ``chunk_mb`` (``chunk_plan``). The official code projects all 2*N*m rows at once: several GB
  for LLaVA-NeXT. On CPU the chunk is further capped at ``CPU_CHUNK_MB`` for cache locality.
  Per-token terms (W1 x + b1, act'(a0)) are computed once for all tokens: O(N d_h) memory, like
  the features themselves, and bitwise independent of the chunking. Results do not depend on the
  chunk size beyond float rounding (about 1e-7 relative).
- **Low rank.** The official NeXT code factorises both Linears in ``__init__``, before the
  checkpoint is loaded. Here the SVD is of the loaded W2.
"""

from __future__ import annotations

import copy
import math
import numbers
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoocli.errors import UsageError

ESTIMATORS = ("exact", "fd", "jvp", "naive")
# the seeds torch.Generator.manual_seed accepts (a signed or unsigned 64-bit integer)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Directions: at least one; 65536 bounds the [m, d] direction block (a larger m is beyond any
# sensible cost and overflows the C++ size arithmetic long before).
M_MAX = 65536
# The finite-difference step: on a 1024->512->512 GELU MLP with inputs of std 3 (float32, m=16)
# the largest relative error against the jvp estimator (no step) was 29% at h=1e-6, 14% at 1e-5, 0.4% at 1e-4,
# 0.02% at 1e-3, 0.002% at 1e-2, 0.08% at 1 and 4% at 10: below 1e-4 the step drowns in float32
# rounding (1e-30 gives all zeros), above 1 it stops being local (1e308 overflows).
H_MIN, H_MAX = 1e-4, 1.0
H_WHY = "smaller steps drown in float32 rounding, larger ones stop being local"
# On CPU, temporaries above ~32 MB are fresh mmaps (page faults on every chunk) and fall out of
# cache; this cap (measured on a 2-core EPYC, see BENCHMARKS.md) keeps them reusable.
CPU_CHUNK_MB = 32
# Run the big W2 product in the weight dtype (fp16/bf16) on CUDA; tests flip the CPU switch.
_LOWP_W2_DEVICES = {"cuda"}


def directions(m: int, d: int, seed: int, device) -> Tensor:
    """m unit-norm Gaussian directions [m, d], float32, from a generator seeded with ``seed``."""
    g = torch.Generator(device=device).manual_seed(int(seed))
    u = torch.randn(m, d, generator=g, device=device, dtype=torch.float32)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# chunking


def chunk_plan(m: int, widths: Sequence[int], chunk_mb: float) -> tuple[int, int]:
    """(tokens, directions) per chunk, so that the fp32 temporaries stay under ``chunk_mb``.

    ``widths`` are the float32 widths held at once per (token, direction) row. Whole tokens
    (all m directions) are taken while at least one fits, otherwise one token and as many
    directions as fit (at least one).
    """
    row_bytes = 4 * max(1, int(sum(widths)))
    rows = max(1, int(chunk_mb * 2**20) // row_bytes)
    if rows >= m:
        return rows // m, m
    return 1, rows


def tokens_per_chunk(m: int, widths: Sequence[int], chunk_mb: float) -> int:
    """Tokens per chunk (see ``chunk_plan``); at least 1."""
    return chunk_plan(m, widths, chunk_mb)[0]


def _effective_mb(chunk_mb: float, device: torch.device) -> float:
    return min(chunk_mb, CPU_CHUNK_MB) if device.type == "cpu" else chunk_mb


# ---------------------------------------------------------------------------------------------
# caches (weak: they go away with the module / tensor)

_F32: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MOD32: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SVD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensor_key(t: Tensor, device: torch.device) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, str(t.device), str(device))


def _f32(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` as float32 on ``device``; no copy when it already is, else a cached copy."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.float32 and t.device == device:
        return t
    key = _tensor_key(t, device)
    hit = _F32.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = t.to(device=device, dtype=torch.float32).contiguous()
    _F32[t] = (key, c)
    return c


def _module32(mod: nn.Module, device: torch.device) -> nn.Module:
    """An fp32 copy of ``mod`` on ``device`` (the module itself when it already is), cached."""
    tensors = list(mod.parameters()) + list(mod.buffers())
    if all(t.dtype == torch.float32 and t.device == device for t in tensors if t.is_floating_point()):
        return mod
    key = (tuple(_tensor_key(t, device) for t in tensors), str(device))
    hit = _MOD32.get(mod)
    if hit is not None and hit[0] == key:
        return hit[1]
    c = copy.deepcopy(mod).to(device=device, dtype=torch.float32)
    _MOD32[mod] = (key, c)
    return c


def lowrank_factor(linear: nn.Linear, k: int, device) -> Tensor:
    """B = V_k S_k [d_in, k] (fp32) with ||W v|| ~ ||v @ B||, from the rank-k SVD of the loaded W.

    Cached per module; recomputed when the weight tensor (data_ptr / _version / device) or k changes.
    """
    device = torch.device(device)
    w = linear.weight.detach()
    k = min(int(k), min(w.shape))
    key = (_tensor_key(w, device), k)
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
class _Norm:
    weight: Tensor  # g [d_v]
    eps: float
    groups: int  # patches per row (spatial_merge_size ** 2)
    d_v: int


@dataclass
class _MLP:
    module: nn.Module  # the projector itself
    lin1: nn.Linear
    act: nn.Module
    lin2: nn.Linear
    norm: _Norm | None = None  # the Qwen2.5-VL merger's RMSNorm, linearised


def _is_elementwise(act: nn.Module, width: int) -> bool:
    """True when ``act`` maps each entry on its own (changing some entries leaves the others)."""
    if isinstance(act, nn.Linear):
        return False
    try:
        dev = next((t.device for t in list(act.parameters()) + list(act.buffers())), torch.device("cpu"))
        f = _module32(act, dev)
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
            and _is_elementwise(act, lin1.out_features))


def _rmsnorm(ln: nn.Module, d_in: int) -> _Norm | None:
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
        f = _module32(ln, w.device)
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
    return _Norm(weight=w, eps=eps, groups=d_in // d_v, d_v=d_v)


_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(p: nn.Module) -> _MLP | None:
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


def _detect_structure(p: nn.Module) -> _MLP | None:
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
            got, want = p(z), _rows_fn(s, kids[0])(z)
    except Exception:  # noqa: BLE001 - a wrapper that cannot take [R, d_in] rows is not row-wise
        return None
    tol = 10 * torch.finfo(w.dtype).eps
    if not (isinstance(got, Tensor) and got.shape == want.shape
            and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)):
        return None
    return s


def _structure_of(p: nn.Module) -> _MLP | None:
    """The Linear-act-Linear structure of ``p`` itself (three recognised layouts), or None."""
    parts = [getattr(p, n, None) for n in ("linear_1", "act", "linear_2")]
    if all(isinstance(q, nn.Module) for q in parts) and _mlp_parts(*parts):
        return _MLP(p, *parts)
    if isinstance(p, nn.Sequential) and len(p) == 3 and _mlp_parts(p[0], p[1], p[2]):
        return _MLP(p, p[0], p[1], p[2])
    ln, mlp = getattr(p, "ln_q", None), getattr(p, "mlp", None)
    if (isinstance(ln, nn.Module) and isinstance(mlp, nn.Sequential) and len(mlp) == 3
            and _mlp_parts(mlp[0], mlp[1], mlp[2])):
        norm = _rmsnorm(ln, mlp[0].in_features)
        if norm is not None:
            return _MLP(p, mlp[0], mlp[1], mlp[2], norm)
    return None


def _rows_fn(s: _MLP | None, mod32: nn.Module) -> Callable[[Tensor], Tensor]:
    """M on rows [R, d_in] -> [R, d] through the (fp32) module itself."""
    if s is not None and s.norm is not None:
        d_v = s.norm.d_v
        return lambda r: mod32(r.reshape(-1, d_v)).reshape(r.shape[0], -1)
    return mod32


# ---------------------------------------------------------------------------------------------
# estimators


class SampledOptionError(UsageError, ValueError):
    """``m``, ``h`` or ``seed`` given with the ``exact`` estimator (they belong to the sampled ones)."""


# the paper's sampled defaults (Eq. 2-3), used by fd / jvp / naive when m / h / seed are None
SAMPLED_DEFAULTS = {"m": 64, "h": 0.01, "seed": 0}


def check_options(m=None, h=None, seed=None, estimator="exact", rank=None, chunk_mb=256) -> None:
    """Raise ``UsageError`` for option values ``token_sensitivity`` cannot take.

    ``m``, ``h`` and ``seed`` are None for "not given"; with ``estimator="exact"`` giving any of
    them is a ``SampledOptionError`` (a ``UsageError`` and a ``ValueError``)."""
    if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m <= 0):
        raise UsageError(f"m must be a positive integer, got {m!r}")
    if m is not None and m > M_MAX:
        raise UsageError(f"m must be at most {M_MAX}, got {m}")
    if h is not None and (isinstance(h, bool) or not isinstance(h, (int, float))
                          or not math.isfinite(h) or h <= 0):
        raise UsageError(f"h must be a positive finite number, got {h!r}")
    if h is not None and not H_MIN <= h <= H_MAX:
        raise UsageError(f"h must be in [{H_MIN:g}, {H_MAX:g}] ({H_WHY}), got {h:g}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise UsageError(f"seed must be an integer, got {seed!r}")
        if not SEED_MIN <= seed <= SEED_MAX:
            raise UsageError(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    given = [n for n, v in (("m", m), ("h", h), ("seed", seed)) if v is not None]
    if estimator == "exact" and given:
        raise SampledOptionError(
            f"{'/'.join(given)} {'applies' if len(given) == 1 else 'apply'} to the sampled estimators only: estimator='exact' is the closed "
            f"form (no directions, no step); estimator='fd' is the paper's sampled form (Eq. 2-3)")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise UsageError(f"rank must be a positive integer or None, got {rank!r}")
        if estimator in ("naive", "exact"):
            raise UsageError(f"rank applies to the fd and jvp estimators, not {estimator}")
    if (isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float))
            or not math.isfinite(chunk_mb) or chunk_mb <= 0):
        raise UsageError(f"chunk_mb must be a positive number, got {chunk_mb!r}")


def _check(x, m, h, seed, estimator, rank, chunk_mb) -> None:
    check_options(m, h, seed, estimator, rank, chunk_mb)
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise UsageError(f"x must be a float tensor [N, d_in], got {getattr(x, 'shape', type(x))}")


@torch.no_grad()
def token_sensitivity(x: Tensor, projector: nn.Module, m: int | None = None, h: float | None = None,
                      seed: int | None = None, *, estimator: str = "exact", rank: int | None = None,
                      chunk_mb: float = 256) -> Tensor:
    """Per-token sensitivity at the projector, float32 [N] on x.device.

    ``estimator="exact"`` (default): S(i) = ||J(x_i)||_F / sqrt(d_in), the closed form of the
    m -> inf, h -> 0 limit of Eq. 2-3 (root-mean-square form; ``zoocli.sensitivity_exact``).
    ``fd`` / ``jvp`` / ``naive``: S(i) = 1/m sum_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / 2h with
    ``m`` directions (default 64), step ``h`` (default 0.01) and ``seed`` (default 0); giving any
    of these three with ``exact`` is a ``SampledOptionError`` (a ``ValueError``).

    ``x`` [N, d_in] pre-projector tokens; ``projector`` maps [..., d_in] -> [..., d] (for the
    Qwen2.5-VL merger, rows are the s^2*d_v patch concatenation). See the module docstring for the
    estimators, the recognised structures and the precision rules.
    """
    _check(x, m, h, seed, estimator, rank, chunk_mb)
    s = _structure(projector)
    if rank is not None and s is None:
        raise UsageError(
            f"rank={rank} needs a Linear-act-Linear projector (or the Qwen2.5-VL merger); "
            f"{type(projector).__name__} has no recognised structure")
    dev = x.device
    n = x.shape[0]
    out = torch.zeros(n, dtype=torch.float32, device=dev)
    if s is not None and s.lin1.in_features != x.shape[1]:
        raise UsageError(f"x has {x.shape[1]} features, the projector expects {s.lin1.in_features}")
    if n == 0:
        return out
    mb = _effective_mb(chunk_mb, dev)
    if estimator == "exact":
        from zoocli.sensitivity_exact import exact_sensitivity

        return exact_sensitivity(x, projector, s, out, mb)
    m = SAMPLED_DEFAULTS["m"] if m is None else int(m)
    h = SAMPLED_DEFAULTS["h"] if h is None else float(h)
    seed = SAMPLED_DEFAULTS["seed"] if seed is None else int(seed)
    rank = None if rank is None else int(rank)
    u = directions(m, x.shape[1], seed, dev)
    if s is None or estimator == "naive":
        # the recognised module (maybe inside a wrapper) with its own row layout, else the projector
        mod32 = _module32(s.module if s is not None else projector, dev)
        rows = _rows_fn(s, mod32)
        if estimator == "jvp":
            _generic_jvp(x, u, rows, out, mb)
        else:
            _naive(x, u, h, rows, out, mb)
    else:
        _structured(x, u, h, s, estimator, rank, out, mb)
    return out


def _probe_width(rows: Callable[[Tensor], Tensor], x: Tensor) -> int:
    return int(rows(x[:1].float()).shape[-1])


_MIN_ROWS = 32


def _padded(rows, xr: Tensor) -> Tensor:
    """rows(xr) in fp32, padded to at least ``_MIN_ROWS`` rows. BLAS takes other code paths for
    a handful of rows, and the finite difference amplifies the different rounding by 1/(2h), so
    without this the naive result would depend on the chunk size (about 1e-5 relative)."""
    r = xr.shape[0]
    if r >= _MIN_ROWS:
        return rows(xr).float()
    pad = xr[-1:].expand(_MIN_ROWS - r, -1)
    return rows(torch.cat([xr, pad])).float()[:r]


def _naive(x: Tensor, u: Tensor, h: float, rows, out: Tensor, mb: float) -> None:
    m, d_in = u.shape
    d = _probe_width(rows, x)
    # x+-, two outputs, and room for the module's own intermediates (unknown: assume 4 x widest)
    tc, dc = chunk_plan(m, (2 * d_in, 2 * d, 4 * max(d_in, d)), mb)
    hu = h * u
    for a in range(0, x.shape[0], tc):
        xc = x[a:a + tc].float()
        t = xc.shape[0]
        for b in range(0, m, dc):
            hub = hu[b:b + dc]
            xp = (xc[:, None, :] + hub[None]).reshape(-1, d_in)
            xm = (xc[:, None, :] - hub[None]).reshape(-1, d_in)
            diff = _padded(rows, xp) - _padded(rows, xm)
            nrm = torch.linalg.vector_norm(diff, dim=-1).view(t, -1)
            out[a:a + t] += nrm.sum(1) / (2 * h)
    out /= m


def _generic_jvp(x: Tensor, u: Tensor, rows, out: Tensor, mb: float) -> None:
    m, d_in = u.shape
    d = _probe_width(rows, x)
    tc, dc = chunk_plan(m, (2 * d_in, 2 * d, 8 * max(d_in, d)), mb)
    for a in range(0, x.shape[0], tc):
        xc = x[a:a + tc].float()
        t = xc.shape[0]
        for b in range(0, m, dc):
            ub = u[b:b + dc]
            k = ub.shape[0]
            xr = xc.repeat_interleave(k, dim=0)  # [t*k, d_in], token-major like the output view
            ur = ub.repeat(t, 1)
            _, jv = torch.func.jvp(rows, (xr,), (ur,))
            out[a:a + t] += torch.linalg.vector_norm(jv.float(), dim=-1).view(t, k).sum(1)
    out /= m


def _gelu_mode(act: nn.Module, dev: torch.device) -> str | None:
    """'none' / 'tanh' when ``act`` computes exactly that GELU (checked on a probe), else None."""
    if not hasattr(torch._C._nn, "gelu"):
        return None
    z = torch.linspace(-8, 8, 257, device=dev)
    y = act(z)
    for mode in ("none", "tanh"):
        if torch.equal(y, nn.functional.gelu(z, approximate=mode)):
            return mode
    return None


def _act_prime(act: nn.Module, a0: Tensor) -> Tensor:
    """act'(a0) for an elementwise activation: jvp with a ones tangent."""
    return torch.func.jvp(act, (a0,), (torch.ones_like(a0),))[1]


def _structured(x: Tensor, u: Tensor, h: float, s: _MLP, estimator: str, rank, out: Tensor,
                mb: float) -> None:
    dev = x.device
    m, d_in = u.shape
    w1 = _f32(s.lin1.weight, dev)  # [d_h, d_in]
    b1 = _f32(s.lin1.bias, dev)
    d_h = w1.shape[0]
    act = _module32(s.act, dev)
    gelu_mode = _gelu_mode(act, dev)  # exact GELU: aten gelu's out= variant, no allocation per chunk

    # the W2 product: v [R, d_h] (fp32, already scaled) -> per-row norms [R]
    w2_raw = s.lin2.weight.detach()
    if rank is not None:
        bmat = lowrank_factor(s.lin2, rank, dev)  # [d_h, k]
        d_y = bmat.shape[1]
        lowp = False
    else:
        lowp = (w2_raw.dtype in (torch.float16, torch.bfloat16) and dev.type in _LOWP_W2_DEVICES
                and w2_raw.device == dev)
        bmat = (w2_raw if lowp else _f32(w2_raw, dev)).T  # [d_h, d]
        d_y = bmat.shape[1]

    norm = s.norm
    groups = norm.groups if norm is not None else 1
    # per (token, direction) row: a+, a-, act(a+), act(a-) (fd) or the product (jvp), the output,
    # and for the merger the per-row W1 J u
    w_rows = [d_h] * (4 if estimator == "fd" else 1) + [d_y] + ([d_h] if norm is not None else [])
    tc, dc = chunk_plan(m, w_rows, mb)
    tc = min(tc, x.shape[0])

    if norm is None:
        t_dir = u @ w1.T  # W1 u_j [m, d_h], shared by every token
    else:
        g = _f32(norm.weight, dev)
        d_v = norm.d_v
        ug = (u.view(m, groups, d_v) * g)  # [m, P, d_v]
        w1p = w1.view(d_h, groups, d_v)
        # T_p = W1_p (g . u_p)  [P, m, d_h], shared by every token
        t_dir = torch.stack([ug[:, p] @ w1p[:, p].T for p in range(groups)]).contiguous()
        up = u.view(m, groups, d_v)

    inv2h = 1.0 / (2 * h)
    bufs: dict[int, tuple[Tensor, ...]] = {}

    def buffers(rows: int) -> tuple[Tensor, ...]:
        if rows not in bufs:
            bufs.clear()
            nb = 4 if estimator == "fd" else 1
            bufs[rows] = tuple(torch.empty(rows, d_h, device=dev) for _ in range(nb))
        return bufs[rows]

    # a0 = W1 x + b1 for all tokens in one product ([N, d_h], like the features themselves, not
    # N*m): the finite difference amplifies its rounding by 1/(2h), so it must not depend on how
    # the tokens are chunked (BLAS may sum differently for different row counts).
    xf = x.float()
    if norm is None:
        a0_all = torch.addmm(b1, xf, w1.T) if b1 is not None else xf @ w1.T
    else:
        xpa = xf.view(-1, groups, d_v)
        r_all = torch.sqrt(xpa.pow(2).mean(-1) + norm.eps)  # [N, P]
        y = (xpa * g / r_all[..., None]).reshape(-1, d_in)
        a0_all = torch.addmm(b1, y, w1.T) if b1 is not None else y @ w1.T
        del y, xpa
    for a in range(0, x.shape[0], tc):
        a0 = a0_all[a:a + tc]
        t = a0.shape[0]
        if norm is not None:
            xp = xf[a:a + t].view(t, groups, d_v)
            r = r_all[a:a + t]
            # C_p = W1_p (g . x_p)  [t, P, d_h]
            cgx = torch.stack([(xp[:, p] * g) @ w1p[:, p].T for p in range(groups)], 1)
            rinv = 1.0 / r
            coef = 1.0 / (d_v * r.pow(3))  # [t, P]
        gp = _act_prime(act, a0) if estimator == "jvp" else None
        for b in range(0, m, dc):
            k = min(dc, m - b)
            rws = t * k
            if norm is None:
                dw = t_dir[b:b + k][None]  # [1, k, d_h] broadcast over tokens
            else:
                # W1 J u = sum_p T_p / r_p - sum_p C_p (x_p . u_p) / (d_v r_p^3)
                tb = t_dir[:, b:b + k].reshape(groups, k * d_h)
                dw = (rinv @ tb).view(t, k, d_h)
                xu = torch.einsum("tpd,kpd->tkp", xp, up[b:b + k]) * coef[:, None, :]  # [t, k, P]
                dw = torch.baddbmm(dw, xu, cgx, alpha=-1.0)
            if estimator == "jvp":
                (v,) = buffers(rws)
                v = v.view(t, k, d_h)
                torch.mul(gp[:, None, :], dw, out=v)
                v = v.view(rws, d_h)
            else:
                ap, am, fp, fm = (q.view(t, k, d_h) for q in buffers(rws))
                if norm is None:
                    torch.add(a0[:, None, :], dw, alpha=h, out=ap)
                    torch.sub(a0[:, None, :], dw, alpha=h, out=am)
                else:
                    dw.mul_(h)
                    torch.add(a0[:, None, :], dw, out=ap)
                    torch.sub(a0[:, None, :], dw, out=am)
                if gelu_mode is not None:
                    torch._C._nn.gelu(ap, approximate=gelu_mode, out=fp)
                    torch._C._nn.gelu(am, approximate=gelu_mode, out=fm)
                    v = fp.sub_(fm).mul_(inv2h)
                else:
                    v = act(ap).sub_(act(am)).mul_(inv2h)
                v = v.reshape(rws, d_h)
            if lowp:
                yv = (v.to(bmat.dtype) @ bmat).float()
            else:
                yv = v @ bmat
            out[a:a + t] += torch.linalg.vector_norm(yv, dim=-1).view(t, k).sum(1)
    out /= m
