"""The sampled estimators of Eq. 2-3: ``fd`` (the paper's finite differences), ``jvp`` (its
h -> 0 limit) and ``naive`` (two plain projector passes), on m seeded unit directions.

What each computes, the fast path for recognised structures and the precision rules are in the
package docstring (``zoocli.sensitivity``). Entry point: ``sampled_sensitivity``, called by
``token_sensitivity`` with the options already checked and defaulted.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoocli.sensitivity.options import chunk_plan
from zoocli.sensitivity.structure import MLP, act_prime, f32, lowrank_factor, module32, probe_width, rows_fn

# Run the big W2 product in the weight dtype (fp16/bf16) on CUDA; tests flip the CPU switch.
LOWP_W2_DEVICES = {"cuda"}


def directions(m: int, d: int, seed: int, device) -> Tensor:
    """m unit-norm Gaussian directions [m, d], float32, from a generator seeded with ``seed``."""
    g = torch.Generator(device=device).manual_seed(int(seed))
    u = torch.randn(m, d, generator=g, device=device, dtype=torch.float32)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)



def sampled_sensitivity(x: Tensor, projector: nn.Module, s: MLP | None, out: Tensor, mb: float, *,
                        estimator: str, m: int, h: float, seed: int, rank: int | None) -> Tensor:
    """S(i) = 1/m sum_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / 2h (or its jvp limit) into ``out``
    [N] float32, for ``x`` [N, d_in] with N > 0; ``s`` is ``projector_structure(projector)``."""
    dev = x.device
    u = directions(m, x.shape[1], seed, dev)
    if s is None or estimator == "naive":
        # the recognised module (maybe inside a wrapper) with its own row layout, else the projector
        rows = rows_fn(s, module32(s.module if s is not None else projector, dev))
        if estimator == "jvp":
            _generic_jvp(x, u, rows, out, mb)
        else:
            _naive(x, u, h, rows, out, mb)
    else:
        _structured(x, u, h, s, estimator, rank, out, mb)
    return out



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
    d = probe_width(rows, x)
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
    d = probe_width(rows, x)
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


def _w2_factor(lin2: nn.Linear, rank, dev: torch.device) -> tuple[Tensor, bool]:
    """The right factor of the W2 product [d_h, d_y] (W2^T, or the rank-k ``lowrank_factor``) and
    whether the product runs in the weight dtype (fp16/bf16 weights on a ``LOWP_W2_DEVICES`` device)."""
    if rank is not None:
        return lowrank_factor(lin2, rank, dev), False  # [d_h, k]
    w2_raw = lin2.weight.detach()
    lowp = (w2_raw.dtype in (torch.float16, torch.bfloat16) and dev.type in LOWP_W2_DEVICES
            and w2_raw.device == dev)
    return (w2_raw if lowp else f32(w2_raw, dev)).T, lowp  # [d_h, d]


class _Fast:
    """``fd`` / ``jvp`` on a recognised structure (see the module docstring). Built once per call:
    the fp32 weights, the activation, the W2 factor and the direction terms shared by every token.
    Then per chunk: the W1 J u rows (``w1_ju``), the activation difference or product (``fd_rows``
    / ``jvp_rows``) and the norms through W2 (``row_norms``)."""

    def __init__(self, u: Tensor, h: float, s: MLP, estimator: str, rank, dev: torch.device):
        self.u, self.h, self.inv2h, self.estimator, self.norm = u, h, 1.0 / (2 * h), estimator, s.norm
        self.dev = dev
        self.w1 = f32(s.lin1.weight, dev)  # [d_h, d_in]
        self.b1 = f32(s.lin1.bias, dev)
        self.d_h = self.w1.shape[0]
        self.act = module32(s.act, dev)
        self.gelu_mode = _gelu_mode(self.act, dev)  # exact GELU: aten gelu's out= variant, no allocation per chunk
        self.bmat, self.lowp = _w2_factor(s.lin2, rank, dev)
        self.g = None if s.norm is None else f32(s.norm.weight, dev)
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
        uc = self.up - self.up.mean(-1, keepdim=True) if self.norm.center else self.up  # LayerNorm: C u_p
        ug = (uc * self.g)  # [m, P, d_v]
        return torch.stack([ug[:, p] @ self.w1p[:, p].T for p in range(groups)]).contiguous()

    def first_layer(self, xf: Tensor) -> tuple[Tensor, Tensor | None]:
        """a0 = W1 x + b1 (after the merger's RMSNorm) for all tokens in one product, and the
        merger's r [N, P] (else None). [N, d_h], like the features themselves, not N*m: the finite
        difference amplifies its rounding by 1/(2h), so it must not depend on how the tokens are
        chunked (BLAS may sum differently for different row counts)."""
        w1, b1 = self.w1, self.b1
        if self.norm is None:
            return (torch.addmm(b1, xf, w1.T) if b1 is not None else xf @ w1.T), None
        xpa = self._centered(xf.view(-1, self.norm.groups, self.norm.d_v))
        r_all = torch.sqrt(xpa.pow(2).mean(-1) + self.norm.eps)  # [N, P]
        y = xpa * self.g / r_all[..., None]
        if self.norm.bias is not None:
            y = y + f32(self.norm.bias, self.dev)
        y = y.reshape(-1, xf.shape[1])
        return (torch.addmm(b1, y, w1.T) if b1 is not None else y @ w1.T), r_all

    def token_terms(self, xf: Tensor, r: Tensor) -> tuple[Tensor, ...]:
        """The merger's per-token terms for a chunk: x_p [t, P, d_v], C_p = W1_p (g . x_p)
        [t, P, d_h], 1/r_p and 1/(d_v r_p^3) [t, P]."""
        t, groups, d_v = xf.shape[0], self.norm.groups, self.norm.d_v
        xp = self._centered(xf.view(t, groups, d_v))
        cgx = torch.stack([(xp[:, p] * self.g) @ self.w1p[:, p].T for p in range(groups)], 1)
        return xp, cgx, 1.0 / r, 1.0 / (d_v * r.pow(3))

    def _centered(self, xp: Tensor) -> Tensor:
        """x~_p = x_p - mean(x_p) for a LayerNorm (Qwen3-VL merger), x_p itself for an RMSNorm. The
        LayerNorm's linearisation is the RMSNorm's on x~ with the directions centred (C u_p):
        J_p u_p = g o (C u_p / r_p - x~_p (x~_p . u_p) / (d_v r_p^3)), since x~_p . C u_p = x~_p . u_p."""
        return xp - xp.mean(-1, keepdim=True) if self.norm.center else xp

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


def _structured(x: Tensor, u: Tensor, h: float, s: MLP, estimator: str, rank, out: Tensor,
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
        gp = act_prime(f.act, a0) if estimator == "jvp" else None
        for b in range(0, m, dc):
            k = min(dc, m - b)
            dw = f.w1_ju(b, k, t, tok)
            v = f.jvp_rows(gp, dw, t, k) if estimator == "jvp" else f.fd_rows(a0, dw, t, k)
            out[a:a + t] += f.row_norms(v).view(t, k).sum(1)
    out /= m
