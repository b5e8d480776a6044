"""Zeroth-order token sensitivity at the multimodal projector (ZOO-Prune, Eq. 2-3 and Prop. 3.1).

"Zeroth-Order Gradient Estimation for Training-Free Visual Token Pruning" (ZOO-Prune, 2025;
shared/papers/zoo-prune-paper.txt). For pre-projector tokens x_i and the projector M:

    S(i) = 1/m sum_j || M(x_i + h u_j) - M(x_i - h u_j) || / 2h          (Eq. 2-3)

with m unit-norm Gaussian directions u_j shared by every token. Prop. 3.1: S(i) = E_u ||J(x_i) u||
+ O(h^2). ``token_sensitivity`` computes it with one of these estimators:

``exact`` (default)
    S(i) = ||J(x_i)||_F / sqrt(d_in) = sqrt(E_u ||J u||^2), the closed form of the m -> inf,
    h -> 0 limit in root-mean-square form: no directions, no step, no seed, no sampling noise
    (``zoocli.sensitivity.exact``, which derives it for both recognised structures). ``m``, ``h``
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
The first term is shared by all tokens. Structures are detected (``zoocli.sensitivity.structure``) from
attributes and module types (no model names). The activation is checked to act elementwise and
the RMSNorm is checked numerically against its formula. A thin wrapper (no parameters of its own, one child with a
recognised structure, equal outputs on a probe) is looked through: the adapters' row-wise
``MergerProjector`` around the Qwen merger is one. Qwen3-VL's merger (``Qwen3VLVisionPatchMerger``: an
affine LayerNorm per patch, then fc1 / GELU / fc2) is recognised the same way, with the LayerNorm
linearised at x (the RMSNorm's formulas on the centred x~_p = x_p - mean(x_p), the directions centred
too, beta in the forward; ``zoocli.sensitivity.exact`` derives its closed form). Anything else takes
the generic fp32 path.

Other choices and deviations (official code: AIM-SKKU/ZOO-Prune ``llava_arch.py``):

- **Precision.** The sampled estimators are float32 whatever the model dtype: perturbation,
  activation difference, norms, the first Linear. The official code runs the finite difference in
  fp16, where h*u (about 3e-4 per entry) is mostly rounded away; in bf16 it ranks tokens close to
  randomly. The one exception: on CUDA with fp16/bf16 weights, the big W2 product runs in the
  weight dtype on the already 1/(2h)-scaled fp32 difference, so no small quantity is rounded. On
  CPU, or with fp32 weights, it is fp32 too. A bf16 model therefore ranks tokens like its fp32 copy.
  ``exact`` has no small step to lose; its matrix products follow ``precision`` (default ``auto``:
  bf16 on CUDA for a bf16 / fp16 model, TF32 on CUDA for fp32, fp32 on CPU), the rest is fp32
  (``zoocli.sensitivity.exact``); bf16 products rank tokens at Spearman >= 0.99 against float64.
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

The package, in layers (each imports only those above it; nothing imports back):

- ``options``   option ranges and checks, the paper's sampled defaults, chunk sizing;
- ``structure`` what a projector is made of (Linear-act-Linear, the Qwen2.5-VL merger, anything
  else), the fp32 copies and the rank-k factor the estimators share;
- ``exact``     the closed forms (and the ``torch.func`` Jacobian for other projectors);
- ``sampled``   the directions and the fd / jvp / naive estimators;
- this module   ``token_sensitivity``, the one entry point, and the public names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoocli.errors import UsageError
from zoocli.sensitivity.exact import exact_sensitivity
from zoocli.sensitivity.options import (
    CPU_CHUNK_MB, ESTIMATORS, H_MAX, H_MIN, H_WHY, M_MAX, PRECISIONS, SAMPLED_DEFAULTS, SEED_MAX,
    SEED_MIN, SampledOptionError, check_options, chunk_plan, effective_mb, run_seed, tokens_per_chunk,
)
from zoocli.sensitivity.sampled import directions, sampled_sensitivity
from zoocli.sensitivity.structure import lowrank_factor, projector_structure

__all__ = [
    "CPU_CHUNK_MB", "ESTIMATORS", "H_MAX", "H_MIN", "H_WHY", "M_MAX", "PRECISIONS", "SAMPLED_DEFAULTS", "SEED_MAX",
    "SEED_MIN", "SampledOptionError", "check_options", "chunk_plan", "directions", "lowrank_factor",
    "run_seed", "projector_structure", "token_sensitivity", "tokens_per_chunk",
]


def _check(x, m, h, seed, estimator, rank, chunk_mb, precision) -> None:
    check_options(m, h, seed, estimator, rank, chunk_mb, precision)
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise UsageError(f"x must be a float tensor [N, d_in], got {getattr(x, 'shape', type(x))}")
    if precision == "tf32" and x.device.type != "cuda":
        raise UsageError(f"precision='tf32' needs a CUDA device (TF32 is a tensor-core format); x is on "
                         f"{x.device.type}: use fp32 or bf16 there")


@torch.no_grad()
def token_sensitivity(x: Tensor, projector: nn.Module, m: int | None = None, h: float | None = None,
                      seed: int | None = None, *, estimator: str = "exact", rank: int | None = None,
                      chunk_mb: float = 256, precision: str = "auto") -> Tensor:
    """Per-token sensitivity at the projector, float32 [N] on x.device.

    ``estimator="exact"`` (default): S(i) = ||J(x_i)||_F / sqrt(d_in), the closed form of the
    m -> inf, h -> 0 limit of Eq. 2-3 (root-mean-square form; ``zoocli.sensitivity.exact``).
    ``fd`` / ``jvp`` / ``naive``: S(i) = 1/m sum_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / 2h with
    ``m`` directions (default 64), step ``h`` (default 0.01) and ``seed`` (default 0); giving any
    of these three with ``exact`` is a ``SampledOptionError`` (a ``ValueError``).

    ``precision`` (``exact`` only): the dtype of its matrix products, ``auto`` (bf16 on CUDA for a
    bf16 / fp16 ``x``, TF32 on CUDA for fp32, fp32 elsewhere), ``fp32``, ``tf32`` (CUDA) or ``bf16``;
    norms, activation derivatives and the quadratic forms' accumulation stay fp32.

    ``x`` [N, d_in] pre-projector tokens; ``projector`` maps [..., d_in] -> [..., d] (for the
    Qwen2.5-VL merger, rows are the s^2*d_v patch concatenation). See the module docstring for the
    estimators, the recognised structures and the precision rules.
    """
    _check(x, m, h, seed, estimator, rank, chunk_mb, precision)
    s = projector_structure(projector)
    if rank is not None and s is None:
        raise UsageError(
            f"rank={rank} needs a Linear-act-Linear projector (or the Qwen2.5-VL merger); "
            f"{type(projector).__name__} has no recognised structure")
    dev = x.device
    out = torch.zeros(x.shape[0], dtype=torch.float32, device=dev)
    if s is not None and s.lin1.in_features != x.shape[1]:
        raise UsageError(f"x has {x.shape[1]} features, the projector expects {s.lin1.in_features}")
    if x.shape[0] == 0:
        return out
    mb = effective_mb(chunk_mb, dev)
    if estimator == "exact":
        return exact_sensitivity(x, projector, s, out, mb, precision)
    return sampled_sensitivity(
        x, projector, s, out, mb, estimator=estimator,
        m=SAMPLED_DEFAULTS["m"] if m is None else int(m),
        h=SAMPLED_DEFAULTS["h"] if h is None else float(h),
        seed=SAMPLED_DEFAULTS["seed"] if seed is None else int(seed),
        rank=None if rank is None else int(rank))
