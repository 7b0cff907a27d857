"""
soak: serve_openai_api.py under abuse for a fixed time. Well-behaved clients (the official openai package, greedy,
streaming) run beside clients that send malformed JSON, huge bodies, thousands of messages, long stop lists, NaN
numbers, wrong content types and hosts, and that hang up mid-stream, mid-request and mid-body; a monitor polls
/health. Reported: 5xx answers (should be none), well-behaved answers that differ from their reference (none),
/health latency (p99 under 200 ms), the server's resident memory at the start, peak and end. Measurements:
docs/serving.md; tests/test_serve_abuse.py runs the same soak on a trained tiny model and asserts all four.

    python -m bench soak --soak_s 150 --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2

`soak(...)` is the loop itself, for any running server; run() serves random weights of the shape flags.
"""
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

USER = [{"role": "user", "content": "你好"}]
# /health is timed from its own process: in the clients' process, the time a request waits for that process's GIL
# would count as the server's.
MONITOR = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
latencies, end = [], time.time() + seconds
while time.time() < end:
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
        latencies.append(time.perf_counter() - start)
    except OSError:
        latencies.append(float("inf"))
    time.sleep(0.05)
print(json.dumps(latencies))
"""


def rss_bytes(pid):
    """Resident memory of a process (Linux /proc), or None elsewhere."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class Raw:
    """HTTP without a client library in the way: exactly these headers and bytes, hanging up when told."""

    def __init__(self, port, key=None):
        self.port, self.key = port, key

    def connect(self, path, body_length=None, content_type="application/json", host=None, method="POST"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{self.port}")
        if content_type:
            conn.putheader("Content-Type", content_type)
        if self.key:
            conn.putheader("Authorization", f"Bearer {self.key}")
        if body_length is not None:
            conn.putheader("Content-Length", str(body_length))
        conn.endheaders()
        return conn

    def post(self, body, path="/v1/chat/completions", **kwargs):
        """-> (status, body bytes)."""
        body = body if isinstance(body, bytes) else json.dumps(body).encode()  # json.dumps writes NaN as NaN
        conn = self.connect(path, len(body), **kwargs)
        try:
            conn.send(body)
        except OSError:  # the server answered (413) and closed while the rest of a huge body was on its way
            pass
        response = conn.getresponse()
        status, data = response.status, response.read()
        conn.close()
        return status, data

    def hang_up(self, conn):
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def abuses(raw):
    """{kind: (function -> the status seen, or None after hanging up early; the statuses it may get)}."""
    chat = lambda **fields: {"messages": USER, "max_tokens": 8, "temperature": 0, **fields}  # noqa: E731

    def disconnect_mid_stream():
        body = json.dumps(chat(max_tokens=64, stream=True)).encode()
        conn = raw.connect("/v1/chat/completions", len(body))
        conn.send(body)
        response = conn.getresponse()
        response.fp.readline()  # the first event: the stream is running
        raw.hang_up(conn)
        return response.status

    def disconnect_mid_request():
        body = json.dumps(chat(max_tokens=64)).encode()
        conn = raw.connect("/v1/chat/completions", len(body))
        conn.send(body)
        time.sleep(0.05)
        raw.hang_up(conn)

    def disconnect_mid_body():
        conn = raw.connect("/v1/chat/completions", 10_000)
        conn.send(b'{"messages": [{"role": "user", "content": "')
        raw.hang_up(conn)

    def huge_body_headers_only():  # a server that read before refusing would wait for the 100 MiB
        conn = raw.connect("/v1/chat/completions", 100 << 20)
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status

    many = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"第{k}句话。"} for k in range(2047)]
    sent = lambda body, **kwargs: lambda: raw.post(body, **kwargs)[0]  # noqa: E731  (bodies built once)
    encoded = lambda **fields: json.dumps(chat(**fields)).encode()  # noqa: E731
    return {
        "malformed JSON": (sent(b'{"messages": [{"role": "user", "content": "hi"}'), {400}),
        "nested 100,000 deep": (sent(b"[" * 100_000 + b"]" * 100_000), {400}),
        "lone surrogate": (sent(b'{"messages": [{"role": "user", "content": "\\udc80"}]}'), {400}),
        "2 MiB body": (sent(encoded(messages=[{"role": "user", "content": "长" * 700_000}])), {413}),
        "100 MiB announced": (huge_body_headers_only, {413}),
        "2,047 messages": (sent(encoded(messages=many + USER)), {200}),
        "5,000 messages": (sent(encoded(messages=USER * 5000)), {400}),
        "4 stops of 1,000 chars": (sent(encoded(stop=["好" * 999 + c for c in "一二三四"], stream=True)), {200}),
        "4 stops of 20,000 chars": (sent(encoded(stop=["好" * 20_000] * 4)), {400}),
        "NaN temperature": (sent(encoded(temperature=float("nan"))), {400}),
        "NaN penalty, greedy": (sent(encoded(repetition_penalty=float("nan"))), {400}),
        "Infinity top_p": (sent(encoded(top_p=float("inf"))), {400}),
        "seed 2**64": (sent(encoded(seed=2 ** 64)), {400}),
        "text/plain": (sent(encoded(), content_type="text/plain"), {415}),
        "no Content-Type": (sent(encoded(), content_type=None), {415}),
        "foreign Host": (sent(encoded(), host=f"evil.example:{raw.port}"), {403}),
        "hang up mid-stream": (disconnect_mid_stream, {200}),
        "hang up mid-request": (disconnect_mid_request, {None}),
        "hang up mid-body": (disconnect_mid_body, {None}),
    }


def soak(port, seconds, conversations, references, max_tokens, pid=None, key=None, n_good=3, n_abusers=3,
         warmup=None):
    """Run the soak against a server on 127.0.0.1:port for warmup + `seconds`; -> the report (a dict).
    conversations[i]'s greedy answer of at most max_tokens tokens must be references[i]. The server's memory (of
    process `pid`) is compared from the end of the warm-up (default: a tenth of `seconds`, at least 10 s), when
    every path has run under the same concurrency: a leak grows after it, a high-water mark does not."""
    warmup = max(10.0, seconds / 10) if warmup is None else warmup
    import openai
    raw = Raw(port, key)
    kinds = abuses(raw)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key or "-", max_retries=0, timeout=120)
    lock = threading.Lock()
    good = {"requests": 0, "mismatches": [], "errors": []}
    abuse = {kind: {} for kind in kinds}
    rss_start, rss_peak, rss_timeline, stop = [None], [0], [], threading.Event()

    def ask(i):
        chunks = client.chat.completions.create(model="nano-llm", messages=conversations[i], temperature=0,
                                                max_tokens=max_tokens, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def well_behaved(offset):
        k = offset
        while not stop.is_set():
            i, k = k % len(conversations), k + 1
            try:
                text = ask(i)
                with lock:
                    good["requests"] += 1
                    if text != references[i]:
                        good["mismatches"].append((i, text))
            except Exception as err:  # openai.InternalServerError for a 5xx, a connection error, ...
                with lock:
                    good["errors"].append(f"{type(err).__name__}: {err}"[:300])

    def abuser(offset):
        names, k = list(kinds), offset
        while not stop.is_set():
            kind, k = names[k % len(names)], k + 1
            try:
                status = kinds[kind][0]()
            except Exception as err:
                status = f"{type(err).__name__}: {err}"[:200]
            with lock:
                abuse[kind][status] = abuse[kind].get(status, 0) + 1

    def memory():
        begin = time.perf_counter()
        while pid and not stop.wait(1.0):
            rss = rss_bytes(pid) or 0
            if rss_start[0] is None and time.perf_counter() - begin >= warmup:
                rss_start[0] = rss
            rss_peak[0] = max(rss_peak[0], rss)
            if len(rss_timeline) <= (time.perf_counter() - begin) // 10:  # one sample per 10 s: growth or a plateau
                rss_timeline.append(round(rss / 2 ** 20, 1))

    threads = ([threading.Thread(target=memory)] + [threading.Thread(target=well_behaved, args=(i,)) for i in range(n_good)]
               + [threading.Thread(target=abuser, args=(5 * i,)) for i in range(n_abusers)])
    start = time.perf_counter()
    monitor = subprocess.Popen([sys.executable, "-c", MONITOR, f"http://127.0.0.1:{port}/health",
                                str(warmup + seconds)], stdout=subprocess.PIPE, text=True)
    for t in threads:
        t.start()
    health = json.loads(monitor.communicate(timeout=warmup + seconds + 120)[0])
    stop.set()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - start
    time.sleep(1)  # the last hang-ups reach the engine
    rss_end = rss_bytes(pid) if pid and rss_start[0] else None
    ms = sorted(1000 * h for h in health)
    statuses = [s for counts in abuse.values() for s in counts]
    return {
        "seconds": wall, "warmup_s": warmup,
        "good": {"requests": good["requests"], "mismatches": len(good["mismatches"]), "errors": len(good["errors"]),
                 "first_problems": (good["mismatches"] + good["errors"])[:3]},
        "abuse": {kind: {str(s): n for s, n in counts.items()} for kind, counts in abuse.items()},
        "abuse_requests": sum(n for counts in abuse.values() for n in counts.values()),
        "unexpected": sorted({f"{kind}: {s}" for kind, counts in abuse.items() for s in counts
                              if s not in kinds[kind][1]}),
        "n_5xx": sum(n for counts in abuse.values() for s, n in counts.items() if isinstance(s, int) and s >= 500)
                 + sum("InternalServerError" in e for e in good["errors"]),
        "statuses": sorted({s for s in statuses if isinstance(s, int)}),
        "health": {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))],
                   "max_ms": ms[-1]},
        "rss_mib": None if rss_end is None else {"after_warmup": rss_start[0] / 2 ** 20, "end": rss_end / 2 ** 20,
                                                 "peak": rss_peak[0] / 2 ** 20, "every_10s": rss_timeline},
    }


def run(args, results) -> dict:
    """The soak against serve_openai_api.py serving random weights of the shape flags (greedy answers run to
    max_tokens: a random model rarely says </s>); references from generate_stream in this process."""
    import torch

    from bench.common import model_config, running_server
    from model.chat import DEFAULT_TOKENIZER_DIR, encode_chat
    from model.checkpoint import copy_tokenizer
    from model.generate import generate_stream
    from model.model import Transformer
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    conversations = [[{"role": "user", "content": q}] for q in ("你好", "王小明在哪里工作？", "请介绍一下长江。")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "out", "pretrain_soak")
        torch.manual_seed(0)
        model = Transformer(model_config(args)).eval()
        model.save_pretrained(checkpoint)
        copy_tokenizer(DEFAULT_TOKENIZER_DIR, checkpoint)
        references = []
        for messages in conversations:
            tokens = []
            for next_ids in generate_stream(model, torch.tensor([encode_chat(tokenizer, messages)]),
                                            max_new_tokens=args.soak_tokens, temperature=0,
                                            eos_token_id=tokenizer.eos_token_id):
                if int(next_ids[0]) == tokenizer.eos_token_id:
                    break
                tokens.append(int(next_ids[0]))
            references.append(tokenizer.decode(tokens, skip_special_tokens=True))
        log_path = os.path.join(tmp, "server.log")
        with running_server(checkpoint, log_path, "--max_batch", "8", "--max_queue", "32") as (server, port):
            report = soak(port, args.soak_s, conversations, references, args.soak_tokens, pid=server.pid)
        report["server_tracebacks"] = open(log_path).read().count("Traceback")
    return report


def table(soak: dict) -> list:
    good, h, rss = soak["good"], soak["health"], soak["rss_mib"]
    lines = ["", f"soak (serve_openai_api.py under abuse, {soak['seconds']:.0f} s, the first {soak['warmup_s']:.0f} "
                 f"a warm-up)",
             f"  well-behaved streams {good['requests']:6d}   differing from the reference {good['mismatches']}   "
             f"errors {good['errors']}",
             f"  abusive requests     {soak['abuse_requests']:6d}   statuses {soak['statuses']}   5xx {soak['n_5xx']}"
             f"   unexpected {len(soak['unexpected'])}",
             f"  /health              {h['n']:6d}   p50 {h['p50_ms']:.1f} ms   p99 {h['p99_ms']:.1f} ms   "
             f"max {h['max_ms']:.1f} ms"]
    if rss:
        lines.append(f"  server RSS           after the warm-up {rss['after_warmup']:.0f} MiB   end {rss['end']:.0f} MiB"
                     f"   peak {rss['peak']:.0f} MiB")
    if "server_tracebacks" in soak:
        lines.append(f"  tracebacks in the server's log: {soak['server_tracebacks']}")
    return lines
