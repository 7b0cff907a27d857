"""
decode: batch 1, greedy, --new_tokens tokens: model.generate.generate_stream vs LlamaForCausalLM.generate, same
weights, same tokens (checked); at the default thread count and at 1 thread. "floor" is the time the bare weight
matrices take for one token (all Linear layers on one vector): the memory-bandwidth bound.

    python -m bench decode --new_tokens 200 --decode_rounds 3
"""
import statistics

import torch

from bench.common import greedy_tokens, model_config, ratio, take_turns
from model.model import Transformer
from model.llama import to_llama


def run(args, results) -> dict:
    config = model_config(args)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    hf = to_llama(ours).eval()
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    vectors = {k: torch.randn(1, 1, k) for k in {m.in_features for m in linears}}
    tokens = {}

    def floor():  # one token's worth of weight streaming, repeated n times
        for _ in range(n):
            for m in linears:
                m(vectors[m.in_features])

    contestants = {
        "ours": lambda: tokens.__setitem__("ours", greedy_tokens(ours, prompt, n)),
        "hf": lambda: tokens.__setitem__("hf", hf.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0)[0, prompt.shape[1]:].tolist()),
        "floor": floor,
    }
    default_threads = torch.get_num_threads()
    out = {"new_tokens": n, "prompt_len": args.prompt_len, "weight_mb": sum(m.weight.numel() * 4 for m in linears) / 1e6}
    with torch.no_grad():
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            times = take_turns(contestants, args.decode_rounds, 1)
            row = {name: {"tok_s": n / statistics.median(ts)} for name, ts in times.items()}
            row["ours"]["ratio_vs_hf"] = ratio(times, "ours", "hf")
            row["ours"]["fraction_of_floor"] = ratio(times, "ours", "floor")
            row["hf"]["fraction_of_floor"] = ratio(times, "hf", "floor")
            row["same_tokens"] = tokens["ours"] == tokens["hf"]
            out[f"threads_{threads}"] = row
        torch.set_num_threads(default_threads)
    out["same_tokens"] = all(v["same_tokens"] for k, v in out.items() if k.startswith("threads_"))
    return out


LABELS = {"hf": "HF generate", "ours": "ours generate_stream"}


def table(decode: dict) -> list:
    lines = ["", f"decode (batch 1, greedy, {decode['new_tokens']} new tokens)           tok/s    x HF   % of floor"]
    labels = {**LABELS, "floor": f"floor: {decode['weight_mb']:.0f} MB weights/token"}
    for key, row in decode.items():
        if key.startswith("threads_"):
            for i, name in enumerate(("hf", "ours", "floor")):
                x, threads = row[name], f"{key.split('_')[1]} thread(s)" if i == 0 else ""
                times_hf = f"{x['ratio_vs_hf']:7.2f}" if "ratio_vs_hf" in x else ("   1.00" if name == "hf" else "       ")
                frac = f"{100 * x['fraction_of_floor']:10.0f}%" if "fraction_of_floor" in x else ""
                lines.append(f"  {threads:12s} {labels[name]:30s} {x['tok_s']:8.1f} {times_hf}{frac}")
    lines.append(f"  same tokens as HF: {decode['same_tokens']}")
    return lines
