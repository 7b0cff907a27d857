"""
gguf: decode speed, batch 1, --new_tokens greedy tokens after a --prompt_len prompt: llama.cpp (llama-cpp-python)
on each GGUF outtype written by model/gguf_export.py vs this project's model.generate.generate_stream on the same
weights (random: the speed does not depend on them; the shape flags, with the shipped tokenizer's vocab_size).
At the default thread count and at 1 thread, both sides on the same number of threads. Two llama.cpp loops:
  eval loop   Llama.eval one token at a time, the next token the argmax of the last row of Llama.scores (the
              scores are only kept with logits_all=True: without it the row stays zero and every step feeds token 0)
  generate()  Llama.generate(temp=0), llama.cpp's own greedy sampler: what a user of llama-cpp-python calls
Before timing, each loop's tokens are compared with generate_stream's: f32 must give the same tokens (else it stops
with an error), f16 / q8_0 report how many leading tokens agree. Times include the prompt. Needs llama-cpp-python
(requirements-test.txt). Measurements: docs/gguf.md.

    python -m bench gguf
    python -m bench gguf --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2 --new_tokens 16 --decode_rounds 1
"""
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

from bench.common import greedy_tokens, model_config, ratio, take_turns
from model.model import Transformer
from model.gguf_export import OUTTYPES, export_gguf
from model.chat import DEFAULT_TOKENIZER_DIR


def leading_agreement(a: list, b: list) -> int:
    """How many tokens from the start a and b have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def llama_cpp_contestants(llm, prompt: list, n: int, tokens: dict, outtype: str) -> dict:
    """{name: greedy decode of n tokens} through the file loaded in llm; each call leaves its tokens in tokens."""
    def eval_loop():
        llm.reset()
        llm.eval(prompt)
        out = []
        while True:  # prompt + n - 1 steps, as generate_stream and generate() take
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) == n:
                break
            llm.eval(out[-1:])
        tokens[f"{outtype} eval loop"] = out

    def generate():
        llm.reset()  # no reuse of the previous call's prompt: the prompt counts, as it does for the others
        out = []
        for token in llm.generate(prompt, temp=0.0):
            out.append(token)
            if len(out) == n:
                break
        tokens[f"{outtype} generate()"] = out

    return {f"{outtype} eval loop": eval_loop, f"{outtype} generate()": generate}


def run(args, results) -> dict:
    try:
        from llama_cpp import Llama, __version__ as llama_cpp_version
    except ImportError:
        sys.exit("python -m bench gguf: needs llama-cpp-python (pip install -r requirements-test.txt)")
    config = model_config(args)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    out = {"llama_cpp_version": llama_cpp_version, "new_tokens": n, "prompt_len": args.prompt_len,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "file_mib": {}}
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for outtype in OUTTYPES:
            try:
                size = export_gguf(model, DEFAULT_TOKENIZER_DIR, os.path.join(tmp, f"{outtype}.gguf"), outtype)
            except ValueError as e:
                sys.exit(f"python -m bench gguf: {e}")
            out["file_mib"][outtype] = size / 2 ** 20
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            tokens = {}
            contestants = {"ours": lambda: tokens.__setitem__("ours", greedy_tokens(model, prompt, n))}
            for outtype in OUTTYPES:
                llm = Llama(os.path.join(tmp, f"{outtype}.gguf"), n_ctx=config.max_seq_len, n_threads=threads,
                            n_threads_batch=threads, logits_all=True, verbose=False)
                contestants.update(llama_cpp_contestants(llm, prompt[0].tolist(), n, tokens, outtype))
            for fn in contestants.values():  # once each, untimed: the tokens to compare
                fn()
            agreement = {name: leading_agreement(tokens[name], tokens["ours"])
                         for name in contestants if name != "ours"}
            wrong = [name for name, same in agreement.items() if name.startswith("f32") and same < n]
            if wrong:
                sys.exit(f"python -m bench gguf: {', '.join(wrong)} left generate_stream's greedy tokens at token "
                         f"{min(agreement[name] for name in wrong)} of {n} on the same f32 weights ({threads} threads)")
            times = take_turns(contestants, args.decode_rounds, 0)
            row = {name: {"tok_s": n / statistics.median(ts)} for name, ts in times.items()}
            for name in agreement:
                row[name].update(x_ours=ratio(times, name, "ours"), same_tokens_as_ours=agreement[name])
            out[f"threads_{threads}"] = row
        torch.set_num_threads(default_threads)
    return out


def table(gguf: dict) -> list:
    n = gguf["new_tokens"]
    lines = ["", f"GGUF decode: llama.cpp (llama-cpp-python {gguf['llama_cpp_version']}) vs ours, batch 1, greedy, "
                 f"{n} new tokens after {gguf['prompt_len']} (prompt included), {gguf['params_m']:.1f}M parameters",
             f"  {'':12s} {'':28s} {'file MiB':>8s} {'tok/s':>8s} {'x ours':>7s}  same tokens as ours"]
    for key, row in gguf.items():
        if key.startswith("threads_"):
            for i, (name, x) in enumerate(row.items()):
                threads = f"{key.split('_')[1]} thread(s)" if i == 0 else ""
                label, size = ("ours generate_stream (fp32)", "") if name == "ours" else \
                    (f"llama.cpp {name}", f"{gguf['file_mib'][name.split()[0]]:8.1f}")
                same = f"  {x['same_tokens_as_ours']}/{n}" if name != "ours" else ""
                lines.append(f"  {threads:12s} {label:28s} {size:>8s} {x['tok_s']:8.1f} "
                             f"{x.get('x_ours', 1.0):7.2f}{same}")
    return lines
