"""
engine: model/engine.py in this process (no HTTP), random weights of the shape flags, --max_batch 16 slots:
aggregate decode tokens/s with 1..32 concurrent requests (each a different --prompt_len prompt, greedy,
--engine_tokens new tokens; over 16 the rest wait for a slot), on the eager step (fast_decode mode "off", the
engine as it was) and on the compiled steps (fast_decode.EngineSteps, compiled before the timing, compile time
reported), taking turns. "x batch 1": the aggregate over the same side's one-request rate. Measurements:
docs/performance.md.

    python -m bench engine --engine_streams 1,2,4,8,16,32 --engine_tokens 64 --decode_rounds 3
"""
import statistics
import threading
import time

import torch

from bench.common import model_config, ratio, take_turns
from model import fast_decode
from model.engine import Engine, GenerationRequest
from model.model import Transformer

MAX_BATCH = 16


def run_requests(engine, prompts, new_tokens: int) -> list:
    """Submit every prompt at once, wait for all; -> the generated ids of each."""
    done = threading.Semaphore(0)
    requests = [GenerationRequest(p, max_new_tokens=new_tokens, on_done=lambda reason, error: done.release())
                for p in prompts]
    for request in requests:
        engine.submit(request)
    for _ in requests:
        if not done.acquire(timeout=3600):
            raise RuntimeError("engine: a request did not finish")
    return [r.ids[len(p):] for r, p in zip(requests, prompts)]


def run(args, results) -> dict:
    config = model_config(args)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    streams = [int(s) for s in args.engine_streams.split(",")]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(max(streams))]
    engines = {}
    for mode in ("off", "on"):
        fast_decode.set_mode(mode)
        start = time.perf_counter()
        engines[mode] = Engine(model, eos_token_id=-1, max_batch=MAX_BATCH, max_queue=max(streams)).start()
        if mode == "on":
            compile_s = time.perf_counter() - start
    fast_decode.set_mode("auto")
    out = {"max_batch": MAX_BATCH, "new_tokens": args.engine_tokens, "prompt_len": args.prompt_len,
           "threads": torch.get_num_threads(), "compile_s": compile_s,
           "fast_ready": engines["on"].fast is not None and engines["on"].fast.ready(), "streams": {}}
    answers = {}
    try:
        for n in streams:
            contestants = {name: (lambda e=engine, name=name: answers.__setitem__(
                name, run_requests(e, prompts[:n], args.engine_tokens))) for name, engine in
                (("eager", engines["off"]), ("fast", engines["on"]))}
            times = take_turns(contestants, args.decode_rounds, 1)
            row = {name: {"tok_s": n * args.engine_tokens / statistics.median(ts)} for name, ts in times.items()}
            row["fast"]["x_eager"] = ratio(times, "fast", "eager")
            row["same_tokens"] = sum(a == b for a, b in zip(answers["eager"], answers["fast"]))
            out["streams"][n] = row
    finally:
        for engine in engines.values():
            engine.stop()
    for row in out["streams"].values():
        for name in ("eager", "fast"):
            row[name]["x_batch_1"] = row[name]["tok_s"] / out["streams"][streams[0]][name]["tok_s"] \
                if streams[0] == 1 else None
    return out


def table(engine: dict) -> list:
    lines = ["", f"engine (in process, max_batch {engine['max_batch']}, {engine['threads']} threads; each request "
                 f"{engine['new_tokens']} greedy tokens after {engine['prompt_len']}; compiled steps ready: "
                 f"{engine['fast_ready']}, compile {engine['compile_s']:.0f} s)",
             "  requests   eager tok/s  x batch 1    fast tok/s  x batch 1  fast x eager  same tokens"]
    for n, row in engine["streams"].items():
        e, f = row["eager"], row["fast"]
        x1 = lambda x: f"{x['x_batch_1']:9.2f}" if x.get("x_batch_1") is not None else f"{'':9s}"  # noqa: E731
        lines.append(f"  {n:>8}  {e['tok_s']:12.1f}  {x1(e)}  {f['tok_s']:12.1f}  {x1(f)}  {f['x_eager']:12.2f}"
                     f"  {row['same_tokens']}/{n}")
    return lines
