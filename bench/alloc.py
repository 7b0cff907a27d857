"""
alloc (CPU): our training step (training dtype: bf16 where the CPU has fast bf16, else fp32) with glibc's default
malloc thresholds vs what the training stages run with (model.runtime.keep_freed_memory: freed blocks kept for
reuse, no fresh pages per step). The setting is process-wide, so each side runs in its own process
(`python -m bench alloc --alloc_child default|keep`), --alloc_rounds times in turn; median step time per process,
the ratio's median. Measurements: docs/performance.md.

    python -m bench alloc --alloc_rounds 3
"""
import json
import statistics
import subprocess
import sys

import torch

from bench.common import ROOT, model_config, ratio, take_turns, training_step
from model.model import Transformer
from model.runtime import keep_freed_memory, training_precision

SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len", "batch_size", "steps", "warmup",
               "prompt_len", "new_tokens")


def child(args):
    """One side, in its own process: print the median step seconds as one JSON line."""
    if args.alloc_child == "keep" and not keep_freed_memory():
        sys.exit("keep_freed_memory did not apply (not glibc)")
    config = model_config(args)
    torch.manual_seed(0)
    model = Transformer(config).train()
    optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu")
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    dtype = training_precision("auto", torch.device("cpu"))
    times = take_turns({"step": training_step(model, optimizer, batch, dtype=dtype)}, args.steps, args.warmup)["step"]
    print(json.dumps({"step_s": statistics.median(times), "dtype": dtype}))


def run(args, results) -> dict:
    shape = [f"--{k}={getattr(args, k)}" for k in SHAPE_FLAGS]
    sides = {"default": [], "keep": []}
    for _ in range(args.alloc_rounds):
        for side, seconds in sides.items():
            run = subprocess.run([sys.executable, "-m", "bench", "alloc", "--alloc_child", side, *shape],
                                 cwd=ROOT, capture_output=True, text=True)
            if run.returncode:
                return {"skipped": (run.stderr.strip().splitlines() or ["failed"])[-1]}
            child_result = json.loads(run.stdout.splitlines()[-1])
            seconds.append(child_result["step_s"])
    tokens = args.batch_size * args.seq_len
    return {"dtype": child_result["dtype"], "tokens_per_step": tokens, "rounds": args.alloc_rounds,
            "default_tok_s": tokens / statistics.median(sides["default"]),
            "keep_tok_s": tokens / statistics.median(sides["keep"]), "keep_speedup": ratio(sides, "keep", "default")}


def table(alloc: dict) -> list:
    if "skipped" in alloc:
        return ["", f"malloc: skipped ({alloc['skipped']})"]
    return ["", f"training step under glibc malloc ({alloc['tokens_per_step']} tokens/step, {alloc['dtype']}, "
                f"{alloc['rounds']} processes per side)      tok/s  speed-up",
            f"  {'default thresholds (freed blocks go back to the kernel)':58s} {alloc['default_tok_s']:8.0f}      1.00",
            f"  {'keep_freed_memory (what the training stages run)':58s} {alloc['keep_tok_s']:8.0f} "
            f"{alloc['keep_speedup']:9.2f}"]
