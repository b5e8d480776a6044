"""On-paper (computed, not measured) selection share of TTFT and extra memory for LLaVA-NeXT-7B at
160 tokens on an H100 / H200 (BENCHMARKS.md, issue 10). Assumptions stated inline. Run:
python3 benchmarks/llava_next_on_paper.py"""
GF = 1e9
d, ff, L_llm = 4096, 11008, 32
llm_params = L_llm * (4 * d * d + 3 * d * ff)          # attention q,k,v,o + SwiGLU MLP (no embeddings/head)
seq = 160 + 48 + 40 + 1                                # kept + newline tokens (2x2 crops: 48 rows) + ~40 text tokens
prefill = 2 * llm_params * seq + 2 * L_llm * d * seq * seq + 2 * d * 32064   # + lm_head on the last token
dv, ffv, Lv, tok, crops = 1024, 4096, 24, 577, 5
vis = crops * (2 * Lv * (4 * dv * dv + 2 * dv * ffv) * tok + 2 * Lv * dv * tok * tok * 2)
proj = 2 * crops * 576 * (1024 * 4096 + 4096 * 4096)
N, dh, din = 2880, 4096, 1024
exact = 2 * N * din * dh + 2 * N * dh * dh + 2 * N * dh    # W1 x (fp32), a M (fp32), row dots
k_steps = 32                                           # 160 / 5 crops, batched: max quota steps
greedy = 2 * k_steps * N * d                           # one mat-vec per crop per step
greedy_bytes = k_steps * N * d * 4                     # fp32 unit rows read every step
for card, bw in (("H100 SXM", 3.35e12), ("H200", 4.8e12)):
    bf16, fp32, tf32 = 989e12, 67e12, 494e12           # dense peaks (NVIDIA datasheet, SXM)
    eff = 0.5                                          # assumed GEMM efficiency at these shapes
    t_llm = max(prefill / (eff * bf16), llm_params * 2 / bw)   # compute vs reading 13 GB of bf16 weights
    t_vis = vis / (eff * bf16)
    t_proj = proj / (eff * bf16)
    t_exact32 = exact / (0.7 * fp32) + 64e6 / bw
    t_exact_tf = exact / (eff * tf32) + 64e6 / bw
    launches = k_steps * 16 + 10                       # eager ops per batched greedy step (5 crops)
    t_greedy_gpu = max(launches * 4e-6, greedy_bytes / bw)     # ~4 us per small kernel on the GPU
    t_greedy_cpu = launches * 12e-6                    # ~12 us host issue per eager op (no sync)
    ttft0 = t_llm + t_vis + t_proj
    print(f"{card}: prefill {prefill/1e12:.2f} TFLOP -> {t_llm*1e3:.2f} ms; vision {vis/1e12:.2f} TFLOP -> {t_vis*1e3:.2f} ms; "
          f"projector {proj/GF:.0f} GFLOP -> {t_proj*1e3:.2f} ms; TTFT w/o selection {ttft0*1e3:.2f} ms")
    print(f"  exact {exact/GF:.1f} GFLOP: fp32 {t_exact32*1e3:.2f} ms, tf32 {t_exact_tf*1e3:.2f} ms; "
          f"greedy {greedy/GF:.2f} GFLOP, {greedy_bytes/1e9:.2f} GB, {launches} launches: GPU {t_greedy_gpu*1e3:.2f} ms, host issue {t_greedy_cpu*1e3:.2f} ms")
    for name, sel in (("fp32 exact + greedy (host-issue bound)", t_exact32 + max(t_greedy_cpu, t_greedy_gpu)),
                      ("fp32 exact + greedy (graph-captured, GPU bound)", t_exact32 + t_greedy_gpu),
                      ("tf32 exact + greedy (graph-captured)", t_exact_tf + t_greedy_gpu)):
        print(f"  {name}: {sel*1e3:.2f} ms = {100*sel/(ttft0+sel):.1f}% of TTFT")
print("llm params", llm_params / 1e9, "seq", seq)
mem_M = dh * dh * 4 / 2**20
mem_exact = N * (din + 3 * dh) * 4 / 2**20
mem_greedy = (N * d * 4 + N * d * 2) / 2**20
print(f"memory MB: M {mem_M:.0f}, exact temporaries {mem_exact:.0f}, greedy {mem_greedy:.0f}; peak extra {mem_M + max(mem_exact, mem_greedy):.0f}")
