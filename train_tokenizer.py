"""
Train the byte-level BPE tokenizer and write it as a Hugging Face tokenizer directory.

Run as:
    python train_tokenizer.py                                                   # dataset/tokenizer_train.jsonl -> model/tokenizer/
    python train_tokenizer.py --data_path dataset/demo/tokenizer_train.jsonl    # exactly how the shipped model/tokenizer/ was made

Input: JSONL, one {"text": "..."} per line, read as a stream (memory grows with the number of distinct
pre-tokens, not with the file size). Lines that are not usable are counted, the first few reported, and skipped.

The tokenizer
- byte-level BPE (every byte sequence round-trips: decode(encode(x)) == x for any text), vocab `--vocab_size`
  (6400 by default, the seed's size); special tokens <unk>=0, <s>=1 (bos), </s>=2 (eos); pad = <unk> (id 0),
  so padding is never mistaken for an end of text. Nothing is added automatically by encode(): the data
  pipeline writes <s>...</s> itself.
- pre-tokenisation splits every CJK ideograph into its own piece and every digit into its own piece. With a
  vocabulary this small, merges are better spent on whole characters than on a few multi-character words;
  it also means a prompt cut between any two characters ("张伟出生于" | "杭州") is tokenised exactly as in
  training, and numbers are read digit by digit, which is what lets a small model learn arithmetic.
  `--merge_cjk` restores minimind-style multi-character Chinese tokens.
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

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 in this order, as in the seed
CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs (extension A, unified, compatibility)
# No "-" whitespace control next to the newlines: "</s>\n" between turns is part of the format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def pretokenize_pattern(merge_cjk=False):
    """GPT-2's split pattern with single digits and, unless merge_cjk, single CJK ideographs. One regex is
    ~1.5x faster than chaining Split + Digits + ByteLevel's own regex, with the same pieces."""
    if merge_cjk:
        return r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    return (rf"'s|'t|'re|'ve|'m|'ll|'d|[{CJK}]| ?[\p{{L}}&&[^{CJK}]]+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+"
            r"|\s+(?!\S)|\s+")


def build_tokenizer(merge_cjk=False):
    """An untrained byte-level BPE with this project's pre-tokenisation and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pretokenize_pattern(merge_cjk)), behavior="isolated"),
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


def train(data_path, vocab_size=6400, merge_cjk=False, min_frequency=2):
    tokenizer = build_tokenizer(merge_cjk)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any input is encodable
        show_progress=True,
    )
    t0 = time.time()
    tokenizer.train_from_iterator(iter_texts(data_path), trainer=trainer)  # the reading bar has the ETA
    print(f"trained {tokenizer.get_vocab_size()} tokens in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, f"{token} must have id {token_id}"
    return tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="dataset/tokenizer_train.jsonl",
                        help='JSONL file with one {"text": ...} per line')
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "tokenizer"),
                        help="directory for tokenizer.json + tokenizer_config.json (default: this repo's model/tokenizer/)")
    parser.add_argument("--vocab_size", type=int, default=6400,
                        help="target vocabulary size incl. the 3 special tokens; LMConfig.vocab_size must match")
    parser.add_argument("--min_frequency", type=int, default=2,
                        help="a pair seen fewer times than this is never merged")
    parser.add_argument("--merge_cjk", action="store_true",
                        help="allow merges across CJK characters (multi-character Chinese tokens, as in minimind)")
    parser.add_argument("--model_max_length", type=int, default=32768,
                        help="written to tokenizer_config.json; only a hint for external tools")
    args = parser.parse_args()
    if not os.path.isfile(args.data_path):
        sys.exit(f"error: {args.data_path}: no such file (for the demo corpus run `python data_process.py demo` first)")

    sys.stdout.reconfigure(line_buffering=True)  # status lines reach a log file as they are printed
    print(f"training a {args.vocab_size}-token BPE tokenizer on {args.data_path} (reading, then merging: the "
          f"merge phase shows its own bar only on a terminal)", file=sys.stderr, flush=True)
    tokenizer = train(args.data_path, args.vocab_size, args.merge_cjk, args.min_frequency)
    stats = iter_texts.stats
    if stats["lines"] == stats["bad"]:
        sys.exit(f"error: {args.data_path}: no usable line ({stats['bad']} bad)")
    save_tokenizer_dir(tokenizer, args.out_dir, args.model_max_length)
    size = tokenizer.get_vocab_size()
    print(f"read {stats['lines']} lines ({stats['bad']} skipped); vocab_size {size}; wrote {args.out_dir}", flush=True)
    if size != args.vocab_size:
        print(f"note: the data supports only {size} tokens (asked for {args.vocab_size}); "
              f"set the model's vocab_size to {size}", file=sys.stderr)


if __name__ == "__main__":
    main()
