"""
serve: serve_openai_api.py as a subprocess, random weights of the shape flags: aggregate decode tokens/s and time
to first token for 1, 4, 16 concurrent streaming clients (the official openai client). Measurements:
docs/serving.md.

    python -m bench serve --serve_tokens 64 --serve_requests 3
"""
import os
import statistics
import tempfile
import threading
import time

import openai
import torch

from bench.common import model_config, running_server
from model.model import Transformer
from model.checkpoint import copy_tokenizer
from model.chat import DEFAULT_TOKENIZER_DIR


def run(args, results) -> dict:
    """Aggregate decode tokens/s and time to first token for 1, 4, 16 concurrent streaming clients, each running
    --serve_requests requests back to back through the real openai client. max_tokens varies per request (so
    requests join and leave the batch at different steps, as under real load); median / p90 TTFT over all
    requests, the first burst included. The model: LMConfig from the shape flags, random weights (the speed
    does not depend on what it learnt), in a temporary checkpoint with the shipped tokenizer."""
    out = {"clients": {}, "max_tokens": f"{args.serve_tokens // 2}..{args.serve_tokens}",
           "requests_per_client": args.serve_requests}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "random")
        torch.manual_seed(0)
        Transformer(model_config(args)).save_pretrained(checkpoint)
        copy_tokenizer(DEFAULT_TOKENIZER_DIR, checkpoint)
        with running_server(checkpoint, os.path.join(tmp, "server.log"), "--max_batch", "16") as (_, port):
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
    one_client = out["clients"][1]
    for row in out["clients"].values():
        row["x_one_client"] = row["tok_s"] / one_client["tok_s"]
        row["ttft_x_one_client"] = row["ttft_median_s"] / one_client["ttft_median_s"]
    return out


def table(serve: dict) -> list:
    lines = ["", f"serving (serve_openai_api.py, streaming chat, max_tokens {serve['max_tokens']}, "
                 f"{serve['requests_per_client']} requests per client)",
             "  clients    tok/s   x 1 client   TTFT median    p90   x 1 client"]
    for n, r in serve["clients"].items():
        lines.append(f"  {n:>7}  {r['tok_s']:7.1f}  {r['x_one_client']:10.2f}   {1000 * r['ttft_median_s']:8.0f} ms "
                     f"{1000 * r['ttft_p90_s']:5.0f} ms {r['ttft_x_one_client']:9.2f}")
    return lines
