"""
Decode speed, batch 1, 200 new greedy tokens: llama.cpp (llama-cpp-python) for each GGUF outtype vs this project's
model.generate.generate_stream, on the default LMConfig with random weights (speed does not depend on them).

Run from the repo root:
    THREADS=1 python docs/bench_gguf.py /tmp/gguf_bench      # writes bench-{f32,f16,q8_0}.gguf there
Results: docs/gguf.md.
"""
import os
import sys
import time

import torch
sys.path.insert(0, os.getcwd())  # run from the repo root
from model import LMConfig, Transformer
from model.generate import generate_stream
from model.gguf_export import export_gguf
from llama_cpp import Llama

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gguf_bench"
os.makedirs(out, exist_ok=True)
threads = int(os.environ.get("THREADS", "2"))
torch.set_num_threads(threads)
torch.manual_seed(0)
model = Transformer(LMConfig(max_seq_len=512)).eval()
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, threads {threads}")
prompt = [1, 100, 200, 300, 400]
N = 200
for outtype in ("f32", "f16", "q8_0"):
    path = os.path.join(out, f"bench-{outtype}.gguf")
    size = export_gguf(model, "model/tokenizer", path, outtype)
    llm = Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    best = 1e9
    for _ in range(3):
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(N):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])  # greedy, as in tests/test_gguf.py
        best = min(best, time.perf_counter() - t0)
    # the same through the high-level sampler path (greedy), as a user would call it
    t0, n = time.perf_counter(), 0
    for _ in llm.generate(prompt, temp=0.0, reset=True):
        n += 1
        if n == N: break
    gen = time.perf_counter() - t0
    print(f"llama.cpp {outtype}: {size / 2**20:.1f} MiB, eval loop {N / best:.0f} tok/s, generate() {N / gen:.0f} tok/s (incl. prompt)")
    del llm
with torch.no_grad():
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in generate_stream(model, torch.tensor([prompt]), max_new_tokens=N, temperature=0):
            pass
        best = min(best, time.perf_counter() - t0)
print(f"project generate_stream (torch {torch.__version__}, float32): {N / best:.0f} tok/s (incl. prompt)")
