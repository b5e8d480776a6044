"""Micro-benchmark of ZOO-Prune's greedy selection (``zoocli.greedy``) per backend. Not a test.

For each shape (LLaVA-1.5 576 -> 64; LLaVA-NeXT per crop, 5 x 576 -> 5 x 32, and global,
2,880 -> 160; Qwen2.5-VL, 999 merged tokens of a 1024 x 768 image -> 111) and each backend
(``torch``: the Gram-form Python loop; ``triton``: the fused kernel), it counts what one
``zoo_select`` call dispatches (``zoocli.opcount``: ATen ops, host syncs, kernel launches),
times it (device-synchronised, warm-up excluded, backends interleaved within each repeat), and
checks that the picks equal the torch backend's. Inputs are random unit-scale features and
sensitivities (the selection's cost does not depend on their values).

Triton on a CPU runs through its interpreter (``TRITON_INTERPRET=1``): its counts are the GPU's
(the interpreter's own memory emulation is not counted), its times are not (``interpreted``).
"""

from __future__ import annotations

import torch

from zoocli.opcount import OpCounter
from zoocli.timing import Timer, device_sync, summarize

# name, scopes, tokens per scope, feature width, picks per scope
SHAPES = (
    ("LLaVA-1.5 576>64", 1, 576, 4096, 64),
    ("NeXT 5x576>5x32", 5, 576, 4096, 32),
    ("NeXT 2880>160", 1, 2880, 4096, 160),
    ("Qwen2.5 999>111", 1, 999, 3584, 111),
)


BACKENDS = ("torch", "triton")


def unavailable_backends(device) -> dict[str, str]:
    """The backends that cannot run on ``device`` here, each with why (``triton`` is optional)."""
    import importlib.util

    from zoocli.greedy import resolve_backend

    if importlib.util.find_spec("triton") is None:
        return {"triton": "triton not installed"}
    try:
        resolve_backend("triton", device)
    except ValueError as e:
        return {"triton": str(e).removeprefix("select backend 'triton' ").split("; use ")[0]}
    return {}


def available_backends(device) -> list[str]:
    skip = unavailable_backends(device)
    return [be for be in BACKENDS if be not in skip]


def _interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (asked only for triton rows: importing the kernel
    module needs triton, which may not be installed)."""
    from zoocli.greedy_triton import interpreted

    return interpreted()


def selection_bench(device="cpu", repeats: int = 5, warmup: int = 1, shapes=None, backends=None,
                    seed: int = 0, progress=None) -> list[dict]:
    """Rows (JSON-able dicts) of shape x backend: ops / syncs / launches per call, median / min /
    max ms, and whether the picks equal the torch backend's. A backend that cannot run here
    (Triton not installed, or no CUDA and no interpreter) gets a row per shape that says why
    (``unavailable``) and holds no numbers."""
    from zoocli.methods.zoo import zoo_select

    shapes = SHAPES if shapes is None else shapes
    dev = torch.device(device)
    skipped = {} if backends else unavailable_backends(dev)
    backends = list(backends or available_backends(dev))
    interpreted = False
    if "triton" in backends:
        from zoocli.greedy_triton import interpreted as _interp

        interpreted = _interp()
    timer = Timer(sync=lambda: device_sync(dev))
    done = progress or (lambda stage: None)
    rows = []
    for name, b, n, dim, k in shapes:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(b, n, dim, generator=g).to(dev)
        s = torch.rand(b, n, generator=g).to(dev)
        picks, counts = {}, {}
        for be in backends:
            picks[be] = zoo_select(s, z, k, backend=be)  # also the first (untimed) call
            with OpCounter() as c:
                zoo_select(s, z, k, backend=be)
            counts[be] = c
        times = {be: [] for be in backends}
        for rep in range(warmup + repeats):
            order = backends if rep % 2 == 0 else backends[::-1]  # interleaved
            for be in order:
                timer.ms.clear()
                with timer("select"):
                    zoo_select(s, z, k, backend=be)
                if rep >= warmup:
                    times[be].append(timer.ms["select"])
        for be in backends:
            c = counts[be]
            rows.append({
                "shape": name, "scopes": b, "tokens": n, "dim": dim, "k": k, "backend": be,
                "device": str(dev), "ops": c.ops, "syncs": c.syncs, "launches": c.launches,
                "ops_per_step": round(c.ops / k, 2),
                "same_picks": bool(torch.equal(picks[be].cpu(), picks["torch"].cpu())),
                "interpreted": be == "triton" and dev.type == "cpu" and interpreted,
                **{f"{key}_ms": v for key, v in summarize(times[be]).items()},
            })
        for be, why in skipped.items():
            rows.append({"shape": name, "scopes": b, "tokens": n, "dim": dim, "k": k, "backend": be,
                         "device": str(dev), "unavailable": why})
        done(name)
    return rows
