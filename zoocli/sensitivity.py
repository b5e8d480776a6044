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
The first term is shared by all tokens. Structures are detected (``zoocli.projector``) from
attributes and module types (no model names). The activation is checked to act elementwise and
the RMSNorm is checked numerically against its formula. A thin wrapper (no parameters of its own, one child with a
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

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from zoocli.errors import UsageError
from zoocli.projector import _MLP, _f32, _module32, _rows_fn, _structure, lowrank_factor

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
# estimators


class SampledOptionError(UsageError, ValueError):
    """``m``, ``h`` or ``seed`` given with the ``exact`` estimator (they belong to the sampled ones)."""


# the paper's sampled defaults (Eq. 2-3), used by fd / jvp / naive when m / h / seed are None
SAMPLED_DEFAULTS = {"m": 64, "h": 0.01, "seed": 0}


def run_seed(estimator: str, seed):
    """The seed a run passes on: the run's seed drives the sampled estimators' directions; the
    closed-form ``exact`` takes none (and refuses one, ``SampledOptionError``)."""
    return None if estimator == "exact" else seed


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


def _w2_factor(lin2: nn.Linear, rank, dev: torch.device) -> tuple[Tensor, bool]:
    """The right factor of the W2 product [d_h, d_y] (W2^T, or the rank-k ``lowrank_factor``) and
    whether the product runs in the weight dtype (fp16/bf16 weights on a ``_LOWP_W2_DEVICES`` device)."""
    if rank is not None:
        return lowrank_factor(lin2, rank, dev), False  # [d_h, k]
    w2_raw = lin2.weight.detach()
    lowp = (w2_raw.dtype in (torch.float16, torch.bfloat16) and dev.type in _LOWP_W2_DEVICES
            and w2_raw.device == dev)
    return (w2_raw if lowp else _f32(w2_raw, dev)).T, lowp  # [d_h, d]


class _Fast:
    """``fd`` / ``jvp`` on a recognised structure (see the module docstring). Built once per call:
    the fp32 weights, the activation, the W2 factor and the direction terms shared by every token.
    Then per chunk: the W1 J u rows (``w1_ju``), the activation difference or product (``fd_rows``
    / ``jvp_rows``) and the norms through W2 (``row_norms``)."""

    def __init__(self, u: Tensor, h: float, s: _MLP, estimator: str, rank, dev: torch.device):
        self.u, self.h, self.inv2h, self.estimator, self.norm = u, h, 1.0 / (2 * h), estimator, s.norm
        self.dev = dev
        self.w1 = _f32(s.lin1.weight, dev)  # [d_h, d_in]
        self.b1 = _f32(s.lin1.bias, dev)
        self.d_h = self.w1.shape[0]
        self.act = _module32(s.act, dev)
        self.gelu_mode = _gelu_mode(self.act, dev)  # exact GELU: aten gelu's out= variant, no allocation per chunk
        self.bmat, self.lowp = _w2_factor(s.lin2, rank, dev)
        self.g = None if s.norm is None else _f32(s.norm.weight, dev)
        self.t_dir = self._direction_terms()
        self._bufs: dict[int, tuple[Tensor, ...]] = {}

    def row_widths(self) -> list[int]:
        """fp32 widths per (token, direction) row: a+, a-, act(a+), act(a-) (fd) or the product
        (jvp), the output, and for the merger the per-row W1 J u."""
        return ([self.d_h] * (4 if self.estimator == "fd" else 1) + [self.bmat.shape[1]]
                + ([self.d_h] if self.norm is not None else []))

    def _direction_terms(self) -> Tensor:
        """W1 u_j [m, d_h], or for the merger T_p = W1_p (g . u_p) [P, m, d_h]: shared by every token."""
        if self.norm is None:
            return self.u @ self.w1.T
        m, groups, d_v = self.u.shape[0], self.norm.groups, self.norm.d_v
        self.up = self.u.view(m, groups, d_v)
        self.w1p = self.w1.view(self.d_h, groups, d_v)
        ug = (self.up * self.g)  # [m, P, d_v]
        return torch.stack([ug[:, p] @ self.w1p[:, p].T for p in range(groups)]).contiguous()

    def first_layer(self, xf: Tensor) -> tuple[Tensor, Tensor | None]:
        """a0 = W1 x + b1 (after the merger's RMSNorm) for all tokens in one product, and the
        merger's r [N, P] (else None). [N, d_h], like the features themselves, not N*m: the finite
        difference amplifies its rounding by 1/(2h), so it must not depend on how the tokens are
        chunked (BLAS may sum differently for different row counts)."""
        w1, b1 = self.w1, self.b1
        if self.norm is None:
            return (torch.addmm(b1, xf, w1.T) if b1 is not None else xf @ w1.T), None
        xpa = xf.view(-1, self.norm.groups, self.norm.d_v)
        r_all = torch.sqrt(xpa.pow(2).mean(-1) + self.norm.eps)  # [N, P]
        y = (xpa * self.g / r_all[..., None]).reshape(-1, xf.shape[1])
        return (torch.addmm(b1, y, w1.T) if b1 is not None else y @ w1.T), r_all

    def token_terms(self, xf: Tensor, r: Tensor) -> tuple[Tensor, ...]:
        """The merger's per-token terms for a chunk: x_p [t, P, d_v], C_p = W1_p (g . x_p)
        [t, P, d_h], 1/r_p and 1/(d_v r_p^3) [t, P]."""
        t, groups, d_v = xf.shape[0], self.norm.groups, self.norm.d_v
        xp = xf.view(t, groups, d_v)
        cgx = torch.stack([(xp[:, p] * self.g) @ self.w1p[:, p].T for p in range(groups)], 1)
        return xp, cgx, 1.0 / r, 1.0 / (d_v * r.pow(3))

    def w1_ju(self, b: int, k: int, t: int, tok) -> Tensor:
        """W1 J u for directions b..b+k: [1, k, d_h] shared by the tokens, or for the merger
        [t, k, d_h] = sum_p T_p / r_p - sum_p C_p (x_p . u_p) / (d_v r_p^3)."""
        if tok is None:
            return self.t_dir[b:b + k][None]  # broadcast over tokens
        xp, cgx, rinv, coef = tok
        tb = self.t_dir[:, b:b + k].reshape(self.norm.groups, k * self.d_h)
        dw = (rinv @ tb).view(t, k, self.d_h)
        xu = torch.einsum("tpd,kpd->tkp", xp, self.up[b:b + k]) * coef[:, None, :]  # [t, k, P]
        return torch.baddbmm(dw, xu, cgx, alpha=-1.0)

    def _buffers(self, rows: int) -> tuple[Tensor, ...]:
        if rows not in self._bufs:
            self._bufs.clear()
            nb = 4 if self.estimator == "fd" else 1
            self._bufs[rows] = tuple(torch.empty(rows, self.d_h, device=self.dev) for _ in range(nb))
        return self._bufs[rows]

    def jvp_rows(self, gp: Tensor, dw: Tensor, t: int, k: int) -> Tensor:
        """act'(a0) (.) W1 J u, [t*k, d_h]."""
        (v,) = self._buffers(t * k)
        v = v.view(t, k, self.d_h)
        torch.mul(gp[:, None, :], dw, out=v)
        return v.view(t * k, self.d_h)

    def fd_rows(self, a0: Tensor, dw: Tensor, t: int, k: int) -> Tensor:
        """(act(a0 + h W1 J u) - act(a0 - h W1 J u)) / 2h, [t*k, d_h]."""
        ap, am, fp, fm = (q.view(t, k, self.d_h) for q in self._buffers(t * k))
        if self.norm is None:
            torch.add(a0[:, None, :], dw, alpha=self.h, out=ap)
            torch.sub(a0[:, None, :], dw, alpha=self.h, out=am)
        else:
            dw.mul_(self.h)
            torch.add(a0[:, None, :], dw, out=ap)
            torch.sub(a0[:, None, :], dw, out=am)
        if self.gelu_mode is not None:
            torch._C._nn.gelu(ap, approximate=self.gelu_mode, out=fp)
            torch._C._nn.gelu(am, approximate=self.gelu_mode, out=fm)
            v = fp.sub_(fm).mul_(self.inv2h)
        else:
            v = self.act(ap).sub_(self.act(am)).mul_(self.inv2h)
        return v.reshape(t * k, self.d_h)

    def row_norms(self, v: Tensor) -> Tensor:
        """||W2 v|| per row [R] (or ||v B|| with the rank-k factor)."""
        yv = (v.to(self.bmat.dtype) @ self.bmat).float() if self.lowp else v @ self.bmat
        return torch.linalg.vector_norm(yv, dim=-1)


def _structured(x: Tensor, u: Tensor, h: float, s: _MLP, estimator: str, rank, out: Tensor,
                mb: float) -> None:
    f = _Fast(u, h, s, estimator, rank, x.device)
    m = u.shape[0]
    tc, dc = chunk_plan(m, f.row_widths(), mb)
    tc = min(tc, x.shape[0])
    xf = x.float()
    a0_all, r_all = f.first_layer(xf)
    for a in range(0, x.shape[0], tc):
        a0 = a0_all[a:a + tc]
        t = a0.shape[0]
        tok = None if s.norm is None else f.token_terms(xf[a:a + t], r_all[a:a + t])
        gp = _act_prime(f.act, a0) if estimator == "jvp" else None
        for b in range(0, m, dc):
            k = min(dc, m - b)
            dw = f.w1_ju(b, k, t, tok)
            v = f.jvp_rows(gp, dw, t, k) if estimator == "jvp" else f.fd_rows(a0, dw, t, k)
            out[a:a + t] += f.row_norms(v).view(t, k).sum(1)
    out /= m
