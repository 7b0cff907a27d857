"""
python -m bench: how fast nano-LLM's hot paths are, measured next to a reference in the same process
(transformers' LlamaForCausalLM with the same shapes and weights; llama.cpp for gguf). The contestants take turns
step by step, so a noisy machine slows both alike; each number is a median after warm-up, and each ratio is the
median of the per-round ratios. Run from the repository root:

    python -m bench                          # peak,train,decode,alloc,data at the default shape (dim 512, 8 layers,
                                             # seq 512, batch 4): a table
    python -m bench --json                   # the same as one JSON object
    python -m bench --moe                    # + the moe section
    python -m bench train,decode             # some sections
    python -m bench train,decode --dim 64 --n_layers 2 --seq_len 64 --batch_size 2 --steps 2 --new_tokens 16 \
        --no-compile
    python -m bench serve                    # the HTTP server under 1, 4, 16 streaming clients (docs/serving.md)
    python -m bench soak --soak_s 150        # the HTTP server under abuse beside well-behaved clients
    python -m bench gguf                     # llama.cpp's decoding per GGUF outtype (docs/gguf.md)
    python -m bench grpo                     # 5-grpo.py vs TRL's GRPOTrainer on the demo's DPO model (docs/rl.md;
                                             # needs `make bench-trl`)
    python -m bench gpu                      # MFU on one GPU; runs alone, with its own flags:
    python -m bench gpu --help

Sections (bench/<section>.py says how each one measures)
    peak    GFLOP/s of a large fp32 (and bf16) matmul: this machine's practical peak (runs with train)
    train   tokens/s of forward + backward + AdamW: ours (eager, torch.compile'd) vs HF + fused AdamW, fp32 / bf16
    decode  batch 1: llama.cpp f32/q8_0, HF generate, generate_stream eager and on the compiled fast path (greedy,
            same tokens checked; and sampled), default threads and 1 thread
    engine  model/engine.py in process, 1..32 concurrent requests: aggregate tok/s on the eager and the compiled step
    int8    one decode token's matrix-vector products with int8 weights (each kernel torch has) vs the fp32 fast path
    moe     training step of the MoE model / a dense model with the same active parameters
    alloc   CPU training step under glibc's default malloc vs model.runtime.keep_freed_memory, separate processes
    data    useful tokens per batch of the demo corpus; pretraining memory vs data size; the streaming JSON reader
    serve   serve_openai_api.py under 1, 4, 16 concurrent streaming clients (--serve adds it to the default ones)
    soak    serve_openai_api.py for --soak_s seconds: abusive clients beside greedy streaming ones; 5xx, wrong
            answers, /health p99, memory
    gguf    llama.cpp on each GGUF outtype vs generate_stream, same weights, same tokens (checked)
    grpo    5-grpo.py vs TRL's GRPOTrainer, same start, prompts, reward and settings: seconds per step (rollout,
            update), held-out accuracy after --grpo_steps, peak RSS (--grpo_* flags)
    gpu     MFU of training a ~100M-parameter model on one GPU
"""
import argparse
import importlib
import json
import sys

DEFAULT_SECTIONS = ["peak", "train", "decode", "alloc", "data"]
SECTIONS = ["peak", "train", "decode", "engine", "int8", "moe", "alloc", "data", "serve", "soak", "gguf",
            "grpo"]  # the order they run and print in


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="?", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, of {','.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)}); "
                             f"gpu alone, first")
    parser.add_argument("--dim", type=int, default=512, help="model width")
    parser.add_argument("--n_layers", type=int, default=8, help="Transformer blocks")
    parser.add_argument("--n_heads", type=int, default=8, help="attention heads")
    parser.add_argument("--n_kv_heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--vocab_size", type=int, default=6400, help="vocabulary size")
    parser.add_argument("--seq_len", type=int, default=512, help="training sequence length")
    parser.add_argument("--batch_size", type=int, default=4, help="training batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per contestant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per contestant")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our model under torch.compile (the trainer's --compile) and decode with the "
                             "compiled decode step (model/fast_decode.py)")
    parser.add_argument("--compile_hf", action="store_true",
                        help="also time LlamaForCausalLM under torch.compile (not what an HF user gets by default)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 autocast rows: auto = only where a bf16 matmul is at least half as fast as fp32")
    parser.add_argument("--prompt_len", type=int, default=16, help="decode prompt length")
    parser.add_argument("--new_tokens", type=int, default=200, help="decoded tokens per run")
    parser.add_argument("--decode_rounds", type=int, default=3, help="timed decode runs per contestant")
    parser.add_argument("--engine_streams", default="1,2,4,8,16,32",
                        help="engine: numbers of concurrent requests (16 slots; the rest wait)")
    parser.add_argument("--engine_tokens", type=int, default=64, help="engine: new tokens per request")
    parser.add_argument("--peak_n", type=int, default=2048, help="matrix size of the peak matmul")
    parser.add_argument("--rss_tokens", type=int, default=64_000_000, help="tokens in the larger packed file")
    parser.add_argument("--rss_steps", type=int, default=30, help="pretraining steps of each RSS run")
    parser.add_argument("--reader_records", type=int, default=200_000,
                        help="records in the generated JSON array of the data section's reader timing")
    parser.add_argument("--reader_rounds", type=int, default=3, help="timed rounds of the JSON array reader timing")
    parser.add_argument("--moe", action="store_true", help="add the moe section")
    parser.add_argument("--alloc_rounds", type=int, default=3, help="alloc: processes per side, in turn")
    parser.add_argument("--alloc_child", choices=["default", "keep"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help="add the serve section")
    parser.add_argument("--serve_tokens", type=int, default=64, help="serve: max_tokens per request (half to all)")
    parser.add_argument("--serve_requests", type=int, default=3, help="serve: requests per client, back to back")
    parser.add_argument("--soak_s", type=float, default=150, help="soak: seconds of abuse (after a warm-up)")
    parser.add_argument("--soak_tokens", type=int, default=32, help="soak: max_tokens of the well-behaved requests")
    section("grpo").add_args(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--save_json", default=None, help="also write the JSON to this file")
    parser.add_argument("--table_from", default=None, help="print the table of a JSON file saved earlier, and exit")
    args = parser.parse_args(argv)
    args.sections = args.sections.split(",") + ["moe"] * args.moe + ["serve"] * args.serve
    if "gpu" in args.sections:
        parser.error("gpu runs alone, with its own flags: python -m bench gpu [--help]")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))} (sections: {','.join(SECTIONS)})")
    if "train" in args.sections:  # train's bf16 rows and "% of peak" need the peak
        args.sections.append("peak")
    args.sections = [name for name in SECTIONS if name in args.sections]
    return args


def section(name: str):
    """The module bench/<name>.py: run(args, results) -> its result, table(result) -> its lines of the report."""
    return importlib.import_module(f"bench.{name}")


def table(results: dict) -> str:
    lines = [f"machine: {results['machine']}", f"command: {results['command']}"]
    for name in SECTIONS:
        if name in results:
            lines += section(name).table(results[name])
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:  # its own flags and defaults (a ~100M model on a GPU, not the CPU shape)
        return section("gpu").main(argv[1:])
    args = parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            return print(table(json.load(f)))
    if args.alloc_child:
        return section("alloc").child(args)
    if args.grpo_child:
        return section("grpo").trl_child(args)

    from bench.common import machine  # imported here so that --help does not wait for torch
    results = {"machine": machine(), "command": "python -m bench " + " ".join(argv),
               "config": {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                        "seq_len", "batch_size", "steps", "peak_n")}}
    for name in args.sections:
        results[name] = section(name).run(args, results)
        if not args.json:
            print(f"[{name} done]", file=sys.stderr, flush=True)
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1) if args.json else table(results))


if __name__ == "__main__":
    main()
