"""
bench.py: how fast nano-LLM's hot paths are, measured next to transformers' LlamaForCausalLM (same shapes, same
weights) in the same process. The contestants take turns step by step, so a noisy machine slows both alike;
each number is a median after warm-up, and each ratio is the median of the per-round ratios.

Run as:
    python bench.py                          # default shape (dim 512, 8 layers, seq 512, batch 4): a table
    python bench.py --json                   # the same as one JSON object
    python bench.py --moe                    # + MoE step time vs a dense model with the same active parameters
    python bench.py --only train,decode      # some sections: peak, train, decode, moe, data
    python bench.py --dim 64 --n_layers 2 --seq_len 64 --batch_size 2 --steps 2 --new_tokens 16 --no-compile
    python bench.py --gpu                    # MFU of a ~100M-parameter model on one GPU (bench_gpu.py)
    python bench.py --only serve             # the HTTP server under 1, 4, 16 streaming clients (docs/serving.md)

Sections
    peak    GFLOP/s of a large fp32 (and bf16) matmul: this machine's practical peak, timed in this run
    train   tokens/s of forward + backward + AdamW step. HF: LlamaForCausalLM + fused AdamW (HF Trainer's default
            optimizer with torch >= 2.8). Ours: Transformer + configure_optimizer, eager and torch.compile'd.
            fp32 and bf16 autocast (bf16 is skipped where the CPU has no fast bf16 matmul, see --bf16).
            Model FLOP/s = tokens/s x (6 x matmul parameters + 6 x n_layers x seq_len x dim (causal attention);
            model.model.estimate_flops_per_token), and its fraction of a --peak_n^3 matmul that takes its turn
            in the same rounds.
    decode  batch 1, greedy, --new_tokens tokens: model.generate.generate_stream vs LlamaForCausalLM.generate, same
            weights, same tokens (checked); at the default thread count and at 1 thread. "floor" is the time the
            bare weight matrices take for one token (all Linear layers on one vector): the memory-bandwidth bound.
    moe     step time of the MoE model / a dense model whose FFN has the same active parameters
    alloc   (CPU) our training step (training dtype: bf16 where the CPU has fast bf16, else fp32) with glibc's
            default malloc thresholds vs what the training stages run with (model.runtime.keep_freed_memory:
            freed blocks kept for reuse, no fresh pages per step). The setting is process-wide, so each side runs
            in its own process, --alloc_rounds times in turn; median step time per process, the ratio's median.
    data    share of useful tokens in pretraining and SFT batches of the demo corpus (dataset/demo, generated
            into a temporary directory if missing); peak RSS of a short 1-pretrain.py run over packed files of
            two sizes, both far larger than a batch: the difference shows whether memory grows with the data.
            (The file's pages that the run touched show up in RSS as page cache, shared and reclaimable; the
            process's own memory is the anonymous part.) Also: records/s of data_process.py's streaming JSON
            array reader (model.data_formats.iter_json_array) on a generated array of --reader_records small
            alpaca records, next to json.load of the same file (the whole file in memory: the reference speed).
    serve   (--serve or --only serve) serve_openai_api.py as a subprocess, random weights of the shape flags: aggregate
            decode tokens/s and time to first token for 1, 4, 16 concurrent streaming clients (openai client)
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from model import LMConfig, Transformer
from model.generate import generate_stream
from model.llama import to_llama
from model.model import estimate_flops_per_token

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------------
# timing

def take_turns(contestants: dict, rounds: int, warmup: int) -> dict:
    """Call each contestant once per round, in turn; return each one's wall times after warm-up."""
    times = {name: [] for name in contestants}
    for r in range(warmup + rounds):
        for name, fn in contestants.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(b) / time(a): how many times faster a is than b, under the same load."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))


def matmul_gflops(dtype, n: int, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = take_turns({"mm": lambda: a @ b}, reps, 1)["mm"]
    return 2 * n ** 3 / statistics.median(times) / 1e9


def model_config(args, **overrides) -> LMConfig:
    kwargs = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, args.prompt_len + args.new_tokens))
    kwargs.update(overrides)
    return LMConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# sections

def bench_peak(args) -> dict:
    out = {"fp32_gflops": matmul_gflops(torch.float32, args.peak_n)}
    # bf16 first at a small size: without native support it is ~50x slower, and the full size would take minutes
    out["bf16_gflops"] = matmul_gflops(torch.bfloat16, min(args.peak_n, 512))
    if bf16_is_fast(out) or args.bf16 == "on":
        out["bf16_gflops"] = matmul_gflops(torch.bfloat16, args.peak_n)
    return out


def bf16_is_fast(peak: dict) -> bool:
    return peak["bf16_gflops"] >= 0.5 * peak["fp32_gflops"]


def train_contestants(args, config, dtype):
    """{name: step function} for HF and ours (eager, compiled), all starting from the same weights."""
    torch.manual_seed(0)
    ours = Transformer(config).train()
    hf = to_llama(ours).train()
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step_fn(model, optimizer):
        def step():
            with autocast:
                loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        return step

    models = {"hf": (hf, torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                           fused=True)),
              "ours": (ours, ours.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu"))}
    if args.compile:
        ours_compiled = Transformer(config).train()
        ours_compiled.load_state_dict(ours.state_dict())
        models["ours_compiled"] = (torch.compile(ours_compiled), ours_compiled.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu"))
    if args.compile_hf:  # the same compiler on the reference, to show what is ours and what is the compiler's
        hf_compiled = to_llama(ours).train()
        models["hf_compiled"] = (torch.compile(hf_compiled), torch.optim.AdamW(
            hf_compiled.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True))
    return {name: step_fn(*pair) for name, pair in models.items()}


def bench_train(args, peak: dict) -> dict:
    config = model_config(args)
    tokens = args.batch_size * args.seq_len
    flops_per_token = estimate_flops_per_token(config, args.seq_len)
    out = {"tokens_per_step": tokens, "flops_per_token": flops_per_token}
    for dtype in ("fp32", "bf16"):
        if dtype == "bf16" and (args.bf16 == "off" or (args.bf16 == "auto" and not bf16_is_fast(peak))):
            out[dtype] = {"skipped": f"bf16 matmul runs at {peak['bf16_gflops']:.1f} GFLOP/s here vs "
                                     f"{peak['fp32_gflops']:.1f} fp32 (no AVX512-BF16/AMX): use fp32 on this CPU "
                                     f"(--bf16 on to time it anyway)"}
            continue
        steps = train_contestants(args, config, dtype)
        # First step of each: same weights, same batch -> the losses must agree (compile time lands here too).
        first, compile_s = {}, {}
        for name, step in steps.items():
            start = time.perf_counter()
            first[name] = step()
            if name.endswith("_compiled"):
                compile_s[name] = time.perf_counter() - start
        # The peak matmul takes its turn in every round too, so "% of peak" compares times under the same load.
        a, b = (torch.randn(args.peak_n, args.peak_n, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
                for _ in range(2))
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
        out[dtype] = result
    return out


def bench_decode(args) -> dict:
    config = model_config(args)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    hf = to_llama(ours).eval()
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    vectors = {k: torch.randn(1, 1, k) for k in {m.in_features for m in linears}}
    results = {}

    def floor():  # one token's worth of weight streaming, repeated n times
        for _ in range(n):
            for m in linears:
                m(vectors[m.in_features])

    contestants = {
        "ours": lambda: results.__setitem__("ours", torch.stack(
            list(generate_stream(ours, prompt, max_new_tokens=n, temperature=0)), dim=1)[0]),
        "hf": lambda: results.__setitem__("hf", hf.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:]),
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
            row["ours"]["fraction_of_floor"] = statistics.median(
                f / o for f, o in zip(times["floor"], times["ours"]))
            row["hf"]["fraction_of_floor"] = statistics.median(f / h for f, h in zip(times["floor"], times["hf"]))
            row["same_tokens"] = bool(torch.equal(results["ours"], results["hf"]))
            out[f"threads_{threads}"] = row
        torch.set_num_threads(default_threads)
    out["same_tokens"] = all(v["same_tokens"] for k, v in out.items() if k.startswith("threads_"))
    return out


def bench_moe(args) -> dict:
    moe_config = model_config(args, use_moe=True)
    k, shared = moe_config.num_experts_per_tok, moe_config.n_shared_experts
    # Dense twin: one FFN as wide as the k routed + shared experts a token goes through.
    dense_config = model_config(args, hidden_dim=moe_config.hidden_dim * (k + shared))
    batch = torch.randint(0, moe_config.vocab_size, (args.batch_size, args.seq_len))
    steps = {}
    for name, config in (("dense", dense_config), ("moe", moe_config)):
        torch.manual_seed(0)
        model = Transformer(config).train()
        optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu")

        def step(model=model, optimizer=optimizer):
            model(batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[name] = step
    times = take_turns(steps, args.steps, args.warmup)
    active_ffn = 3 * moe_config.dim * moe_config.hidden_dim * (k + shared)
    return {"experts": f"{moe_config.n_routed_experts} routed, top-{k}, {shared} shared",
            "dense_hidden_dim": dense_config.hidden_dim, "active_ffn_params_per_layer": active_ffn,
            "dense_step_s": statistics.median(times["dense"]), "moe_step_s": statistics.median(times["moe"]),
            "moe_over_dense": ratio(times, "dense", "moe")}


def alloc_child(args):
    """One side of the alloc section (run as `bench.py --alloc_child default|keep`): median step seconds."""
    from model.runtime import autocast, keep_freed_memory, resolve_dtype
    if args.alloc_child == "keep" and not keep_freed_memory():
        sys.exit("keep_freed_memory did not apply (not glibc)")
    config = model_config(args)
    torch.manual_seed(0)
    model = Transformer(config).train()
    optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cpu")
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    dtype = resolve_dtype("auto", torch.device("cpu"))

    def step():
        with autocast(torch.device("cpu"), dtype):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = take_turns({"step": step}, args.steps, args.warmup)["step"]
    print(json.dumps({"step_s": statistics.median(times), "dtype": dtype}))


def bench_alloc(args) -> dict:
    shape = [f"--{k}={getattr(args, k)}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len",
                                                   "batch_size", "steps", "warmup", "prompt_len", "new_tokens")]
    sides = {"default": [], "keep": []}
    for _ in range(args.alloc_rounds):
        for side, seconds in sides.items():
            run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--alloc_child", side, *shape],
                                 capture_output=True, text=True)
            if run.returncode:
                return {"skipped": (run.stderr.strip().splitlines() or ["failed"])[-1]}
            child = json.loads(run.stdout.splitlines()[-1])
            seconds.append(child["step_s"])
    tokens = args.batch_size * args.seq_len
    return {"dtype": child["dtype"], "tokens_per_step": tokens, "rounds": args.alloc_rounds,
            "default_tok_s": tokens / statistics.median(sides["default"]),
            "keep_tok_s": tokens / statistics.median(sides["keep"]), "keep_speedup": ratio(sides, "keep", "default")}


def demo_corpus_dir(tmp: str) -> str:
    demo = os.path.join(ROOT, "dataset", "demo")
    needed = ("pretrain_data.bin", "pretrain_data.meta.json", "sft_data_single.jsonl", "sft_data_multi.jsonl")
    if all(os.path.isfile(os.path.join(demo, f)) for f in needed):
        return demo
    demo = os.path.join(tmp, "demo")
    subprocess.run([sys.executable, "data_process.py", "demo", "--out_dir", demo, "--num_workers", "1"],
                   cwd=ROOT, check=True, capture_output=True)
    return demo


def write_packed_file(path: str, n_tokens: int, vocab_size: int, doc_len: int = 300):
    """Random documents (<s> every doc_len tokens) in data_process.py's packed format (.bin + .meta.json)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, n_tokens, 1 << 22):
            chunk = rng.integers(3, vocab_size, min(1 << 22, n_tokens - start), dtype=np.uint16)
            chunk[(start + np.arange(len(chunk))) % doc_len == 0] = 1
            f.write(chunk.tobytes())
    meta = {"format": "nano-llm packed tokens v1", "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2,
            "dtype": "uint16", "n_tokens": n_tokens, "n_docs": -(-n_tokens // doc_len), "split": "train"}
    with open(path[:-4] + ".meta.json", "w") as f:
        json.dump(meta, f)


def run_and_watch_memory(cmd, cwd, data_path) -> dict:
    """Run cmd and poll /proc (Linux) every 0.1 s for its peak RSS (VmHWM; wait4's ru_maxrss would include this
    parent's RSS, inherited at fork), its peak anonymous memory (its own allocations), and the peak resident
    pages of its mapping of data_path (page cache: shared, clean, reclaimable)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
    peak_anon_kb = peak_data_kb = peak_rss_kb = 0
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                status_kb = {line.split(":")[0]: int(line.split()[1]) for line in f
                             if line.startswith(("RssAnon:", "VmHWM:"))}
            data_kb, inside = 0, False
            with open(f"/proc/{proc.pid}/smaps") as f:
                for line in f:
                    if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                        inside = line.rstrip().endswith(data_path)
                    elif inside and line.startswith("Rss:"):
                        data_kb += int(line.split()[1])
            peak_anon_kb = max(peak_anon_kb, status_kb.get("RssAnon", 0))
            peak_rss_kb, peak_data_kb = max(peak_rss_kb, status_kb.get("VmHWM", 0)), max(peak_data_kb, data_kb)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        log.seek(0)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return {"peak_rss_mb": peak_rss_kb / 1024, "peak_anon_mb": peak_anon_kb / 1024,
            "peak_data_resident_mb": peak_data_kb / 1024}


def bench_json_reader(n_records: int, rounds: int, tmp: str) -> dict:
    """records/s of the streaming JSON array reader vs json.load of the same file, taking turns."""
    from model.data_formats import iter_json_array
    path = os.path.join(tmp, "reader.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps({"instruction": f"问题{i}：请解释一下", "input": "",
                                                "output": f"答案{i}，" * 3}, ensure_ascii=False)
                                     for i in range(n_records)) + "\n]\n")

    def stream():
        assert sum(1 for _ in iter_json_array(path)) == n_records

    def load():
        with open(path, encoding="utf-8") as f:
            assert len(json.load(f)) == n_records

    times = take_turns({"iter_json_array": stream, "json.load": load}, rounds, 1)
    out = {"records": n_records, "file_mb": os.path.getsize(path) / 1e6, "rounds": rounds,
           **{f"{name}_records_s": n_records / statistics.median(ts) for name, ts in times.items()},
           "speed_vs_json_load": ratio(times, "iter_json_array", "json.load")}
    os.remove(path)
    return out


def bench_data(args) -> dict:
    from model.dataset import PretrainDataset, SFTDataset, pretrain_useful_fraction
    from model.checkpoint import load_tokenizer
    from model.runtime import DEFAULT_TOKENIZER_DIR
    from model.trainer import ResumableBatchSampler
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["json_reader"] = bench_json_reader(args.reader_records, args.reader_rounds, tmp)
        demo = demo_corpus_dir(tmp)
        pretrain = PretrainDataset(os.path.join(demo, "pretrain_data.bin"), args.seq_len)
        useful = total = 0
        for batch_indices in ResumableBatchSampler(len(pretrain), args.batch_size, seed=0):
            labels = torch.stack([pretrain[i]["shift_labels"] for i in batch_indices])
            useful, total = useful + int((labels != -100).sum()), total + labels.numel()
        out["pretrain"] = {"useful_fraction": useful / total, "stream_coverage": pretrain_useful_fraction(pretrain),
                           "rows": len(pretrain)}
        tokenizer = load_tokenizer(DEFAULT_TOKENIZER_DIR, pretrain.vocab_size)
        for name in ("sft_data_single", "sft_data_multi"):
            for pack in (True, False):
                sft = SFTDataset(os.path.join(demo, f"{name}.jsonl"), tokenizer, args.seq_len, pack=pack)
                real = labelled = positions = 0
                for batch_indices in ResumableBatchSampler(len(sft), min(args.batch_size, len(sft)), seed=0):
                    batch = sft.collate([sft[i] for i in batch_indices])
                    real += int(batch["attention_mask"].sum())
                    labelled += int((batch["labels"] != -100).sum())
                    positions += batch["attention_mask"].numel()
                out[f"{name}{'_packed' if pack else '_padded'}"] = {
                    "useful_fraction": real / positions, "labelled_fraction": labelled / positions, "rows": len(sft)}

        memory = {}
        for n_tokens in (args.rss_tokens // 8, args.rss_tokens):
            path = os.path.join(tmp, f"packed_{n_tokens}.bin")
            write_packed_file(path, n_tokens, args.vocab_size)
            cmd = [sys.executable, "1-pretrain.py", "--data_path", path, "--out_dir", os.path.join(tmp, "run"),
                   "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "128",
                   "--batch_size", "8", "--max_steps", str(args.rss_steps), "--eval_interval", "0",
                   "--save_interval", "100000", "--log_interval", "10", "--device", "cpu", "--dtype", "float32"]
            memory[n_tokens] = {"file_mb": n_tokens * 2 / 1e6, **run_and_watch_memory(cmd, ROOT, path)}
            os.remove(path)
        small, large = (memory[n] for n in sorted(memory))
        out["pretrain_memory"] = {"steps": args.rss_steps, "tokens_per_step": 8 * 128, "small": small, "large": large,
                                  "anon_growth_mb": large["peak_anon_mb"] - small["peak_anon_mb"],
                                  "rss_growth_mb": large["peak_rss_mb"] - small["peak_rss_mb"]}
    return out


# ----------------------------------------------------------------------------------------------------------
# report

def table(results: dict) -> str:
    lines = [f"machine: {results['machine']}", f"command: {results['command']}", ""]
    peak = results.get("peak")
    if peak:
        lines.append(f"matmul peak          fp32 {peak['fp32_gflops']:7.1f} GFLOP/s   bf16 {peak['bf16_gflops']:7.1f} GFLOP/s")
    train = results.get("train")
    if train:
        lines += ["", f"training ({train['tokens_per_step']} tokens/step, fwd+bwd+AdamW)     tok/s    x HF  GFLOP/s  % peak",
                  "  (% peak: of a large matmul timed in the same rounds)"]
        labels = {"hf": "HF + fused AdamW", "ours": "ours (eager)", "ours_compiled": "ours + torch.compile",
                  "hf_compiled": "HF + fused AdamW + torch.compile"}
        for dtype in ("fp32", "bf16"):
            r = train[dtype]
            if "skipped" in r:
                lines.append(f"  {dtype}  skipped: {r['skipped']}")
                continue
            for name in ("hf", "ours", "hf_compiled", "ours_compiled"):
                if name in r:
                    x = r[name]
                    extra = f"  (compile {x['compile_s']:.0f} s)" if "compile_s" in x else ""
                    lines.append(f"  {dtype}  {labels[name]:34s} {x['tok_s']:8.0f} {x.get('ratio_vs_hf', 1.0):7.2f} "
                                 f"{x['gflops']:8.1f} {100 * x['fraction_of_peak']:6.0f}%{extra}")
            lines.append(f"  {dtype}  {'matmul ' + str(results['config'].get('peak_n', '')) + '^3 (peak)':34s} "
                         f"{'':8s} {'':7s} {r['matmul_gflops']:8.1f}")
            lines.append(f"  {dtype}  first-step loss minus HF's: " +
                         ", ".join(f"{n} {d:.1e}" for n, d in r["loss_diff_vs_hf"].items() if n != "hf"))
    decode = results.get("decode")
    if decode:
        lines += ["", f"decode (batch 1, greedy, {decode['new_tokens']} new tokens)           tok/s    x HF   % of floor"]
        labels = {"hf": "HF generate", "ours": "ours generate_stream",
                  "floor": f"floor: {decode['weight_mb']:.0f} MB weights/token"}
        for key, row in decode.items():
            if key.startswith("threads_"):
                for i, name in enumerate(("hf", "ours", "floor")):
                    x, threads = row[name], f"{key.split('_')[1]} thread(s)" if i == 0 else ""
                    times_hf = f"{x['ratio_vs_hf']:7.2f}" if "ratio_vs_hf" in x else ("   1.00" if name == "hf" else "       ")
                    frac = f"{100 * x['fraction_of_floor']:10.0f}%" if "fraction_of_floor" in x else ""
                    lines.append(f"  {threads:12s} {labels[name]:30s} {x['tok_s']:8.1f} {times_hf}{frac}")
        lines.append(f"  same tokens as HF: {decode['same_tokens']}")
    moe = results.get("moe")
    if moe:
        lines += ["", f"MoE ({moe['experts']}) vs dense (hidden_dim {moe['dense_hidden_dim']}, same active params)",
                  f"  step: dense {moe['dense_step_s']:.2f} s, MoE {moe['moe_step_s']:.2f} s -> MoE/dense {moe['moe_over_dense']:.2f}"]
    alloc = results.get("alloc")
    if alloc and "skipped" in alloc:
        lines += ["", f"malloc: skipped ({alloc['skipped']})"]
    elif alloc:
        lines += ["", f"training step under glibc malloc ({alloc['tokens_per_step']} tokens/step, {alloc['dtype']}, "
                      f"{alloc['rounds']} processes per side)      tok/s  speed-up",
                  f"  {'default thresholds (freed blocks go back to the kernel)':58s} {alloc['default_tok_s']:8.0f}      1.00",
                  f"  {'keep_freed_memory (what the training stages run)':58s} {alloc['keep_tok_s']:8.0f} "
                  f"{alloc['keep_speedup']:9.2f}"]
    data = results.get("data")
    if data:
        lines += ["", "useful tokens per batch (demo corpus)"]
        for name, r in data.items():
            if name not in ("pretrain_memory", "json_reader"):
                extra = f", labelled {100 * r['labelled_fraction']:.1f}%" if "labelled_fraction" in r else ""
                lines.append(f"  {name:24s} {100 * r['useful_fraction']:6.1f}%{extra}  ({r['rows']} rows)")
        r = data["pretrain_memory"]
        lines.append(f"memory of a {r['steps']}-step 1-pretrain.py run   packed file   peak RSS   of which data pages   "
                     f"peak anonymous")
        for size in ("small", "large"):
            x = r[size]
            lines.append(f"  {size:5s}                                  {x['file_mb']:6.0f} MB  {x['peak_rss_mb']:6.0f} MB  "
                         f"{x['peak_data_resident_mb']:12.0f} MB  {x['peak_anon_mb']:12.0f} MB")
        lines.append(f"  anonymous memory growth {r['anon_growth_mb']:+.0f} MB for "
                     f"{r['large']['file_mb'] - r['small']['file_mb']:.0f} MB more data")
        r = data.get("json_reader")
        if r:
            lines.append(f"JSON array reading ({r['records']} records, {r['file_mb']:.1f} MB, median of {r['rounds']})"
                         f"   records/s   x json.load")
            lines.append(f"  iter_json_array (streaming)                  {r['iter_json_array_records_s']:10.0f} "
                         f"{r['speed_vs_json_load']:10.2f}")
            lines.append(f"  json.load (whole file in memory)             {r['json.load_records_s']:10.0f}       1.00")
    return "\n".join(lines + serve_table(results.get("serve")))


# ----------------------------------------------------------------------------------------------------------
# serve: the HTTP server (serve_openai_api.py) under concurrent streaming clients

def bench_serve(args) -> dict:
    """Aggregate decode tokens/s and time to first token for 1, 4, 16 concurrent streaming clients, each running
    --serve_requests requests back to back through the real openai client. max_tokens varies per request (so
    requests join and leave the batch at different steps, as under real load); median / p90 TTFT over all
    requests, the first burst included. The model: LMConfig from the shape flags, random weights (the speed
    does not depend on what it learnt), in a temporary checkpoint with the shipped tokenizer."""
    import socket
    import threading
    import urllib.request

    import openai

    from model.checkpoint import copy_tokenizer
    from model.runtime import DEFAULT_TOKENIZER_DIR

    out = {"clients": {}, "max_tokens": f"{args.serve_tokens // 2}..{args.serve_tokens}",
           "requests_per_client": args.serve_requests}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "random")
        torch.manual_seed(0)
        Transformer(model_config(args)).save_pretrained(checkpoint)
        copy_tokenizer(DEFAULT_TOKENIZER_DIR, checkpoint)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(os.path.join(tmp, "server.log"), "w")
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve_openai_api.py"), "--checkpoint",
                                   checkpoint, "--port", str(port), "--max_batch", "16", "--device", "cpu",
                                   "--log_level", "warning"], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 180
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise RuntimeError(open(os.path.join(tmp, "server.log")).read())
                    time.sleep(0.5)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)

            def one(max_tokens):
                """-> (completion tokens, seconds to the first token)"""
                start, first, usage = time.perf_counter(), None, None
                for chunk in client.chat.completions.create(
                        model="nano-llm", messages=[{"role": "user", "content": "请介绍一下长江。"}],
                        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - start
                    usage = chunk.usage or usage
                return usage.completion_tokens, first

            one(8)  # warm-up
            for n_clients in (1, 4, 16):
                results, lock = [], threading.Lock()

                def run_client(i):
                    for k in range(args.serve_requests):
                        half = args.serve_tokens // 2
                        r = one(half + (7 * i + 13 * k) % (half + 1))
                        with lock:
                            results.append(r)

                threads = [threading.Thread(target=run_client, args=(i,)) for i in range(n_clients)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                ttft = sorted(r[1] for r in results)
                out["clients"][n_clients] = {"tok_s": sum(r[0] for r in results) / wall,
                                             "ttft_median_s": statistics.median(ttft),
                                             "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
                                             "requests": len(results), "wall_s": wall}
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    one_client = out["clients"][1]
    for row in out["clients"].values():
        row["x_one_client"] = row["tok_s"] / one_client["tok_s"]
        row["ttft_x_one_client"] = row["ttft_median_s"] / one_client["ttft_median_s"]
    return out


def serve_table(serve) -> list:
    if not serve:
        return []
    lines = ["", f"serving (serve_openai_api.py, streaming chat, max_tokens {serve['max_tokens']}, "
                 f"{serve['requests_per_client']} requests per client)",
             "  clients    tok/s   x 1 client   TTFT median    p90   x 1 client"]
    for n, r in serve["clients"].items():
        lines.append(f"  {n:>7}  {r['tok_s']:7.1f}  {r['x_one_client']:10.2f}   {1000 * r['ttft_median_s']:8.0f} ms "
                     f"{1000 * r['ttft_p90_s']:5.0f} ms {r['ttft_x_one_client']:9.2f}")
    return lines


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load average {load:.1f} at start")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        help="also time our model under torch.compile (the trainer's --compile)")
    parser.add_argument("--compile_hf", action="store_true",
                        help="also time LlamaForCausalLM under torch.compile (not what an HF user gets by default)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 autocast rows: auto = only where a bf16 matmul is at least half as fast as fp32")
    parser.add_argument("--prompt_len", type=int, default=16, help="decode prompt length")
    parser.add_argument("--new_tokens", type=int, default=200, help="decoded tokens per run")
    parser.add_argument("--decode_rounds", type=int, default=3, help="timed decode runs per contestant")
    parser.add_argument("--peak_n", type=int, default=2048, help="matrix size of the peak matmul")
    parser.add_argument("--rss_tokens", type=int, default=64_000_000, help="tokens in the larger packed file")
    parser.add_argument("--rss_steps", type=int, default=30, help="pretraining steps of each RSS run")
    parser.add_argument("--reader_records", type=int, default=200_000,
                        help="records in the generated JSON array of the data section's reader timing")
    parser.add_argument("--reader_rounds", type=int, default=3, help="timed rounds of the JSON array reader timing")
    parser.add_argument("--moe", action="store_true", help="add the MoE section")
    parser.add_argument("--alloc_rounds", type=int, default=3, help="alloc: processes per side, in turn")
    parser.add_argument("--alloc_child", choices=["default", "keep"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only", default=None, help="comma-separated sections: peak,train,decode,moe,data,alloc,serve")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--save_json", default=None, help="also write the JSON to this file")
    parser.add_argument("--table_from", default=None, help="print the table of a JSON file saved earlier, and exit")
    parser.add_argument("--gpu", action="store_true", help="run bench_gpu.py (MFU on one GPU) instead")
    parser.add_argument("--serve", action="store_true",
                        help="add the serving section (HTTP server, 1/4/16 streaming clients; also --only serve)")
    parser.add_argument("--serve_tokens", type=int, default=64, help="serve: max_tokens per request (half to all)")
    parser.add_argument("--serve_requests", type=int, default=3, help="serve: requests per client, back to back")
    args = parser.parse_args()
    if args.table_from:
        with open(args.table_from) as f:
            return print(table(json.load(f)))
    if args.alloc_child:
        return alloc_child(args)
    if args.gpu:  # its own process: the two scripts share no code but the model's
        gpu_cmd = [sys.executable, os.path.join(ROOT, "bench_gpu.py")] + (["--json"] if args.json else [])
        sys.exit(subprocess.run(gpu_cmd).returncode)

    sections = args.only.split(",") if args.only else ["peak", "train", "decode", "alloc", "data"] + \
        (["moe"] if args.moe else []) + (["serve"] if args.serve else [])
    unknown = set(sections) - {"peak", "train", "decode", "moe", "alloc", "data", "serve"}
    if unknown:
        parser.error(f"unknown section(s) in --only: {', '.join(sorted(unknown))}")
    results = {"machine": machine(), "command": "python " + " ".join(sys.argv),
               "config": {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                        "seq_len", "batch_size", "steps", "peak_n")}}
    if "peak" in sections or "train" in sections:
        results["peak"] = bench_peak(args)
    for name, fn in (("train", lambda: bench_train(args, results["peak"])), ("decode", lambda: bench_decode(args)),
                     ("moe", lambda: bench_moe(args)), ("alloc", lambda: bench_alloc(args)),
                     ("data", lambda: bench_data(args)),
                     ("serve", lambda: bench_serve(args))):
        if name in sections:
            results[name] = fn()
            if not args.json:
                print(f"[{name} done]", file=sys.stderr, flush=True)
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1) if args.json else table(results))


if __name__ == "__main__":
    main()
