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


def test_cjk_characters_and_digits_are_separate_pieces(tokenizer):
    # a completion prompt cut anywhere between characters tokenizes as in training
    whole = tokenizer.encode("张伟出生于杭州")
    assert tokenizer.encode("张伟出生于") + tokenizer.encode("杭州") == whole
    assert len(whole) == 7
    assert len(tokenizer.encode("1234567890")) == 10


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


def test_shipped_tokenizer_is_reproducible_from_the_demo_corpus(demo_dir, tmp_path):
    """model/tokenizer/ is exactly what the documented command makes (retrain it if the demo corpus changes)."""
    result = run_train(os.path.join(demo_dir, "tokenizer_train.jsonl"), str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == open(os.path.join(SHIPPED_TOKENIZER, name), "rb").read(), \
            f"model/tokenizer/{name} is stale: python data_process.py demo && python train_tokenizer.py " \
            f"--data_path dataset/demo/tokenizer_train.jsonl"
