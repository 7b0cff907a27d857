"""
gpu: model FLOPs utilisation (MFU) of nano-LLM training on one GPU. A ~100M-parameter model (dim 768, 16 layers),
bf16 autocast, torch.compile, fused AdamW; achieved FLOP/s against the card's dense bf16 peak (from the datasheet
when the card is known, and against a large bf16 matmul timed in the same run). It runs alone, with its own flags
and defaults (`python -m bench gpu --help`).

Run as:
    python -m bench gpu
    python -m bench gpu --batch_size 16 --seq_len 2048 --steps 20 --json
    python -m bench gpu --device cpu --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2 --seq_len 32 --batch_size 2 \
        --steps 1 --warmup 1 --no_compile --peak_n 256    # the same code path on a CPU, as tests/test_bench.py does
Target: >= 45% MFU on an H100. FLOPs per token from Transformer.flops_per_token (model/model.py): 6 x matmul
parameters (output projection included) + 6 x n_layers x seq_len x dim for causal attention (masked half not
counted, unlike the PaLM/nanoGPT 12 x ...).
"""
import argparse
import json
import statistics
import sys
import time

import torch

from bench.common import training_step
from model.LMConfig import LMConfig
from model.model import Transformer

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets; first match wins.
DATASHEET_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
                    ("B200", 2250), ("A100", 312), ("L40S", 362), ("L4", 121), ("RTX 4090", 165)]


def datasheet_peak(name: str):
    return next((tflops for key, tflops in DATASHEET_TFLOPS if key in name), None)


def timed(fn, steps: int, device: str) -> list:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def matmul_tflops(device: str, n: int, reps=20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    timed(lambda: a @ b, 3, device)
    return 2 * n ** 3 / statistics.median(timed(lambda: a @ b, reps, device)) / 1e12


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768, help="model width")
    parser.add_argument("--n_layers", type=int, default=16, help="Transformer blocks")
    parser.add_argument("--n_heads", type=int, default=12, help="attention heads (head_dim = dim / n_heads)")
    parser.add_argument("--n_kv_heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--vocab_size", type=int, default=6400, help="vocabulary size")
    parser.add_argument("--seq_len", type=int, default=1024, help="sequence length")
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (the first one compiles)")
    parser.add_argument("--compile_mode", default="default", help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--no_compile", action="store_true", help="eager, for comparison")
    parser.add_argument("--peak_n", type=int, default=8192, help="matrix size of the bf16 peak matmul")
    parser.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu only to check the script itself")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("python -m bench gpu: no CUDA GPU visible (torch.cuda.is_available() is False)")
    device_type = torch.device(args.device).type

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    config = LMConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    model = Transformer(config).to(args.device).train()
    optimizer = model.configure_optimizer(0.1, 3e-4, (0.9, 0.95), device_type)
    train_model = model if args.no_compile else torch.compile(model, mode=args.compile_mode)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=args.device)

    step = training_step(train_model, optimizer, batch, torch.device(args.device), "bfloat16")
    first_step_s = timed(step, 1, args.device)[0]
    timed(step, args.warmup - 1, args.device)
    step_s = statistics.median(timed(step, args.steps, args.device))

    flops_per_token = model.flops_per_token(args.seq_len)
    tokens = args.batch_size * args.seq_len
    achieved = tokens / step_s * flops_per_token / 1e12
    name = torch.cuda.get_device_name(args.device) if device_type == "cuda" else args.device
    sheet = datasheet_peak(name) if device_type == "cuda" else None
    measured = matmul_tflops(args.device, args.peak_n)
    result = {
        "device": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "config": vars(args), "tokens_per_step": tokens, "step_s": step_s, "tok_s": tokens / step_s,
        "first_step_s (compile)": first_step_s, "achieved_tflops": achieved,
        "datasheet_bf16_tflops": sheet, "mfu_vs_datasheet": achieved / sheet if sheet else None,
        "measured_matmul_tflops": measured, "fraction_of_measured_matmul": achieved / measured,
        "peak_memory_gb": torch.cuda.max_memory_allocated(args.device) / 1e9 if device_type == "cuda" else None,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{name}: {result['params_m']:.0f}M params, {tokens} tokens/step, bf16 autocast, "
              f"{'eager' if args.no_compile else 'torch.compile ' + args.compile_mode}")
        memory = f", peak memory {result['peak_memory_gb']:.1f} GB" if result["peak_memory_gb"] is not None else ""
        print(f"  step {step_s * 1e3:.1f} ms, {tokens / step_s:,.0f} tok/s, {achieved:.3g} TFLOP/s achieved "
              f"(first step{'' if args.no_compile else ' incl. compile'} {first_step_s:.0f} s{memory})")
        if sheet:
            print(f"  MFU {100 * achieved / sheet:.1f}% of the {sheet} TFLOP/s datasheet peak")
        print(f"  {100 * achieved / measured:.1f}% of a bf16 {args.peak_n}^3 matmul timed here ({measured:.3g} TFLOP/s)")
    return result
