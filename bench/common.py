"""
What every benchmark section shares: turn-taking timing, the per-round ratio, the model shape from the flags, one
training step, greedy decoding through generate_stream, and a line describing the machine. Not run by itself.
"""
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import torch

from model.LMConfig import LMConfig
from model.generate import generate_stream
from model.runtime import autocast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def model_config(args, **overrides) -> LMConfig:
    """LMConfig of the shape flags, long enough for both a training row and a decode run."""
    kwargs = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, args.prompt_len + args.new_tokens))
    kwargs.update(overrides)
    return LMConfig(**kwargs)


def training_step(model, optimizer, batch, device=torch.device("cpu"), dtype="float32"):
    """A function that runs one forward + backward + optimizer step on batch (its own labels) and returns the
    loss. dtype: the autocast precision, as the training stages name it (float32, bfloat16)."""
    def step():
        with autocast(device, dtype):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def greedy_tokens(model, prompt, n: int) -> list:
    """n greedy tokens after prompt (1, T) through model.generate.generate_stream, as the project decodes."""
    with torch.no_grad():
        return torch.cat(list(generate_stream(model, prompt, max_new_tokens=n, temperature=0))).tolist()


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


@contextmanager
def running_server(checkpoint: str, log_path: str, *flags):
    """serve_openai_api.py on a free 127.0.0.1 port, waited for until /health answers (the log is the error if it
    dies first); stopped on exit. -> (process, port)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve_openai_api.py"), "--checkpoint",
                                   checkpoint, "--port", str(port), "--device", "cpu", "--log_level", "warning",
                                   *flags], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(open(log_path).read())
                time.sleep(0.5)
        yield server, port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
