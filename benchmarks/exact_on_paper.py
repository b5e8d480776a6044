"""On-paper (computed, not measured) time of the exact sensitivity for LLaVA-NeXT-7B on an H100, per
``precision`` (issue 23, item 9; BENCHMARKS.md "On paper: the exact sensitivity in bf16").

What is counted is what zoo's code dispatches: the call runs once on the CPU at full size (2880 tokens,
the 1024 -> 4096 -> 4096 GELU projector in bf16, the M build done beforehand, as it is cached per
projector) under a dispatch mode that records every ATen op with its FLOPs (matrix products) or the
bytes of its tensor inputs and outputs (everything else). The code path is the same on CUDA (only
TF32's switch differs), so the same ops would run there. The times then use the constants of
benchmarks/llava_next_on_paper.py: dense peaks H100 SXM bf16 989 TFLOP/s, TF32 494, fp32 67; 50% of
peak for bf16 / TF32 GEMMs, 70% for fp32; HBM 3.35 TB/s; ~4 us per small kernel on the GPU, ~12 us of
host issue per eager op. Run from the repository root: PYTHONPATH=$PWD python3 benchmarks/exact_on_paper.py

``--ranking`` instead measures (on the CPU, bf16 matmuls run there) what the precision costs in ranking
at this size: Spearman of precision=bf16 (and fp32) against the float64 closed form sqrt(a^T M a / d_in)
of the same weights, on the 1024 -> 4096 -> 4096 projector with CLIP-like tokens (576 per seed).
``--measure cuda`` times it on a GPU (what benchmarks/gpu.sh runs): the warm exact call at LLaVA-NeXT's
2880 tokens, bf16 weights, per precision (auto, bf16, tf32, fp32), median of 20 device-synchronised
runs, with its Spearman against the float64 closed form.
"""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoocli.kernel_bench import bench_projector, clip_like
from zoocli.ops import spearman
from zoocli.sensitivity import projector_structure
from zoocli.sensitivity import token_sensitivity
from zoocli.sensitivity.exact import exact_sensitivity
from zoocli.sensitivity.structure import act_prime

PEAK = {torch.bfloat16: 989e12, torch.float16: 989e12, "tf32": 494e12, torch.float32: 67e12}
EFF = {torch.bfloat16: 0.5, torch.float16: 0.5, "tf32": 0.5, torch.float32: 0.7}
HBM, GPU_OP, HOST_OP = 3.35e12, 4e-6, 12e-6
GEMMS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.matmul"}
VIEWS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.expand", "aten.slice",
         "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.permute", "aten.alias", "aten.detach",
         "aten.reshape", "aten.as_strided", "aten.is_same_size", "aten._has_same_storage_numel"}
# (views and metadata checks move no data and launch no kernel)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _bytes(t: torch.Tensor) -> int:
    """What reading (or writing) ``t`` moves: its elements, or its storage if smaller (a broadcast)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class Count(TorchDispatchMode):
    """Per op: (name, GEMM FLOPs and operand dtype, or bytes read + written)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        if name in VIEWS:
            return out
        if name in GEMMS:
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            flops = 2 * a.numel() * b.shape[-1]
            self.rows.append((name, "gemm", flops, a.dtype))
        else:
            nbytes = sum(_bytes(t) for t in _tensors(args)) + sum(_bytes(t) for t in _tensors(out))
            self.rows.append((name, "mem", nbytes, None))
        return out


def count(precision: str, dtype=torch.bfloat16, n=2880, seed=0, chunk_mb=256):
    """The ops of one warm exact call at CUDA's chunking (``chunk_mb`` as given: the CPU cap of
    ``token_sensitivity`` is skipped by calling the estimator itself; 256 MB is zoo's default and
    holds all 2880 tokens in one chunk)."""
    proj = bench_projector(1024, 4096, 4096, "decay", seed).to(dtype)
    x = clip_like(n, 1024, seed).to(dtype)
    # tf32 on CPU is refused (a tensor-core format): its ops are fp32's, only the GEMM rate differs
    run = "fp32" if precision == "tf32" else precision
    s = projector_structure(proj)
    exact_sensitivity(x[:2], proj, s, torch.zeros(2), chunk_mb, run)  # fills the M cache (once per projector)
    out = torch.zeros(n)
    with Count() as c:
        exact_sensitivity(x, proj, s, out, chunk_mb, run)
    return c.rows


def on_paper(rows, precision: str) -> dict:
    gemm = sum(v for _, k, v, _ in rows if k == "gemm")
    t_gemm = 0.0
    for _, k, v, dt in rows:
        if k == "gemm":
            key = "tf32" if precision == "tf32" and dt == torch.float32 else dt
            t_gemm += v / (EFF[key] * PEAK[key])
    m_bytes = 4096 * 4096 * (2 if precision == "bf16" else 4)  # the cached M, read once
    mem = sum(v for _, k, v, _ in rows if k == "mem")
    t_mem = (mem + m_bytes) / HBM
    ops = len(rows)
    gpu = max(t_gemm + t_mem, ops * GPU_OP)  # as llava_next_on_paper.py's greedy: work or launch floor
    return {"ops": ops, "gemm_gflop": gemm / 1e9, "t_gemm": t_gemm, "mem_gb": mem / 1e9,
            "t_mem": t_mem, "t_gpu": gpu, "t_host": ops * HOST_OP, "t": max(gpu, ops * HOST_OP)}


def ranking(seeds=(0, 1), n=576):
    for seed in seeds:
        for dtype in (torch.float32, torch.bfloat16):
            p, x = bench_projector(1024, 4096, 4096, "decay", seed).to(dtype), clip_like(n, 1024, seed).to(dtype)
            w1, b1, w2 = (t.detach().double() for t in (p[0].weight, p[0].bias, p[2].weight))
            a = act_prime(torch.nn.GELU().double(), x.double() @ w1.T + b1)
            ref = (((a @ ((w1 @ w1.T) * (w2.T @ w2))) * a).sum(-1) / 1024).sqrt()
            got = {prec: token_sensitivity(x, p, precision=prec).double() for prec in ("fp32", "bf16")}
            print(f"seed {seed}, {str(dtype).removeprefix('torch.')} weights and tokens: " + "; ".join(
                f"{prec} Spearman {spearman(v, ref):.5f}, max rel. error {float((v / ref - 1).abs().max()):.1e}"
                for prec, v in got.items()))


def measure(device: str, n=2880, repeats=20, seed=0):
    from zoocli.timing import Timer, device_sync, summarize

    dev = torch.device(device)
    timer = Timer(sync=lambda: device_sync(dev))
    p = bench_projector(1024, 4096, 4096, "decay", seed).to(device=dev, dtype=torch.bfloat16)
    x = clip_like(n, 1024, seed).to(device=dev, dtype=torch.bfloat16)
    w1, b1, w2 = (t.detach().double() for t in (p[0].weight, p[0].bias, p[2].weight))
    a = act_prime(torch.nn.GELU().double(), x.double() @ w1.T + b1)
    ref = (((a @ ((w1 @ w1.T) * (w2.T @ w2))) * a).sum(-1) / 1024).sqrt().cpu()
    del a, w1, w2
    for prec in ("auto", "bf16", "tf32", "fp32"):
        if prec == "tf32" and dev.type != "cuda":
            continue
        for _ in range(3):  # warm-up, the M build of this dtype included
            got = token_sensitivity(x, p, precision=prec)
        ms = []
        for _ in range(repeats):
            t0 = timer.now()
            got = token_sensitivity(x, p, precision=prec)
            ms.append((timer.now() - t0) * 1e3)
        st = summarize(ms)
        print(f"{device} exact, {n} tokens, bf16 weights, precision={prec}: median {st['median']:.3f} ms "
              f"(min {st['min']:.3f}, max {st['max']:.3f}; {repeats} runs); Spearman vs float64 "
              f"{spearman(got.cpu().double(), ref):.5f}")


if __name__ == "__main__" and "--measure" in sys.argv:
    measure(sys.argv[sys.argv.index("--measure") + 1])
elif __name__ == "__main__" and "--ranking" in sys.argv:
    ranking()
elif __name__ == "__main__":
    ttft0 = 10.65e-3  # TTFT without selection, hardware bound (benchmarks/llava_next_on_paper.py)
    # the fused greedy (BENCHMARKS.md, issue 18's on-paper section): 0.45 ms with the fp32 Gram the
    # code forms today, 0.20 ms with a TF32 Gram (not switched on)
    greedies = (("fp32 Gram", 0.45e-3), ("TF32 Gram", 0.20e-3))
    for prec in ("bf16", "tf32", "fp32"):
        rows = count(prec)
        r = on_paper(rows, prec)
        gemm_only = r["t_gemm"] + 4096 * 4096 * (2 if prec == "bf16" else 4) / HBM
        share = lambda t: 100 * t / (ttft0 + t)  # noqa: E731
        print(f"exact, precision={prec}: {r['ops']} ops; GEMMs {r['gemm_gflop']:.1f} GFLOP -> "
              f"{r['t_gemm'] * 1e3:.3f} ms; other ops {r['mem_gb']:.2f} GB + the M read -> "
              f"{r['t_mem'] * 1e3:.3f} ms; GPU {r['t_gpu'] * 1e3:.3f} ms, host issue {r['t_host'] * 1e3:.3f} ms "
              f"-> {r['t'] * 1e3:.3f} ms (GEMMs + M read only, the earlier sections' method: {gemm_only * 1e3:.3f} ms)")
        for gname, g in greedies:
            print(f"  + greedy with {gname} {g * 1e3:.2f} ms: selection {(r['t'] + g) * 1e3:.3f} ms = "
                  f"{share(r['t'] + g):.1f}% of TTFT (GEMMs + M read only: {(gemm_only + g) * 1e3:.3f} ms = "
                  f"{share(gemm_only + g):.1f}%)")
        names: dict[str, list] = {}
        for name, kind, v, _ in rows:
            names.setdefault(name.removeprefix("aten."), []).append(v / (1e9 if kind == "gemm" else 1e6))
        print("  ops (GFLOP for GEMMs, MB otherwise):",
              ", ".join(f"{k} x{len(v)} ({sum(v):.1f})" for k, v in sorted(names.items())))
