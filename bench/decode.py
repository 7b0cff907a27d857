"""
decode: batch 1, --new_tokens tokens after a --prompt_len prompt, the same random weights everywhere, taking turns:
  llama.cpp f32, q8_0   llama-cpp-python on this model's GGUF export (model/gguf_export.py): Llama.eval one token at
                        a time, the next one the argmax of the last row of Llama.scores (kept with logits_all=True).
                        Skipped without llama-cpp-python, or when --vocab_size is not the shipped tokenizer's.
  HF generate           transformers' LlamaForCausalLM with our weights (model/llama.py), greedy
  ours eager            model.generate.generate_stream on the eager model (fast_decode mode "off")
  ours fast path        generate_stream on the compiled decode step (model/fast_decode.py, mode "on"); compiled
                        before the timing (the compile time is reported); skipped with --no-compile
  sampled               ours eager and ours fast path again, temperature 0.8, top_p 0.9 (same seed each time)
  floor                 the weight matrices alone (all Linear layers on one vector per token): the memory-bandwidth
                        bound of fp32 decoding
Greedy tokens are compared: ours fast path, HF and llama.cpp f32 must give ours eager's (else the section says
which did not); q8_0 reports how many leading tokens agree. At the default thread count and at 1 thread, every
contestant on the same number. Ratios are medians of per-round ratios. Measurements: docs/performance.md.

    python -m bench decode --prompt_len 5 --new_tokens 200 --decode_rounds 3
"""
import os
import statistics
import tempfile
import time

import torch

from bench.common import greedy_tokens, model_config, ratio, take_turns
from model import fast_decode
from model.generate import generate_stream
from model.llama import to_llama
from model.model import Transformer

SAMPLING = dict(temperature=0.8, top_p=0.9)
LLAMA_OUTTYPES = ("f32", "q8_0")


def in_mode(mode: str, fn):
    """fn() with the fast path's mode set to `mode` (auto again afterwards)."""
    def run():
        previous = fast_decode.get_mode()
        fast_decode.set_mode(mode)
        try:
            return fn()
        finally:
            fast_decode.set_mode(previous)
    return run


def llama_cpp_models(model, config, tmp: str, threads: int) -> tuple:
    """({outtype: Llama}, why-skipped or None): our weights exported to GGUF and loaded into llama.cpp."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {}, "llama-cpp-python not installed (requirements-test.txt)"
    from model.chat import DEFAULT_TOKENIZER_DIR
    from model.gguf_export import export_gguf
    llms = {}
    for outtype in LLAMA_OUTTYPES:
        path = os.path.join(tmp, f"{outtype}.gguf")
        try:
            if not os.path.exists(path):
                export_gguf(model, DEFAULT_TOKENIZER_DIR, path, outtype)
        except ValueError as err:  # e.g. a --vocab_size other than the shipped tokenizer's
            return {}, f"GGUF export: {err}"
        llms[outtype] = Llama(path, n_ctx=config.max_seq_len, n_threads=threads, n_threads_batch=threads,
                              logits_all=True, verbose=False)
    return llms, None


def llama_cpp_greedy(llm, prompt: list, n: int) -> list:
    """n greedy tokens: prompt + n - 1 eval steps, as generate_stream takes."""
    llm.reset()
    llm.eval(prompt)
    out = []
    while True:
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        if len(out) == n:
            return out
        llm.eval(out[-1:])


def leading_agreement(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(args, results) -> dict:
    config = model_config(args)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    hf = to_llama(ours).eval()
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    vectors = {k: torch.randn(1, 1, k) for k in {m.in_features for m in linears}}
    out = {"new_tokens": n, "prompt_len": args.prompt_len, "params_m": sum(p.numel() for p in ours.parameters()) / 1e6,
           "weight_mb": sum(m.weight.numel() * 4 for m in linears) / 1e6, "sampling": SAMPLING}

    def floor():  # one token's worth of weight streaming, repeated n times
        for _ in range(n):
            for m in linears:
                m(vectors[m.in_features])

    def sampled(mode):
        def run_sampled():
            torch.manual_seed(1)
            for _ in generate_stream(ours, prompt, max_new_tokens=n, **SAMPLING):
                pass
        return in_mode(mode, run_sampled)

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            tokens = {}

            def keep(name, fn):
                return lambda: tokens.__setitem__(name, fn())
            contestants = {}
            llms, out["llama_cpp_skipped"] = llama_cpp_models(ours, config, tmp, threads)
            for outtype, llm in llms.items():
                contestants[f"llama.cpp {outtype}"] = keep(f"llama.cpp {outtype}", lambda llm=llm: llama_cpp_greedy(
                    llm, prompt[0].tolist(), n))
            contestants["HF generate"] = keep("HF generate", lambda: hf.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                pad_token_id=0)[0, prompt.shape[1]:].tolist())
            contestants["ours eager"] = keep("ours eager", in_mode("off", lambda: greedy_tokens(ours, prompt, n)))
            row = {}
            if args.compile:
                fast = keep("ours fast path", in_mode("on", lambda: greedy_tokens(ours, prompt, n)))
                start = time.perf_counter()  # the first call compiles: timed on its own
                fast()
                row["compile_s"] = time.perf_counter() - start
                contestants["ours fast path"] = fast
            contestants["ours eager, sampled"] = sampled("off")
            if args.compile:
                contestants["ours fast path, sampled"] = sampled("on")
            contestants["floor"] = floor
            times = take_turns(contestants, args.decode_rounds, 1)
            for name, ts in times.items():
                row[name] = {"tok_s": n / statistics.median(ts), "x_hf": ratio(times, name, "HF generate"),
                             "fraction_of_floor": ratio(times, name, "floor")}
                if "llama.cpp f32" in times:
                    row[name]["x_llama_f32"] = ratio(times, name, "llama.cpp f32")
            row["same_tokens_as_ours_eager"] = {name: leading_agreement(t, tokens["ours eager"])
                                                for name, t in tokens.items() if name != "ours eager"}
            out[f"threads_{threads}"] = row
            del llms
        torch.set_num_threads(default_threads)
    # every greedy contestant but a quantised one must give ours eager's tokens
    out["same_tokens"] = all(same == n for key, row in out.items() if key.startswith("threads_")
                             for name, same in row["same_tokens_as_ours_eager"].items() if "q8_0" not in name)
    return out


LABELS = {"llama.cpp f32": "llama.cpp f32 (eval loop)", "llama.cpp q8_0": "llama.cpp q8_0 (eval loop)",
          "HF generate": "HF generate", "ours eager": "ours eager (generate_stream)",
          "ours fast path": "ours fast path (compiled step)", "ours eager, sampled": "ours eager, sampled",
          "ours fast path, sampled": "ours fast path, sampled"}


def table(decode: dict) -> list:
    n = decode["new_tokens"]
    lines = ["", f"decode (batch 1, {n} new tokens after {decode['prompt_len']}, {decode['params_m']:.1f}M parameters; "
                 f"greedy, sampled = temperature {decode['sampling']['temperature']} top_p {decode['sampling']['top_p']})",
             f"  {'':12s} {'':33s} {'tok/s':>8s} {'x llama f32':>12s} {'x HF':>6s} {'% of floor':>11s}"]
    labels = {**LABELS, "floor": f"floor: {decode['weight_mb']:.0f} MB weights/token"}
    for key, row in decode.items():
        if not key.startswith("threads_"):
            continue
        names = [name for name in row if isinstance(row[name], dict) and "tok_s" in row[name]]
        for i, name in enumerate(names):
            x, threads = row[name], f"{key.split('_')[1]} thread(s)" if i == 0 else ""
            vs_llama = f"{x['x_llama_f32']:12.2f}" if "x_llama_f32" in x else f"{'':12s}"
            lines.append(f"  {threads:12s} {labels[name]:33s} {x['tok_s']:8.1f} {vs_llama} {x['x_hf']:6.2f} "
                         f"{100 * x['fraction_of_floor']:10.0f}%")
        same = ", ".join(f"{name} {k}/{n}" for name, k in row["same_tokens_as_ours_eager"].items())
        lines.append(f"  {'':12s} greedy tokens equal to ours eager: {same}")
        if "compile_s" in row:
            lines.append(f"  {'':12s} fast path: first generation (compiles the step) {row['compile_s']:.1f} s")
    if decode.get("llama_cpp_skipped"):
        lines.append(f"  llama.cpp skipped: {decode['llama_cpp_skipped']}")
    lines.append(f"  same greedy tokens (q8_0 aside): {decode['same_tokens']}")
    return lines
