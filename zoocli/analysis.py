"""`zoo score --vs-encoder`: the paper's Fig. 2 analysis on one image.

ZOO-Prune (Sec. 3.2, Fig. 2) justifies measuring sensitivity at the projector by comparing token
rankings with sensitivity measured through the vision encoder. Here, for each candidate token i,
S_enc(i) = mean_j ||F(E + h u_j e_i) - F(E - h u_j e_i)|| / 2h, where E are the encoder's input
embeddings of the token's tile (after CLIP's pre-layernorm), the perturbation moves token i's
input row only, and F runs the encoder layers up to the feature layer, drops CLS and applies the
projector to all tokens of the tile (Frobenius norm over every output token, since attention
spreads the change). Directions u_j are m unit Gaussian vectors shared by all tokens, as in Eq. 2.
The paper thresholds low-sensitivity tokens before ranking; we report the plain Spearman
correlation over all tokens. Runs in float32 (a float32 copy of the tower when the model is in
half precision: finite differences at h = 0.01 are rounding noise in bf16).
Supported: LLaVA-1.5 and LLaVA-NeXT (CLIP towers). Qwen2.5-VL's windowed encoder is not covered.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from zoocli.errors import UsageError
from zoocli.sensitivity import directions


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: Tensor) -> Tensor:
        x = x.double().flatten()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # average ties
            mask = x == v
            if mask.sum() > 1:
                r[mask] = r[mask].mean()
        return r

    ra, rb = ranks(a.cpu()), ranks(b.cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra @ rb) / den) if den > 0 else float("nan")


@torch.no_grad()
def encoder_sensitivity(
    adapter, enc, m: int = 8, h: float = 0.01, seed: int = 0, batch: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """S_enc per candidate token [N] (float32, CPU), in the candidates' order."""
    if adapter.family not in ("llava", "llava_next"):
        raise UsageError(f"--vs-encoder supports LLaVA-1.5 and LLaVA-NeXT, not {adapter.family}")
    cfg = adapter.model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise UsageError("--vs-encoder needs a single vision feature layer")
    tower = adapter.model.model.vision_tower
    projector = adapter.projector
    if adapter.dtype != torch.float32:
        tower, projector = copy.deepcopy(tower).float(), copy.deepcopy(projector).float()
    vm = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a transformer in v4, not in v5
    pv = enc.prepared.inputs["pixel_values"]
    if adapter.family == "llava_next":
        pv = pv[0, : enc.encoded.state["n_tiles"]] if pv.dim() == 5 else pv[: enc.encoded.state["n_tiles"]]
        rows = enc.encoded.state["slot_row"]
        rows = rows[rows >= 0]
    else:
        rows = torch.arange(enc.n, device=pv.device)
    emb = vm.pre_layrnorm(vm.embeddings(pv.float()))  # [T, 1+P, Dv]
    n_layers = len(vm.encoder.layers)
    upto = layer if layer >= 0 else n_layers + 1 + layer  # hidden_states[k] = after k layers
    drop_cls = cfg.vision_feature_select_strategy == "default"
    p = emb.shape[1] - (1 if drop_cls else 0)

    def features(x: Tensor) -> Tensor:  # [B, 1+P, Dv] -> [B, P, D]
        for blk in vm.encoder.layers[:upto]:
            out = blk(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return projector(x[:, 1:] if drop_cls else x)

    u = directions(m, emb.shape[-1], seed, emb.device)  # [m, Dv]
    total = int(rows.numel())
    scores = torch.empty(total)
    pairs = [(i, j) for i in range(total) for j in range(m)]
    acc = torch.zeros(total, dtype=torch.float64)
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        base = torch.stack([emb[int(rows[i]) // p] for i, _ in chunk])  # [B, 1+P, Dv]
        delta = torch.zeros_like(base)
        for b, (i, j) in enumerate(chunk):
            pos = int(rows[i]) % p + (1 if drop_cls else 0)
            delta[b, pos] = h * u[j]
        diff = features(base + delta) - features(base - delta)  # [B, P, D]
        norms = diff.flatten(1).norm(dim=1).double().cpu() / (2 * h)
        for b, (i, _) in enumerate(chunk):
            acc[i] += norms[b]
        if progress:
            progress(min(s + batch, len(pairs)), len(pairs))
    scores = (acc / m).float()
    return scores
