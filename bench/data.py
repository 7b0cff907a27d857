"""
data: share of useful tokens in pretraining and SFT batches of the demo corpus (dataset/demo, generated into a
temporary directory if missing); peak RSS of a short 1-pretrain.py run over packed files of two sizes, both far
larger than a batch: the difference shows whether memory grows with the data. (The file's pages that the run
touched show up in RSS as page cache, shared and reclaimable; the process's own memory is the anonymous part.)
Also: records/s of data_process.py's streaming JSON array reader (model.data_formats.iter_json_array) on a
generated array of --reader_records small alpaca records, next to json.load of the same file (the whole file in
memory: the reference speed).

    python -m bench data --rss_tokens 64000000 --rss_steps 30
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import ROOT, ratio, take_turns


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


def json_reader(n_records: int, rounds: int, tmp: str) -> dict:
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


def run(args, results) -> dict:
    from model.dataset import PretrainDataset, SFTDataset, pretrain_useful_fraction
    from model.chat import DEFAULT_TOKENIZER_DIR, load_tokenizer
    from model.trainer import ResumableBatchSampler
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["json_reader"] = json_reader(args.reader_records, args.reader_rounds, tmp)
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
            cmd = [sys.executable, "1-pretrain.py", "--data_path", path,
                   "--out_dir", os.path.join(tmp, f"run_{n_tokens}"),  # its own: a run directory is never reused
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


def table(data: dict) -> list:
    lines = ["", "useful tokens per batch (demo corpus)"]
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
    return lines
