"""
Raw files -> the canonical files the stages read, the demo corpus, and the packed token file.

Run as:
    python data_process.py demo                  # dataset/demo/: every canonical file + eval files + packed pretraining tokens
    python data_process.py pretrain --data_path dataset/pretrain_data.jsonl       # or a .csv with a `text` column
    python data_process.py sft --data_path dataset/sft_data_zh.jsonl              # -> dataset/sft_data_single.jsonl + _multi.jsonl
    python data_process.py dpo --data_path dataset/dpo_zh.json                    # -> dataset/dpo_data.jsonl
    python data_process.py <subcommand> --help   # every flag explained

The demo flow, step by step (`demo` packs with the shipped model/tokenizer/, so step 1 alone is enough):
    python data_process.py demo
    python train_tokenizer.py --data_path dataset/demo/tokenizer_train.jsonl      # optional: a tokenizer for the demo text
    python data_process.py pretrain --data_path dataset/demo/pretrain_data.jsonl  # re-pack after a new tokenizer

Packed token file (`pretrain`), from dataset/X.jsonl by default (--out_path changes the base name):
    X.bin            the training tokens, raw little-endian uint16 (uint32 if the vocabulary has > 65536 tokens),
                     every document stored as <s> tokens </s>, documents back to back; np.memmap-able
    X.idx.npy        int64 document boundaries, n_docs + 1 entries: document k = tokens[idx[k]:idx[k+1]]
    X.meta.json      {"format", "dtype", "n_tokens", "n_docs", "vocab_size", "bos_id", "eos_id", "tokenizer_sha256", ...}
    X.val.bin, X.val.idx.npy, X.val.meta.json   the held-out validation documents, same layout
Text is encoded with special tokens disabled, so a literal "<s>" in a document is text, and the <s> id marks
exactly the document starts. Document k goes to validation when floor(k*r) != floor((k-1)*r), r = --val_ratio:
evenly spread, deterministic, and document 0 always, so the val part is never empty (--val_ratio 0: no X.val.*).

Bad input (malformed JSON, missing field, wrong type, empty text, invalid UTF-8, a CSV row with the wrong
column count, an invalid conversation) is reported as `file:line: kind: detail` on stderr (the first
--report_limit lines), counted per kind, and summarised at the end. If bad lines exceed --max_bad_ratio of all
lines the run exits with status 1 and publishes nothing. A structural error in a JSON array or CSV (after which
the rest of the file cannot be read) always fails the run, naming the byte offset and line where reading stopped
and how much of the file was left unread. Every output is written under a temporary name and
renamed when complete, so an interrupted run never leaves a truncated file under a final name. Inputs are
streamed: memory stays flat in the file size.
"""
import argparse
import json
import os
import sys
import time
from collections import Counter, deque

import numpy as np
from tqdm import tqdm

# model.errors, model.chat and model.data_formats, not torch: packing starts at once
from model.chat import DEFAULT_TOKENIZER_DIR, encode_documents, open_document_tokenizer, tokenizer_sha256
from model.data_formats import (BadRecord, Unreadable, detect_format, iter_jsonl_raw, iter_records, parse_json_line,
                                pretrain_text, publish, to_conversation, to_preference, zh_ratio)
from model.errors import BadLines


class AtomicOutput:
    """A file written under a temporary name; commit() fsyncs it, renames it into place and fsyncs the directory
    (durable once commit returns); discard() deletes it."""

    def __init__(self, path, mode="w"):
        self.path, self.tmp = path, f"{path}.tmp-{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(self.tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"}))

    def commit(self):
        publish(self.tmp, self.path, self.file)  # fsync, rename, fsync the directory

    def discard(self):
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def fail_unreadable(err, line_no):
    """A structural error lost the rest of a file: never one bad line among many, always a failed run."""
    sys.exit(f"error: {err.describe(line_no)}; nothing was written (fix the file, or convert it to JSONL "
             f"and re-run: a JSONL bad line loses only itself)")


def check_inputs(paths):
    for path in paths:
        if not os.path.isfile(path):
            sys.exit(f"error: {path}: no such file")


# ----------------------------------------------------------------------------------------------------------
# pretrain: text -> packed tokens

_worker = {}


def init_worker(tokenizer_json, bos_id, eos_id, in_pool=True):
    if in_pool:  # the pool is the parallelism: no extra tokenizer threads inside each worker
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=open_document_tokenizer(tokenizer_json), bos_id=bos_id, eos_id=eos_id)


def encode_chunk(items):
    """[(path, line_no, payload)] -> (bad lines, concatenated uint32 tokens, per-document lengths).
    payload: raw JSONL bytes, a parsed CSV row, or ("bad", kind, message) found by the reader."""
    texts, bad = [], []
    for path, line_no, payload in items:
        if isinstance(payload, tuple):
            bad.append((path, line_no, payload[2], payload[1]))
            continue
        record = parse_json_line(payload) if isinstance(payload, bytes) else payload
        try:
            if isinstance(record, BadRecord):
                raise record
            texts.append(pretrain_text(record))
        except BadRecord as err:
            bad.append((path, line_no, str(err), err.kind))
    docs = [np.array(ids, dtype=np.uint32)
            for ids in encode_documents(_worker["tokenizer"], texts, _worker["bos_id"], _worker["eos_id"])]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    return bad, (np.concatenate(docs) if docs else np.zeros(0, np.uint32)), lengths


def read_chunks(paths, chunk_bytes, chunk_lines=4096):
    """Chunks of (path, line_no, payload) plus their byte size; JSONL lines stay raw for the workers to parse."""
    items, size = [], 0
    for path in paths:
        fmt = detect_format(path)
        reader = iter_jsonl_raw(path) if fmt == "jsonl" else iter_records(path, fmt)
        for line_no, payload, n_bytes in reader:
            if isinstance(payload, Unreadable):
                fail_unreadable(payload, line_no)
            if isinstance(payload, BadRecord):
                payload = ("bad", payload.kind, str(payload))
            items.append((path, line_no, payload))
            size += n_bytes
            if size >= chunk_bytes or len(items) >= chunk_lines:
                yield items, size
                items, size = [], 0
    if items:
        yield items, size


class PackedSplit:
    """One packed part (train or val): tokens, document boundaries, meta; all published together by commit()."""

    def __init__(self, base, dtype):
        self.base, self.dtype, self.n_tokens, self.n_docs = base, dtype, 0, 0
        self.bin = AtomicOutput(base + ".bin", "wb")
        self.starts = AtomicOutput(base + ".idx.raw", "wb")  # int64 starts, streamed; becomes .idx.npy

    def write(self, tokens, lengths):
        if len(lengths):
            starts = self.n_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self.starts.file.write(starts.astype(np.int64).tobytes())
            self.bin.file.write(tokens.astype(self.dtype).tobytes())
            self.n_tokens += int(lengths.sum())
            self.n_docs += len(lengths)

    def commit(self, meta):
        self.starts.file.close()
        idx = AtomicOutput(self.base + ".idx.npy", "wb")
        idx.file.close()
        bounds = np.lib.format.open_memmap(idx.tmp, mode="w+", dtype=np.int64, shape=(self.n_docs + 1,))
        if self.n_docs:
            bounds[:-1] = np.memmap(self.starts.tmp, dtype=np.int64, mode="r")
        bounds[-1] = self.n_tokens
        bounds.flush()
        del bounds
        self.starts.discard()
        self.bin.commit()
        idx.commit()
        meta = {**meta, "dtype": np.dtype(self.dtype).name, "n_tokens": self.n_tokens, "n_docs": self.n_docs}
        meta_out = AtomicOutput(self.base + ".meta.json")  # meta last: its presence means "complete"
        json.dump(meta, meta_out.file, ensure_ascii=False, indent=2)
        meta_out.commit()

    def discard(self):
        self.bin.discard()
        self.starts.discard()


def packed_base(data_path, out_path=None):
    if out_path:
        return out_path[:-4] if out_path.endswith(".bin") else out_path
    return os.path.splitext(data_path)[0]


def pack_pretrain(data_paths, tokenizer_dir=DEFAULT_TOKENIZER_DIR, out_path=None, val_ratio=0.01, num_workers=1,
                  chunk_bytes=1 << 20, report_limit=20, max_bad_ratio=0.01):
    """Tokenize the documents of data_paths into <out_path>.bin (+ .idx.npy, .meta.json) and the .val.* part
    (every 1/val_ratio-th document). out_path None: the first input without its extension. Nothing is written
    when the input has more than max_bad_ratio bad lines (the first report_limit of them are listed)."""
    check_inputs(data_paths)
    tokenizer_json = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        sys.exit(f"error: {tokenizer_json}: no such file (train one with train_tokenizer.py)")
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(tokenizer_json)
    vocab_size, bos_id, eos_id = tokenizer.get_vocab_size(), tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    if bos_id is None or eos_id is None:
        sys.exit(f"error: {tokenizer_json}: the tokenizer has no <s>/</s> tokens")
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    base = packed_base(data_paths[0], out_path)
    meta = {"format": "nano-llm packed tokens v1", "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id,
            "tokenizer": tokenizer_dir, "tokenizer_sha256": tokenizer_sha256(tokenizer_dir),
            "source": data_paths, "val_ratio": val_ratio}
    train, val = PackedSplit(base, dtype), PackedSplit(base + ".val", dtype)
    report = BadLines(report_limit)
    total_bytes = sum(os.path.getsize(p) for p in data_paths)
    t0, n_docs, published = time.time(), 0, False
    pool = None
    try:
        if num_workers > 1:
            import multiprocessing
            pool = multiprocessing.get_context().Pool(num_workers, init_worker, (tokenizer_json, bos_id, eos_id))
            submit = lambda chunk: pool.apply_async(encode_chunk, (chunk,))  # noqa: E731
        else:
            init_worker(tokenizer_json, bos_id, eos_id, in_pool=False)  # the tokenizer may use its own threads
            submit = lambda chunk: _Done(encode_chunk(chunk))  # noqa: E731
        pending = deque()  # at most 2 chunks per worker in flight: ordered results, bounded memory
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr) as bar:
            def drain(limit):
                nonlocal n_docs
                while len(pending) > limit:
                    future, size, n_items = pending.popleft()
                    bad, tokens, lengths = future.get()
                    for item in bad:
                        report.add(*item)
                    report.total += n_items
                    doc_ids = n_docs + np.arange(len(lengths))
                    is_val = np.floor(doc_ids * val_ratio) != np.floor((doc_ids - 1) * val_ratio)
                    token_is_val = np.repeat(is_val, lengths)
                    train.write(tokens[~token_is_val], lengths[~is_val])
                    val.write(tokens[token_is_val], lengths[is_val])
                    n_docs += len(lengths)
                    bar.update(size)
                    bar.set_postfix(docs=n_docs, tokens=train.n_tokens + val.n_tokens)
            for chunk, size in read_chunks(data_paths, chunk_bytes):
                pending.append((submit(chunk), size, len(chunk)))
                drain(2 * max(1, num_workers))
            drain(0)
        elapsed = time.time() - t0
        if not report.verdict(max_bad_ratio):
            sys.exit(1)
        if n_docs == 0:
            sys.exit(f"error: no usable document in {', '.join(data_paths)}")
        train.commit({**meta, "split": "train"})
        if val.n_docs:
            val.commit({**meta, "split": "val"})
        else:  # --val_ratio 0: no validation part, and no stale one from an earlier run
            val.discard()
            for suffix in (".bin", ".idx.npy", ".meta.json"):
                if os.path.exists(f"{base}.val{suffix}"):
                    os.remove(f"{base}.val{suffix}")
        published = True
    finally:
        if pool is not None:
            pool.terminate()
        if not published:
            train.discard()
            val.discard()
    n_tokens = train.n_tokens + val.n_tokens
    print(f"{n_docs} documents, {n_tokens} tokens ({train.n_tokens} train in {train.n_docs} docs, {val.n_tokens} val "
          f"in {val.n_docs} docs), {np.dtype(dtype).name}, vocab {vocab_size} -> {base}.bin, {base}.val.bin")
    print(f"throughput: {total_bytes / 1e6 / elapsed:.2f} MB/s, {n_tokens / elapsed:,.0f} tokens/s "
          f"({elapsed:.1f} s, {max(1, num_workers)} process(es))", flush=True)


def run_pretrain(args):
    pack_pretrain(args.data_path, args.tokenizer_dir, args.out_path, args.val_ratio, args.num_workers,
                  args.chunk_bytes, args.report_limit, args.max_bad_ratio)


class _Done:
    """A finished result that looks like multiprocessing's AsyncResult (single-process path)."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


# ----------------------------------------------------------------------------------------------------------
# sft / dpo: any supported format -> canonical JSONL

def sft_filter(messages, args):
    """The seed's filters, all off by default. Returns the reason a conversation is dropped, or None."""
    prompts = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if args.min_prompt_chars and min(map(len, prompts)) < args.min_prompt_chars:
        return "prompt shorter than --min_prompt_chars"
    if args.max_prompt_chars and max(map(len, prompts)) > args.max_prompt_chars:
        return "prompt longer than --max_prompt_chars"
    if args.min_answer_chars and min(map(len, answers)) < args.min_answer_chars:
        return "answer shorter than --min_answer_chars"
    if args.max_answer_chars and max(map(len, answers)) > args.max_answer_chars:
        return "answer longer than --max_answer_chars"
    if args.min_zh_ratio and zh_ratio("".join(prompts + answers)) < args.min_zh_ratio:
        return "Chinese ratio below --min_zh_ratio"
    return None


def convert(args, outputs, convert_record, route):
    """Stream every input through convert_record; route(record) names the output it is written to."""
    check_inputs(args.data_path)
    report, filtered, written = BadLines(args.report_limit), Counter(), Counter()
    files = {name: AtomicOutput(path) for name, path in outputs.items()}
    try:
        for path in args.data_path:
            bar = tqdm(total=os.path.getsize(path), desc=path, unit="B", unit_scale=True, file=sys.stderr)
            for line_no, record, size in iter_records(path, args.format):
                bar.update(size)  # bytes (approximate for CSV and JSON arrays): the bar has an ETA
                if isinstance(record, Unreadable):
                    fail_unreadable(record, line_no)
                report.total += 1
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    canonical = convert_record(record)
                except BadRecord as err:
                    report.add(path, line_no, str(err), err.kind)
                    continue
                reason = sft_filter(canonical["conversations"], args) if "conversations" in canonical else None
                if reason:
                    filtered[reason] += 1
                    continue
                name = route(canonical)
                files[name].file.write(json.dumps(canonical, ensure_ascii=False) + "\n")
                written[name] += 1
            bar.close()
        if not report.verdict(args.max_bad_ratio):
            sys.exit(1)
        for name, output in files.items():
            output.commit()
            print(f"{output.path}: {written[name]} records", flush=True)
        for reason, n in filtered.items():
            print(f"filtered ({reason}): {n}", flush=True)
    finally:
        for output in files.values():
            if not output.file.closed:
                output.discard()


def run_sft(args):
    outputs = {"single": os.path.join(args.out_dir, "sft_data_single.jsonl"),
               "multi": os.path.join(args.out_dir, "sft_data_multi.jsonl")}
    n_answers = lambda conv: sum(m["role"] == "assistant" for m in conv["conversations"])  # noqa: E731
    convert(args, outputs, lambda r: {"conversations": to_conversation(r)},
            lambda conv: "single" if n_answers(conv) == 1 else "multi")


def run_dpo(args):
    convert(args, {"dpo": args.out_path}, to_preference, lambda record: "dpo")


def run_demo(args):
    from demo_corpus import generate_demo
    t0 = time.time()
    counts = generate_demo(args.out_dir, args.seed, args.n_people, args.n_bios, args.sft_people_ratio,
                           args.heldout_pair_ratio, args.eval_size, args.dpo_people_ratio)
    for name, n in counts.items():
        path = os.path.join(args.out_dir, name)
        print(f"{path}: {n} records, {os.path.getsize(path) / 1e6:.2f} MB", flush=True)
    print(f"demo corpus generated in {time.time() - t0:.1f} s", flush=True)
    if not args.no_pack:
        pack_pretrain([os.path.join(args.out_dir, "pretrain_data.jsonl")], args.tokenizer_dir, None, args.val_ratio,
                      args.num_workers, args.chunk_bytes, args.report_limit, args.max_bad_ratio)


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p, data_path_default):
        p.add_argument("--max_bad_ratio", type=float, default=0.01,
                       help="fail (exit 1, write nothing) when more than this fraction of input lines is bad")
        p.add_argument("--report_limit", type=int, default=20, help="list at most this many bad lines on stderr")
        if data_path_default is not None:
            p.add_argument("--data_path", nargs="+", default=[data_path_default],
                           help="input file(s): .jsonl, .csv, or .json (JSON array or JSON lines)")
            p.add_argument("--format", choices=["jsonl", "csv", "json_array"], default=None,
                           help="input container format (default: from the file extension)")

    def packing(p):
        p.add_argument("--tokenizer_dir", default=DEFAULT_TOKENIZER_DIR,
                       help="directory with tokenizer.json (default: the shipped model/tokenizer/)")
        p.add_argument("--val_ratio", type=float, default=0.01, help="fraction of documents held out for validation")
        p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                       help="tokenizer processes (1 = tokenize in this process, with the tokenizer's threads)")
        p.add_argument("--chunk_bytes", type=int, default=1 << 20, help="input bytes sent to a worker at a time")

    p = commands.add_parser("demo", help="generate the demo corpus into dataset/demo/ and pack its pretraining text",
                            description="Generate the demo world (demo_corpus.py) into --out_dir: every "
                            "canonical file, the eval files and world.json; then pack pretrain_data.jsonl with "
                            "--tokenizer_dir unless --no_pack.")
    from demo_corpus import add_demo_args
    add_demo_args(p)
    packing(p)
    common(p, None)
    p.add_argument("--no_pack", action="store_true", help="only write the text files, do not tokenize")

    p = commands.add_parser("pretrain", help="JSONL {text} / CSV text column -> packed token file",
                            description="Tokenize documents into X.bin + X.idx.npy + X.meta.json and the X.val.* "
                            "validation part (layout: see `python data_process.py --help`).")
    common(p, "dataset/pretrain_data.jsonl")
    packing(p)
    p.add_argument("--out_path", default=None,
                   help="output base (X -> X.bin, X.val.bin, ...); default: the first input without its extension")

    p = commands.add_parser("sft", help="SFT data in any supported format -> sft_data_single/multi.jsonl",
                            description="Convert the seed's CSV (history,q,a), deepctrl JSONL (instruction/input/"
                            "output/history), ShareGPT (from/value), alpaca JSON arrays or canonical role/content "
                            "conversations; one assistant turn -> sft_data_single.jsonl, more -> sft_data_multi.jsonl.")
    common(p, "dataset/sft_data_zh.jsonl")
    p.add_argument("--out_dir", default="dataset", help="where sft_data_single.jsonl and sft_data_multi.jsonl go")
    for name, what in [("min_prompt_chars", "drop a conversation with a user message shorter than this"),
                       ("max_prompt_chars", "drop a conversation with a user message longer than this"),
                       ("min_answer_chars", "drop a conversation with an assistant message shorter than this"),
                       ("max_answer_chars", "drop a conversation with an assistant message longer than this")]:
        p.add_argument(f"--{name}", type=int, default=0, help=f"{what} (0 = off)")
    p.add_argument("--min_zh_ratio", type=float, default=0.0,
                   help="drop a conversation whose share of Chinese characters is below this (0 = off)")

    p = commands.add_parser("dpo", help="preference data in any supported format -> dpo_data.jsonl",
                            description="Convert chosen/rejected message lists, prompt/chosen/rejected strings, or "
                            "conversations + chosen/rejected (strings, messages or message lists).")
    common(p, "dataset/dpo.jsonl")
    p.add_argument("--out_path", default="dataset/dpo_data.jsonl", help="output file")

    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # status lines reach a log file as they are printed
        sys.stdout.reconfigure(line_buffering=True)
    {"demo": run_demo, "pretrain": run_pretrain, "sft": run_sft, "dpo": run_dpo}[args.command](args)


if __name__ == "__main__":
    main()
