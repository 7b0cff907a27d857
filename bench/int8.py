"""
int8: could int8 weight-only decoding beat the fp32 fast path on this CPU? Decoding one token at batch 1 reads every
weight matrix once (a matrix-vector product each), so this times exactly that, for the model's matrices, with each
kernel torch offers: the fp32 fused reduction the fast path compiles ((W * x).sum(-1), model/fast_decode.py), the
same reduction over int8 weights dequantised in the graph ((q.float() * x).sum(-1) * scale, per-row scales), aten's
int8 weight-only kernel (torch._weight_int8pack_mm, what torchao's int8 weight-only uses on a CPU) and F.linear in
fp32. An int8 decode path built on a kernel slower than the fp32 one here cannot beat the fp32 path, let alone
llama.cpp's q8_0 (the decode section's row). --no-compile leaves the compiled contestants out.

    python -m bench int8
"""
import statistics

import torch
import torch.nn.functional as F

from bench.common import model_config, take_turns
from model.model import Transformer


def quantize(w):
    """Symmetric per-row int8: (q, scale) with w ~= q * scale[:, None]."""
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def fused_fp32(ws, xs):
    return [(w * x).sum(-1) for w, x in zip(ws, xs)]


def fused_int8(qs, scales, xs):
    return [(q.to(torch.float32) * x).sum(-1) * s for q, s, x in zip(qs, scales, xs)]


def run(args, results) -> dict:
    torch.manual_seed(0)
    model = Transformer(model_config(args)).eval()
    ws = [p.detach() for p in model.parameters() if p.dim() == 2]  # the tied embedding is the output layer, once
    qs, scales = zip(*(quantize(w) for w in ws))
    xs = [torch.randn(w.shape[1]) for w in ws]
    rows = [x[None] for x in xs]
    contestants = {"fp32 F.linear": lambda: [F.linear(x, w) for w, x in zip(ws, rows)],
                   "int8 _weight_int8pack_mm": lambda: [torch._weight_int8pack_mm(x, q, s)
                                                        for q, s, x in zip(qs, scales, rows)]}
    if args.compile:
        fp32, int8 = torch.compile(fused_fp32), torch.compile(fused_int8)
        contestants = {"fp32 fused (fast path)": lambda: fp32(ws, xs),
                       "int8 fused, dequantised in the graph": lambda: int8(qs, scales, xs), **contestants}
    with torch.inference_mode():
        reference = fused_fp32(ws, xs)
        error = max(float((a.flatten() - b).abs().max() / b.abs().max())
                    for a, b in zip(contestants["int8 _weight_int8pack_mm"](), reference))
        times = take_turns(contestants, 5 * args.decode_rounds + 10, 3)
    fp32_bytes = sum(w.numel() for w in ws) * 4
    out = {"matrices": len(ws), "fp32_mb": fp32_bytes / 1e6, "int8_max_rel_error": error, "rows": {}}
    base = "fp32 fused (fast path)" if args.compile else "fp32 F.linear"
    for name, ts in times.items():
        seconds = statistics.median(ts)
        read = fp32_bytes / (4 if name.startswith("int8") else 1)
        out["rows"][name] = {"ms": 1000 * seconds, "gb_s": read / seconds / 1e9,
                             "x_fp32": statistics.median(tb / ta for ta, tb in zip(ts, times[base]))}
    out["baseline"] = base
    return out


def table(r: dict) -> list:
    lines = ["", f"int8 weight-only: one decode token's matrix-vector products ({r['matrices']} matrices, "
                 f"{r['fp32_mb']:.0f} MB in fp32), median",
             f"  {'':38s} {'ms':>7s} {'GB/s':>6s}  x {r['baseline']}"]
    for name, x in r["rows"].items():
        lines.append(f"  {name:38s} {x['ms']:7.2f} {x['gb_s']:6.1f}  {x['x_fp32']:.2f}")
    lines.append(f"  int8 error: at most {100 * r['int8_max_rel_error']:.2f}% of an output's largest value")
    return lines
