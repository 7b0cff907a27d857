"""
train: tokens/s of forward + backward + AdamW step. HF: LlamaForCausalLM + fused AdamW (HF Trainer's default
optimizer with torch >= 2.8). Ours: Transformer + configure_optimizer, eager and torch.compile'd (--no-compile
leaves that out; --compile_hf compiles HF too, to show what is ours and what is the compiler's), and which of ours
the stages' default (--compile auto, model/compile_choice.py) would keep by the same rule. fp32 and bf16
autocast (bf16 is skipped where the CPU has no fast bf16 matmul, see --bf16). Model FLOP/s = tokens/s x
(6 x matmul parameters + 6 x n_layers x seq_len x dim (causal attention); model.model.estimate_flops_per_token), and
its fraction of a --peak_n^3 matmul that takes its turn in the same rounds.

    python -m bench train
    python -m bench train --dim 64 --n_layers 2 --seq_len 64 --batch_size 2 --steps 2 --no-compile
"""
import statistics
import time

import torch

from bench.common import model_config, ratio, take_turns, training_step
from bench.peak import bf16_is_fast
from model.compile_choice import keeps_compiled
from model.model import Transformer
from model.llama import to_llama
from model.model import estimate_flops_per_token

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # the rows' names -> the training stages' names


def hf_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def contestants(args, config, dtype: str) -> dict:
    """{name: step function} for HF and ours (eager, compiled), all starting from the same weights."""
    torch.manual_seed(0)
    ours = Transformer(config).train()
    hf = to_llama(ours).train()
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    models = {"hf": (hf, hf_adamw(hf)), "ours": (ours, ours.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu"))}
    if args.compile:
        ours_compiled = Transformer(config).train()
        ours_compiled.load_state_dict(ours.state_dict())
        models["ours_compiled"] = (torch.compile(ours_compiled),
                                   ours_compiled.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu"))
    if args.compile_hf:
        hf_compiled = to_llama(ours).train()
        models["hf_compiled"] = (torch.compile(hf_compiled), hf_adamw(hf_compiled))
    return {name: training_step(model, optimizer, batch, dtype=DTYPES[dtype])
            for name, (model, optimizer) in models.items()}


def run(args, results) -> dict:
    peak = results["peak"]
    config = model_config(args)
    tokens = args.batch_size * args.seq_len
    flops_per_token = estimate_flops_per_token(config, args.seq_len)
    out = {"tokens_per_step": tokens, "flops_per_token": flops_per_token, "peak_n": args.peak_n}
    for dtype in DTYPES:
        if dtype == "bf16" and (args.bf16 == "off" or (args.bf16 == "auto" and not bf16_is_fast(peak))):
            out[dtype] = {"skipped": f"bf16 matmul runs at {peak['bf16_gflops']:.1f} GFLOP/s here vs "
                                     f"{peak['fp32_gflops']:.1f} fp32 (no AVX512-BF16/AMX): use fp32 on this CPU "
                                     f"(--bf16 on to time it anyway)"}
            continue
        steps = contestants(args, config, dtype)
        # First step of each: same weights, same batch -> the losses must agree (compile time lands here too).
        first, compile_s = {}, {}
        for name, step in steps.items():
            start = time.perf_counter()
            first[name] = step()
            if name.endswith("_compiled"):
                compile_s[name] = time.perf_counter() - start
        # The peak matmul takes its turn in every round too, so "% of peak" compares times under the same load.
        a, b = (torch.randn(args.peak_n, args.peak_n, dtype=getattr(torch, DTYPES[dtype])) for _ in range(2))
        times = take_turns({**steps, "matmul": lambda: a @ b}, args.steps, args.warmup)
        matmul_flops = 2 * args.peak_n ** 3
        result = {"first_loss": first, "loss_diff_vs_hf": {n: abs(l - first["hf"]) for n, l in first.items()},
                  "matmul_gflops": matmul_flops / statistics.median(times.pop("matmul")) / 1e9}
        for name, ts in times.items():
            tok_s = tokens / statistics.median(ts)
            result[name] = {"tok_s": tok_s, "gflops": tok_s * flops_per_token / 1e9,
                            "fraction_of_peak": tok_s * flops_per_token / 1e9 / result["matmul_gflops"]}
            if name != "hf":
                result[name]["ratio_vs_hf"] = ratio(times, name, "hf")
        for name, seconds in compile_s.items():
            result[name]["compile_s"] = seconds
        if "ours_compiled" in result:  # what the stages' --compile auto keeps in a run long enough to try
            compiled_vs_eager = ratio(times, "ours", "ours_compiled")  # per-round time ratio, as auto's turns
            result["default"] = "ours_compiled" if keeps_compiled(compiled_vs_eager) else "ours"
        out[dtype] = result
    return out


LABELS = {"hf": "HF + fused AdamW", "ours": "ours (eager)", "ours_compiled": "ours + torch.compile",
          "hf_compiled": "HF + fused AdamW + torch.compile"}


def table(train: dict) -> list:
    lines = ["", f"training ({train['tokens_per_step']} tokens/step, fwd+bwd+AdamW)     tok/s    x HF  GFLOP/s  % peak",
             "  (% peak: of a large matmul timed in the same rounds)"]
    for dtype in DTYPES:
        r = train[dtype]
        if "skipped" in r:
            lines.append(f"  {dtype}  skipped: {r['skipped']}")
            continue
        for name in ("hf", "ours", "hf_compiled", "ours_compiled"):
            if name in r:
                x = r[name]
                extra = f"  (compile {x['compile_s']:.0f} s)" if "compile_s" in x else ""
                lines.append(f"  {dtype}  {LABELS[name]:34s} {x['tok_s']:8.0f} {x.get('ratio_vs_hf', 1.0):7.2f} "
                             f"{x['gflops']:8.1f} {100 * x['fraction_of_peak']:6.0f}%{extra}")
        if "default" in r:
            lines.append(f"  {dtype}  the stages' default, --compile auto, in a run of 10+ minutes: "
                         f"{LABELS[r['default']]} ({r[r['default']].get('ratio_vs_hf', 1.0):.2f}x HF)")
        lines.append(f"  {dtype}  {'matmul ' + str(train.get('peak_n', '')) + '^3 (peak)':34s} "
                     f"{'':8s} {'':7s} {r['matmul_gflops']:8.1f}")
        lines.append(f"  {dtype}  first-step loss minus HF's: " +
                     ", ".join(f"{n} {d:.1e}" for n, d in r["loss_diff_vs_hf"].items() if n != "hf"))
    return lines
