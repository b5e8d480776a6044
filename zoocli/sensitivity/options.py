"""The sensitivity options and their checks, and how work is cut into chunks.

Shared by every estimator of the package (``zoocli.sensitivity``): the option ranges (with the
measurements behind them), the paper's sampled defaults, ``check_options`` / ``run_seed``, and
``chunk_plan``, which sizes the (token, direction) chunks so temporaries stay under ``chunk_mb``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from zoocli.errors import UsageError

ESTIMATORS = ("exact", "fd", "jvp", "naive")
# The exact estimator's matrix products (``zoocli.sensitivity.exact``): ``auto`` is bf16 on CUDA for
# a bf16 / fp16 model, TF32 on CUDA for fp32, fp32 elsewhere; the rest is fp32 whatever it says.
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
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

# the paper's sampled defaults (Eq. 2-3), used by fd / jvp / naive when m / h / seed are None
SAMPLED_DEFAULTS = {"m": 64, "h": 0.01, "seed": 0}


class SampledOptionError(UsageError, ValueError):
    """``m``, ``h`` or ``seed`` given with the ``exact`` estimator (they belong to the sampled ones)."""


def run_seed(estimator: str, seed):
    """The seed a run passes on: the run's seed drives the sampled estimators' directions; the
    closed-form ``exact`` takes none (and refuses one, ``SampledOptionError``)."""
    return None if estimator == "exact" else seed


def check_options(m=None, h=None, seed=None, estimator="exact", rank=None, chunk_mb=256,
                  precision="auto") -> None:
    """Raise ``UsageError`` for option values ``token_sensitivity`` cannot take.

    ``m``, ``h`` and ``seed`` are None for "not given"; with ``estimator="exact"`` giving any of
    them is a ``SampledOptionError`` (a ``UsageError`` and a ``ValueError``). ``precision`` other
    than ``auto`` belongs to the exact estimator (the device check for ``tf32`` needs the input
    and is ``token_sensitivity``'s)."""
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
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision != "auto" and estimator != "exact":
        raise UsageError(
            f"precision applies to the exact estimator, not {estimator} (the sampled estimators keep "
            f"their own rule: fp32, the W2 product in the weight dtype on CUDA)")
    if (isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float))
            or not math.isfinite(chunk_mb) or chunk_mb <= 0):
        raise UsageError(f"chunk_mb must be a positive number, got {chunk_mb!r}")


# -----------------------------------------------------------------------------------------------
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


def effective_mb(chunk_mb: float, device) -> float:
    """The chunk cap in force on ``device``: on CPU at most ``CPU_CHUNK_MB`` (cache locality)."""
    return min(chunk_mb, CPU_CHUNK_MB) if device.type == "cpu" else chunk_mb
