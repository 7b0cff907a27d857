"""
peak: GFLOP/s of a large fp32 (and bf16) matmul, this machine's practical peak, timed in this run. The train
section runs it first: whether bf16 is fast here decides its bf16 rows.

    python -m bench peak --peak_n 2048
"""
import statistics

import torch

from bench.common import take_turns


def matmul_gflops(dtype, n: int, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = take_turns({"mm": lambda: a @ b}, reps, 1)["mm"]
    return 2 * n ** 3 / statistics.median(times) / 1e9


def run(args, results) -> dict:
    out = {"fp32_gflops": matmul_gflops(torch.float32, args.peak_n)}
    # bf16 first at a small size: without native support it is ~50x slower, and the full size would take minutes
    out["bf16_gflops"] = matmul_gflops(torch.bfloat16, min(args.peak_n, 512))
    if bf16_is_fast(out) or args.bf16 == "on":
        out["bf16_gflops"] = matmul_gflops(torch.bfloat16, args.peak_n)
    return out


def bf16_is_fast(peak: dict) -> bool:
    return peak["bf16_gflops"] >= 0.5 * peak["fp32_gflops"]


def table(peak: dict) -> list:
    return ["", f"matmul peak          fp32 {peak['fp32_gflops']:7.1f} GFLOP/s   bf16 {peak['bf16_gflops']:7.1f} GFLOP/s"]
