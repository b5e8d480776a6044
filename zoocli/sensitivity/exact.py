"""The ``exact`` sensitivity estimator: S(i) = ||J(x_i)||_F / sqrt(d_in), in closed form.

ZOO-Prune (shared/papers/zoo-prune-paper.txt) estimates E_u ||J(x_i) u|| with m unit Gaussian
directions (Eq. 2-3, Prop. 3.1). For u uniform on the unit sphere E[u u^T] = I / d_in, so
E ||J u||^2 = ||J||_F^2 / d_in: the root-mean-square form of the m -> inf, h -> 0 limit. In these
dimensions ||J u|| concentrates around its RMS, so it ranks tokens like E ||J u|| (checked against
a float64 many-direction Monte Carlo in the tests and the kernel benchmark). No directions, no
step, no seed: nothing to sample.

**Linear-act-Linear** (LLaVA / LLaVA-NeXT): J_i = W2 diag(a_i) W1 with a_i = act'(W1 x_i + b1), so

    ||J_i||_F^2 = tr(W1^T D W2^T W2 D W1) = sum_jk a_j a_k (W2^T W2)_jk (W1 W1^T)_kj
                = a_i^T M a_i,    M = (W1 W1^T) o (W2^T W2)   (o: elementwise product).

M [d_h, d_h] is computed once per loaded projector and cached (like the SVD factor of ``rank``);
per image the cost is one [N, d_h] x [d_h, d_h] product instead of N*m rows through W2.

**Qwen2.5-VL merger** (RMSNorm ``ln_q`` per patch, then Linear-GELU-Linear on the s^2 = P patch
concatenation). Per patch p, with g the norm weight, r_p = sqrt(mean(x_p^2) + eps) and
v_p = x_p / ||x_p||, the RMSNorm's Jacobian (the linearisation ``jvp`` uses) is

    dy_p/dx_p = diag(g) (I / r_p - x_p x_p^T / (d_v r_p^3)) = diag(g) N_p / r_p,
    N_p = I - c_p v_p v_p^T,   c_p = ||x_p||^2 / (d_v r_p^2)   (c_p = 1 when eps = 0).

With W1 = [W1_1 ... W1_P] split by patch and A = W2 diag(a) W1 (a = act' at the token), the
merged token's Jacobian is J = [A_p diag(g) N_p / r_p]_p, so ||J||_F^2 = sum_p ||B_p N_p||_F^2 / r_p^2
with B_p = W2 diag(a) W1_p diag(g). N_p is symmetric and N_p^2 = I - (2 c_p - c_p^2) v_p v_p^T, so

    ||B_p N_p||_F^2 = ||B_p||_F^2 - (2 c_p - c_p^2) ||B_p v_p||^2,
    ||B_p||_F^2     = a^T M_p a,      M_p = (W1_p diag(g)^2 W1_p^T) o (W2^T W2)   (fixed, cached),
    B_p v_p         = W2 (a o w_p),   w_p = W1_p (g o v_p)                        (per token).

Per image: P quadratic forms with the cached M_p plus N*P rows through W2. No cancellation: v_p
is one direction of d_v, so ||B_p v_p||^2 is about ||B_p||_F^2 / d_v.

**Qwen3-VL merger** (``Qwen3VLVisionPatchMerger``: an affine LayerNorm per patch, or over the whole
row for the deepstack mergers' "postshuffle" norm, then fc1 / GELU / fc2). The same derivation with the
LayerNorm linearised at x. Per patch p, with C = I - 1 1^T / d_v (centering), x~_p = C x_p,
r_p = sqrt(mean(x~_p^2) + eps) (the LayerNorm's sigma) and y_p = g o x~_p / r_p + beta, the Jacobian is

    dy_p/dx_p = diag(g) (C / r_p - x~_p x~_p^T / (d_v r_p^3)) = diag(g) N_p / r_p,
    N_p = C - c_p v_p v_p^T,   v_p = x~_p / ||x~_p||,   c_p = ||x~_p||^2 / (d_v r_p^2) = var_p / (var_p + eps)

(differentiate x~ / sqrt(mean(x~^2) + eps) with dx~ = C dx and d mean(x~^2) = 2 x~^T C dx / d_v = 2 x~^T dx / d_v,
as C x~ = x~; beta drops out). With e = 1 / sqrt(d_v), C = I - e e^T and e is orthogonal to v_p (x~_p sums to
0), so N_p is symmetric and N_p^2 = C - (2 c_p - c_p^2) v_p v_p^T. With B_p = W2 diag(a) W1_p diag(g) as above,

    ||B_p N_p||_F^2 = tr(B_p N_p^2 B_p^T) = tr(B_p C B_p^T) - (2 c_p - c_p^2) ||B_p v_p||^2,
    tr(B_p C B_p^T) = a^T M_p a,   M_p = (K_p C K_p^T) o (W2^T W2),   K_p = W1_p diag(g),
    K_p C K_p^T     = K_p K_p^T - (K_p 1)(K_p 1)^T / d_v,
    B_p v_p         = W2 (a o w_p),   w_p = W1_p (g o v_p),

so ||J||_F^2 = sum_p (a^T M_p a - (2 c_p - c_p^2) ||W2 (a o w_p)||^2) / r_p^2: the RMSNorm formula with the
centering folded into the cached M_p (still fixed per loaded projector), x_p replaced by x~_p and beta in
the forward a0 = W1 y + b1. The float64 autograd Jacobian checks it (tests/test_sensitivity_layernorm.py).

**Anything else**: the per-token Jacobian with ``torch.func`` (``vmap`` of ``jacrev`` or
``jacfwd``, whichever is narrower), in chunks under ``chunk_mb``; a projector ``torch.func``
cannot differentiate is refused with a message naming the estimators that work (never a silent
fallback).

**Precision** (``precision``). The matrix products (W1 x, a M_p, and for the mergers w_p and
W2 (a o w_p); for other projectors the whole ``torch.func`` Jacobian) run in

- ``fp32``: float32, TF32 switched off on CUDA for the call (the CPU default: ``auto`` there);
- ``tf32``: float32 operands on TF32 tensor cores (CUDA only; ``auto`` for an fp32 ``x`` on CUDA);
- ``bf16``: operands rounded to bfloat16, fp32 accumulation, the result rounded to bf16 and cast
  back (``auto`` for a bf16 / fp16 ``x`` on CUDA; bf16 for fp16 too: it has fp32's exponent
  range, so no product of the cached M can overflow). The cached M is kept in bf16.

Everything else stays float32 whatever ``precision`` says: the norms and their r_p, c_p, the
activation derivative, the quadratic form's row dots (a M) . a and its sum over patches, the sqrt.
The bf16 products rank tokens like the fp32 ones (Spearman >= 0.99 against a float64 reference on
every projector kind, tests/test_sensitivity_precision.py; BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor, nn

from zoocli.errors import UsageError
from zoocli.sensitivity.options import chunk_plan
from zoocli.sensitivity.structure import (
    MLP, act_prime, cast, f32, module32, module_as, rows_fn, tensor_key,
)

_EXACT_M: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_matrices(s: MLP) -> None:
    """Drop the cached M of ``s`` (the kernel benchmark times a cold build)."""
    _EXACT_M.pop(s.lin2, None)


def exact_matrices(s: MLP, device, dtype: torch.dtype = torch.float32) -> Tensor:
    """M_p [P, d_h, d_h] (P = 1 without the merger norm), built in float32 and returned as
    ``dtype``; cached per second Linear (each dtype asked for) and recomputed when W1, W2 or the
    norm weight (data_ptr / _version / dtype / device) change."""
    device = torch.device(device)
    ts = [s.lin1.weight.detach(), s.lin2.weight.detach()]
    if s.norm is not None:
        ts.append(s.norm.weight.detach())
    key = tuple(tensor_key(t, device) for t in ts)
    hit = _EXACT_M.get(s.lin2)
    held = hit[1] if hit is not None and hit[0] == key else {}
    if dtype in held:
        return held[dtype]
    if not held:
        _EXACT_M.pop(s.lin2, None)  # free the stale M before building the new one
    m32 = held.get(torch.float32)
    if m32 is None:
        with _tf32(False, device):  # full fp32 whatever precision asked first (it is cached for all)
            m32 = _build_matrices(s, ts, device)
    held[dtype] = m32 if dtype == torch.float32 else m32.to(dtype)  # else the fp32 build is a temporary
    _EXACT_M[s.lin2] = (key, held)
    return held[dtype]


def _build_matrices(s: MLP, ts: list[Tensor], device: torch.device) -> Tensor:
    w1 = ts[0].to(device=device, dtype=torch.float32)
    w2 = ts[1].to(device=device, dtype=torch.float32)
    g2 = w2.T @ w2  # [d_h, d_h]
    if s.norm is None:
        return (w1 @ w1.T).mul_(g2)[None]
    d_h, groups, d_v = w1.shape[0], s.norm.groups, s.norm.d_v
    k = w1.view(d_h, groups, d_v) * ts[2].to(device=device, dtype=torch.float32)
    mats = torch.empty(groups, d_h, d_h, device=device)
    for p in range(groups):  # P = spatial_merge_size^2 (4), not per token
        torch.mm(k[:, p], k[:, p].T, out=mats[p])
        if s.norm.center:  # LayerNorm: K_p C K_p^T = K_p K_p^T - (K_p 1)(K_p 1)^T / d_v
            k1 = k[:, p].sum(1)
            mats[p].sub_(torch.outer(k1, k1).div_(d_v))
        mats[p].mul_(g2)
    return mats


def resolve_precision(precision: str, x: Tensor) -> str:
    """The products' precision in force for ``x`` (``precision`` checked already): ``auto`` is
    ``bf16`` on CUDA for a bf16 / fp16 ``x``, ``tf32`` on CUDA for an fp32 one, ``fp32`` otherwise
    (CPU, or a float64 ``x``)."""
    if precision != "auto":
        return precision
    if x.device.type != "cuda":
        return "fp32"
    if x.dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    return "tf32" if x.dtype == torch.float32 else "fp32"


@contextlib.contextmanager
def _tf32(on: bool, device: torch.device):
    """TF32 for float32 matmuls on or off for the block (CUDA's global switch, restored after);
    nothing to do elsewhere."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def exact_sensitivity(x: Tensor, projector: nn.Module, s: MLP | None, out: Tensor, mb: float,
                      precision: str = "fp32") -> Tensor:
    """||J(x_i)||_F / sqrt(d_in) into ``out`` [N] (float32); see the module docstring.
    ``precision``: ``fp32`` / ``tf32`` / ``bf16``, or ``auto`` (``resolve_precision``)."""
    precision = resolve_precision(precision, x)
    with _tf32(precision == "tf32", x.device):
        if s is None:
            return _generic_exact(x, projector, out, mb, precision)
        return _structured_exact(x, s, out, mb, precision == "bf16")


def _structured_exact(x: Tensor, s: MLP, out: Tensor, mb: float, bf16: bool) -> Tensor:
    dev = x.device
    mats = exact_matrices(s, dev, torch.bfloat16 if bf16 else torch.float32)
    w1, b1 = f32(s.lin1.weight, dev), f32(s.lin1.bias, dev)
    act = module32(s.act, dev)
    d_h, d_in = w1.shape
    norm = s.norm
    groups = 1 if norm is None else norm.groups
    # per token: x, a0, act', a @ M, and for the merger P rows of w_p and of W2 (a o w_p); the bf16
    # products add half-width copies of their operands and results (about half as much again)
    widths = (d_in, 3 * d_h) + ((groups * (d_h + s.lin2.out_features),) if norm else ())
    tc = chunk_plan(1, [1.5 * w for w in widths] if bf16 else widths, mb)[0]
    for a in range(0, x.shape[0], tc):
        if norm is None and bf16:  # a0 = W1 x + b1 as the bf16 projector computes it, then fp32
            b1h = cast(s.lin1.bias, dev, torch.bfloat16)
            xh, w1h = x[a:a + tc].to(torch.bfloat16), cast(s.lin1.weight, dev, torch.bfloat16)
            gp = act_prime(act, (torch.addmm(b1h, xh, w1h.T) if b1h is not None else xh @ w1h.T).float())
            q = (_mm16(gp, mats[0]) * gp).sum(-1)
        elif norm is None:
            xf = x[a:a + tc].float()
            a0 = torch.addmm(b1, xf, w1.T) if b1 is not None else xf @ w1.T
            gp = act_prime(act, a0)
            q = ((gp @ mats[0]) * gp).sum(-1)
        else:
            q = _merger_sq(x[a:a + tc].float(), s, mats, w1, b1, act, dev, bf16)
        out[a:a + tc] = torch.sqrt(q.clamp_min(0) / d_in)
    return out


def _mm16(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with ``a`` (float32) rounded to bf16 and ``b`` bf16 already: fp32 accumulation, the
    result rounded to bf16 and returned as float32."""
    return (a.to(torch.bfloat16) @ b).float()


def _merger_sq(xf: Tensor, s: MLP, mats: Tensor, w1: Tensor, b1: Tensor | None, act: nn.Module,
               dev: torch.device, bf16: bool = False) -> Tensor:
    """||J||_F^2 [t] of the merger for the rows ``xf`` [t, P*d_v] (fp32; with ``bf16`` its four
    products in bf16, and ``mats`` bf16)."""
    norm = s.norm
    groups, d_v, d_h = norm.groups, norm.d_v, w1.shape[0]
    g = f32(norm.weight, dev)
    xp = xf.view(-1, groups, d_v)
    if norm.center:  # LayerNorm: x~_p = x_p - mean(x_p)
        xp = xp - xp.mean(-1, keepdim=True)
    sq = xp.pow(2).sum(-1)  # ||x_p||^2 [t, P]
    r2 = sq / d_v + norm.eps  # r_p^2
    y = xp * g / r2.sqrt()[..., None]
    if norm.bias is not None:
        y = y + f32(norm.bias, dev)
    y = y.reshape(xf.shape[0], -1)
    c = sq / (d_v * r2)
    v = xp / sq.sqrt().clamp_min(1e-30)[..., None]  # v_p; c_p = 0 when x_p = 0
    if bf16:
        w1h, w2h = cast(s.lin1.weight, dev, torch.bfloat16), cast(s.lin2.weight, dev, torch.bfloat16)
        a0 = _mm16(y, w1h.T)
        a0 = a0 + b1 if b1 is not None else a0
        gp = act_prime(act, a0)  # [t, d_h]
        w = torch.einsum("tpd,hpd->tph", (v * g).to(torch.bfloat16), w1h.view(d_h, groups, d_v)).float()
        bv = _mm16(gp[:, None, :] * w, w2h.T)  # B_p v_p [t, P, d]
        frob = torch.stack([(_mm16(gp, mats[p]) * gp).sum(-1) for p in range(groups)], 1)  # [t, P]
    else:
        a0 = torch.addmm(b1, y, w1.T) if b1 is not None else y @ w1.T
        gp = act_prime(act, a0)  # [t, d_h]
        w = torch.einsum("tpd,hpd->tph", v * g, w1.view(d_h, groups, d_v))  # w_p [t, P, d_h]
        bv = (gp[:, None, :] * w) @ f32(s.lin2.weight, dev).T  # B_p v_p [t, P, d]
        frob = torch.stack([((gp @ mats[p]) * gp).sum(-1) for p in range(groups)], 1)  # [t, P]
    per_patch = frob - (2 * c - c * c) * bv.pow(2).sum(-1)
    return (per_patch / r2).sum(-1)


def _generic_exact(x: Tensor, projector: nn.Module, out: Tensor, mb: float, precision: str = "fp32") -> Tensor:
    """||J||_F / sqrt(d_in) with the per-token Jacobian from ``torch.func``: an fp32 copy of the
    module (a bf16 copy and bf16 rows with ``precision="bf16"``, the squares summed in fp32)."""
    dev = x.device
    d_in = x.shape[1]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows = rows_fn(None, module_as(projector, dev, dtype))
    try:
        d = int(rows(x[:1].to(dtype)).shape[-1])
        jac = torch.func.jacrev if d <= d_in else torch.func.jacfwd
        per_token = torch.func.vmap(jac(lambda xi: rows(xi[None])[0]))
        # the Jacobians [t, d, d_in] and the transform's intermediates (assume 3x)
        tc = chunk_plan(1, (3 * d * d_in,), mb)[0]
        for a in range(0, x.shape[0], tc):
            j = per_token(x[a:a + tc].to(dtype)).float()
            out[a:a + tc] = torch.sqrt(j.pow(2).sum((1, 2)) / d_in)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever torch.func cannot trace: refuse, name the others
        raise UsageError(
            f"estimator='exact' cannot differentiate {type(projector).__name__} with torch.func "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); use estimator='fd', 'jvp' or "
            f"'naive'") from e
    return out
