"""`zoo score --vs-encoder`: the paper's Fig. 2 analysis on one image.

ZOO-Prune (Sec. 3.2, Fig. 2) justifies measuring sensitivity at the projector by comparing token
rankings with sensitivity measured through the vision encoder. Here, for each candidate token i,
S_enc(i) = mean_j ||F(E + h u_j e_i) - F(E - h u_j e_i)|| / 2h, where E are the encoder's input
embeddings of the token's tile (after CLIP's pre-layernorm), the perturbation moves token i's
input row only, and F runs the encoder layers up to the feature layer, drops CLS and applies the
projector to all tokens of the tile (Frobenius norm over every output token, since attention
spreads the change). Directions u_j are m unit Gaussian vectors shared by all tokens, as in Eq. 2.
The paper thresholds low-sensitivity tokens before ranking; we report the plain Spearman
correlation over all tokens (``zoocli.ops.spearman``, average ranks for ties). Runs in float32 (a float32 copy of the tower when the model is in
half precision: finite differences at h = 0.01 are rounding noise in bf16).
Supported: LLaVA-1.5 and LLaVA-NeXT (CLIP towers): the adapter's ``encoder_probe`` hands over
the tower as a function of its input embeddings; Qwen2.5-VL's windowed encoder is not covered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from zoocli.sensitivity import directions


@torch.no_grad()
def encoder_sensitivity(
    adapter, enc, m: int = 8, h: float = 0.01, seed: int = 0, batch: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """S_enc per candidate token [N] (float32, CPU), in the candidates' order, through the
    adapter's ``encoder_probe`` (the encoder as a function of its input embeddings)."""
    probe = adapter.encoder_probe(enc.prepared, enc.encoded)
    emb, rows, p = probe.emb, probe.rows, probe.patches
    u = directions(m, emb.shape[-1], seed, emb.device)  # [m, Dv]
    total = int(rows.numel())
    pairs = [(i, j) for i in range(total) for j in range(m)]
    acc = torch.zeros(total, dtype=torch.float64)
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        base = torch.stack([emb[int(rows[i]) // p] for i, _ in chunk])  # [B, 1+P, Dv]
        delta = torch.zeros_like(base)
        for b, (i, j) in enumerate(chunk):
            delta[b, int(rows[i]) % p + probe.offset] = h * u[j]
        diff = probe.features(base + delta) - probe.features(base - delta)  # [B, P, D]
        norms = diff.flatten(1).norm(dim=1).double().cpu() / (2 * h)
        for b, (i, _) in enumerate(chunk):
            acc[i] += norms[b]
        if progress:
            progress(min(s + batch, len(pairs)), len(pairs))
    return (acc / m).float()
