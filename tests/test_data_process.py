"""data_process.py: converters, bad-input reporting, atomic outputs, packing; the demo corpus generator."""
import csv
import json
import os
import re

import numpy as np
import pytest
from tokenizers import Tokenizer

import data_process
from conftest import SHIPPED_TOKENIZER
import demo_corpus

DOCS = ["张伟出生于杭州。他毕业于东湖大学。", "Plain English text, with punctuation!", "emoji 😀 and digits 12345",
        "a literal <s> and </s> stay text", "多行\n文本\t制表符", "最后一篇。"] * 3


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def decode_packed(base):
    """All documents of a packed part, decoded back to text (bos/eos checked)."""
    meta = json.load(open(base + ".meta.json"))
    tokens = np.memmap(base + ".bin", dtype=meta["dtype"], mode="r")
    bounds = np.load(base + ".idx.npy")
    assert len(bounds) == meta["n_docs"] + 1 and bounds[-1] == len(tokens) == meta["n_tokens"]
    tok = Tokenizer.from_file(os.path.join(SHIPPED_TOKENIZER, "tokenizer.json"))
    docs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        ids = tokens[start:end].tolist()
        assert ids[0] == meta["bos_id"] and ids[-1] == meta["eos_id"]
        assert meta["bos_id"] not in ids[1:]  # <s> marks document starts only
        docs.append(tok.decode(ids[1:-1], skip_special_tokens=False))
    return docs


# ----------------------------------------------------------------------------------------------------------
# pretrain

@pytest.mark.parametrize("workers", [1, 2])
def test_pretrain_packs_and_decodes_back(tmp_path, workers, capsys):
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in DOCS])
    data_process.main(["pretrain", "--data_path", src, "--num_workers", str(workers), "--val_ratio", "0.2",
                       "--chunk_bytes", "64"])  # tiny chunks: many round trips through the pool, order kept
    base = str(tmp_path / "corpus")
    train, val = decode_packed(base), decode_packed(base + ".val")
    # doc k is val iff floor(k r) != floor((k-1) r): 0, 5, 10, 15 for r = 0.2
    assert val == [DOCS[k] for k in (0, 5, 10, 15)]
    assert train == [d for k, d in enumerate(DOCS) if k not in (0, 5, 10, 15)]
    meta = json.load(open(base + ".meta.json"))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 6400 and meta["split"] == "train"
    out = capsys.readouterr().out
    assert "MB/s" in out and "tokens/s" in out
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_pretrain_csv_with_text_column(tmp_path, capsys):
    path = tmp_path / "corpus.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerow(["1", "第一篇，含逗号"])
        w.writerow(["2", "第二篇\n跨两行"])
        w.writerow(["3", "多了一列", "extra"])
        w.writerow(["4", "第四篇"])
    data_process.main(["pretrain", "--data_path", str(path), "--num_workers", "1", "--val_ratio", "0",
                       "--max_bad_ratio", "0.5"])
    assert decode_packed(str(tmp_path / "corpus")) == ["第一篇，含逗号", "第二篇\n跨两行", "第四篇"]
    assert not (tmp_path / "corpus.val.bin").exists()  # --val_ratio 0: no validation part
    err = capsys.readouterr().err
    assert f"{path}:5: wrong column count: expected 2 (id,text), got 3" in err  # row 3 starts on line 5
    assert "bad lines: 1 of 4 (25.00%): wrong column count 1" in err


def bad_pretrain_file(tmp_path):
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in DOCS[:6]]
    lines[1] = b'{"text": "unterminated'
    lines[2] = json.dumps({"content": "no text field"}).encode()
    lines[3] = json.dumps({"text": 42}).encode()
    lines[4] = json.dumps({"text": "   "}).encode()
    lines.append(b'{"text": "bad byte \xff here"}')
    lines.append(b"")
    lines.append(json.dumps(["not", "an", "object"]).encode())
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_pretrain_reports_every_bad_kind(tmp_path, capsys):
    src = bad_pretrain_file(tmp_path)
    data_process.main(["pretrain", "--data_path", src, "--num_workers", "1", "--max_bad_ratio", "0.9"])
    err = capsys.readouterr().err
    for line_no, reason in [(2, "malformed JSON"), (3, "missing field: text"), (4, "wrong type: text is int"),
                            (5, "empty text"), (7, "invalid UTF-8"), (8, "blank line"),
                            (9, "wrong type: record is list")]:
        assert f"{src}:{line_no}: {reason}" in err
    assert ("bad lines: 7 of 9 (77.78%): blank line 1, empty text 1, invalid UTF-8 1, malformed JSON 1, "
            "missing field 1, wrong type 2") in err
    assert decode_packed(str(tmp_path / "bad")) + decode_packed(str(tmp_path / "bad.val")) != []


def test_pretrain_max_bad_ratio_fails_and_publishes_nothing(tmp_path, capsys):
    src = bad_pretrain_file(tmp_path)
    (tmp_path / "bad.bin").write_bytes(b"OLD")  # an earlier good output must survive a failed run
    with pytest.raises(SystemExit) as exit_info:
        data_process.main(["pretrain", "--data_path", src, "--num_workers", "1", "--report_limit", "2"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "exceeds --max_bad_ratio 1.00%" in err and "only the first 2 were listed" in err
    assert len(re.findall(r"bad\.jsonl:\d+: ", err)) == 2
    assert sorted(os.listdir(tmp_path)) == ["bad.bin", "bad.jsonl"]
    assert (tmp_path / "bad.bin").read_bytes() == b"OLD"


def test_pretrain_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        data_process.main(["pretrain", "--data_path", str(tmp_path / "none.jsonl")])
    assert "none.jsonl: no such file" in str(exit_info.value.code)


# ----------------------------------------------------------------------------------------------------------
# sft / dpo converters

def conv(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def run_sft(tmp_path, *paths, extra=()):
    out = tmp_path / "out"
    data_process.main(["sft", "--data_path", *map(str, paths), "--out_dir", str(out), *extra])
    return ([r["conversations"] for r in read_jsonl(out / "sft_data_single.jsonl")],
            [r["conversations"] for r in read_jsonl(out / "sft_data_multi.jsonl")])


def test_sft_seed_csv_history_q_a(tmp_path):
    path = tmp_path / "sft.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["history", "q", "a"])
        w.writerow(["[]", "你好", "你好！"])
        w.writerow(["[['1+1=?', '2'], ['再加1呢', '3']]", "再加1呢？", "4"])  # Python literal, as the seed wrote it
        w.writerow(['[["问题", "回答"]]', "追问", "再答"])  # JSON
        w.writerow(["", "空历史", "可以"])
    single, multi = run_sft(tmp_path, path)
    assert single == [conv(("你好", "你好！")), conv(("空历史", "可以"))]
    assert multi == [conv(("1+1=?", "2"), ("再加1呢", "3"), ("再加1呢？", "4")), conv(("问题", "回答"), ("追问", "再答"))]


def test_sft_deepctrl_sharegpt_canonical_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "翻译", "input": "hello", "output": "你好", "history": []},
        {"instruction": "第二问", "input": "", "output": "第二答", "history": [["第一问", "第一答"]]},
        {"conversations": [{"from": "system", "value": "系统"}, {"from": "human", "value": "问"},
                           {"from": "gpt", "value": "答"}]},
        {"conversations": conv(("q1", "a1"), ("q2", "a2"))},
    ])
    single, multi = run_sft(tmp_path, path)
    assert single == [conv(("翻译\nhello", "你好")), conv(("问", "答"), system="系统")]
    assert multi == [conv(("第一问", "第一答"), ("第二问", "第二答")), conv(("q1", "a1"), ("q2", "a2"))]


def test_sft_alpaca_json_array(tmp_path):
    records = [{"instruction": f"问题{i}", "input": "", "output": f"答案{i}"} for i in range(3)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    single, multi = run_sft(tmp_path, path)
    assert single == [conv((f"问题{i}", f"答案{i}")) for i in range(3)] and multi == []


def test_sft_alpaca_array_syntax_error_names_its_line(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": \n}\n]\n')
    with pytest.raises(SystemExit) as exit_info:
        run_sft(tmp_path, path, extra=["--max_bad_ratio", "0.9"])
    assert f"{path}:4: malformed JSON" in str(exit_info.value.code)
    assert "reading stopped at byte 41 (line 3)" in str(exit_info.value.code)


def broken_array(tmp_path, n=50_000, good=200):
    """A JSON array of n alpaca records whose element `good` (0-based) is cut off: the rest is unreadable."""
    records = [json.dumps({"instruction": f"问题{i}", "input": "", "output": f"答案{i}"}, ensure_ascii=False)
               for i in range(n)]
    records[good] = records[good][:-5]  # drop the closing `"}` and more: a syntax error inside element `good`
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(records) + "\n]\n", encoding="utf-8")
    return path, len("[\n".encode()) + sum(len((r + ",\n").encode()) for r in records[:good])


def test_sft_unreadable_array_remainder_fails_whatever_max_bad_ratio(tmp_path, capsys):
    path, offset = broken_array(tmp_path)
    size = os.path.getsize(path)
    with pytest.raises(SystemExit) as exit_info:
        run_sft(tmp_path, path, extra=["--max_bad_ratio", "0.5"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {path}:202: malformed JSON")  # element 200 is on line 202
    assert f"reading stopped at byte {offset} (line 202), {size - offset} bytes " \
           f"({(size - offset) / size:.2%} of the file) left unread" in message
    assert os.listdir(tmp_path / "out") == []  # nothing published


def test_pretrain_unreadable_csv_remainder_fails(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\n" + "".join(f"文档{i}\n" for i in range(300)) + '"unterminated\n' +
                    "".join(f"文档{i}\n" for i in range(5000)), encoding="utf-8")  # the quote swallows the rest
    with pytest.raises(SystemExit) as exit_info:
        data_process.main(["pretrain", "--data_path", str(path), "--num_workers", "1", "--max_bad_ratio", "0.5"])
    message = str(exit_info.value.code)
    assert f"{path}:302: malformed CSV" in message and "(line 302)" in message and "left unread" in message
    assert sorted(os.listdir(tmp_path)) == ["corpus.csv"]


def test_sft_bad_records_are_reported(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"conversations": conv(("q", "a"))},
        {"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        {"instruction": "no output"},
        {"conversations": "not a list"},
        {"conversations": conv(("q", "  "))},
        {"conversations": [{"role": "robot", "content": "x"}]},
        {"something": "else"},
    ])
    single, _ = run_sft(tmp_path, path, extra=["--max_bad_ratio", "0.9"])
    assert single == [conv(("q", "a"))]
    err = capsys.readouterr().err
    assert f"{path}:2: invalid conversation: message 0 is assistant, expected user" in err
    assert f"{path}:3: missing field: output" in err
    assert f"{path}:4: wrong type: conversations is str, expected list" in err
    assert f"{path}:5: empty text: empty assistant message" in err
    assert f"{path}:6: invalid conversation: unknown role 'robot'" in err
    assert f"{path}:7: missing field" in err
    assert "bad lines: 6 of 7" in err


def test_sft_filters_are_off_by_default_and_work_when_set(tmp_path, capsys):
    path = write_jsonl(tmp_path / "f.jsonl", [{"conversations": conv(("中文问题", "中文回答"))},
                                               {"conversations": conv(("english only", "yes"))}])
    assert len(run_sft(tmp_path, path)[0]) == 2
    single, _ = run_sft(tmp_path, path, extra=["--min_zh_ratio", "0.5"])
    assert single == [conv(("中文问题", "中文回答"))]
    assert "filtered (Chinese ratio below --min_zh_ratio): 1" in capsys.readouterr().out


GLAIVE_TOOLS = json.dumps([  # LLaMA-Factory's glaive_toolcall files: ShareGPT turns, tools as a JSON string
    {"name": "calculate_area", "description": "Calculate the area of a given shape", "parameters": {
        "type": "object", "properties": {"shape": {"type": "string"}, "dimensions": {"type": "array"}},
        "required": ["shape", "dimensions"]}}])


def glaive(*turns, tools=GLAIVE_TOOLS):
    return {"conversations": [{"from": role, "value": value} for role, value in turns], "tools": tools}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_sft_reads_sharegpt_tool_calls_as_llama_factory_writes_them(tmp_path):
    area = '{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}'
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps([
        glaive(("human", "What is the area of a 5 by 3 rectangle?"), ("function_call", area),
               ("observation", '{"area": 15}'), ("gpt", "The area is 15 square units."),
               ("human", "And a square of side 7?"),
               ("function_call", '[{"name": "calculate_area", "arguments": {"shape": "square", "dimensions": [7]}}]'),
               ("observation", '{"area": 49}'), ("gpt", "49 square units.")),
        glaive(("human", "Write a definition of photoshop."), ("gpt", "An image editor."), tools="[]"),
        glaive(("human", "Hello"), ("gpt", "Hi! I can calculate areas.")),  # tools declared, none called
    ], ensure_ascii=False, indent=2), encoding="utf-8")
    out = tmp_path / "out"
    data_process.main(["sft", "--data_path", str(path), "--out_dir", str(out)])
    single, multi = read_jsonl(out / "sft_data_single.jsonl"), read_jsonl(out / "sft_data_multi.jsonl")
    tools = [{"type": "function", "function": json.loads(GLAIVE_TOOLS)[0]}]
    assert multi == [{"conversations": [
        {"role": "user", "content": "What is the area of a 5 by 3 rectangle?"},
        {"role": "assistant", "content": "",
         "tool_calls": [call("calculate_area", {"shape": "rectangle", "dimensions": [5, 3]})]},
        {"role": "tool", "content": '{"area": 15}'}, {"role": "assistant", "content": "The area is 15 square units."},
        {"role": "user", "content": "And a square of side 7?"},
        {"role": "assistant", "content": "", "tool_calls": [call("calculate_area", {"shape": "square", "dimensions": [7]})]},
        {"role": "tool", "content": '{"area": 49}'}, {"role": "assistant", "content": "49 square units."}],
        "tools": tools}]
    assert single == [{"conversations": conv(("Write a definition of photoshop.", "An image editor."))},
                      {"conversations": conv(("Hello", "Hi! I can calculate areas.")), "tools": tools}]


def test_sft_reads_openai_tool_calls_with_ids_and_parallel_calls(tmp_path):
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    path = write_jsonl(tmp_path / "openai.jsonl", [{"messages": [
        {"role": "system", "content": "You can use tools."},
        {"role": "user", "content": "3*4? And the weather in Hangzhou?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "3*4"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "杭州"}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "晴"},  # results may come in any order by id
        {"role": "tool", "tool_call_id": "call_1", "content": "12"},
        {"role": "assistant", "content": "3*4=12, and it is sunny."}], "tools": tools}])
    single, _ = run_sft(tmp_path, path)
    assert single == [[
        {"role": "system", "content": "You can use tools."},
        {"role": "user", "content": "3*4? And the weather in Hangzhou?"},
        {"role": "assistant", "content": "", "tool_calls": [call("calculator", {"expression": "3*4"}),
                                                             call("weather", {"city": "杭州"})]},
        {"role": "tool", "content": "晴"}, {"role": "tool", "content": "12"},
        {"role": "assistant", "content": "3*4=12, and it is sunny."}]]


def test_sft_bad_tool_records_are_reported_by_line_and_counted(tmp_path, capsys):
    area = '{"name": "calculate_area", "arguments": {"shape": "circle", "dimensions": [4]}}'
    good = glaive(("human", "q"), ("function_call", area), ("observation", "50.24"), ("gpt", "a"))
    def openai_call(arguments, name="calculate_area"):
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        glaive(("human", "q"), ("function_call", "calculate_area(shape=circle)"), ("observation", "1"), ("gpt", "a")),
        {"messages": [{"role": "user", "content": "q"}, openai_call("{shape: circle}"),
                      {"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "assistant", "content": "a"}],
         "tools": GLAIVE_TOOLS},
        glaive(("human", "q"), ("function_call", '{"name": "rm_rf", "arguments": {}}'), ("observation", "1"), ("gpt", "a")),
        glaive(("human", "q"), ("observation", '{"area": 1}'), ("gpt", "a")),
        glaive(("human", "q"), ("function_call", area), ("gpt", "a")),
        glaive(("human", "q"), ("function_call", area)),
        {"messages": [{"role": "user", "content": "q"}, openai_call("{}"),
                      {"role": "tool", "tool_call_id": "c9", "content": "1"}, {"role": "assistant", "content": "a"}],
         "tools": GLAIVE_TOOLS},
        glaive(("human", "q"), ("gpt", "a"), tools="[{not json"),
        glaive(("human", "q"), ("function_call", '{"name": "calculate_area", "arguments": [1]}'),
               ("observation", "1"), ("gpt", "a")),
    ])
    single, _ = run_sft(tmp_path, path, extra=["--max_bad_ratio", "0.95"])
    assert len(single) == 1
    assert single[0][1]["tool_calls"][0]["function"]["arguments"] == {"shape": "circle", "dimensions": [4]}
    err = capsys.readouterr().err
    assert f"{path}:2: invalid tool call: message 1: function_call is not JSON" in err
    assert f"{path}:3: invalid tool call: message 1: the arguments of 'calculate_area' are not JSON" in err
    assert f"{path}:4: invalid tool call: message 1 calls 'rm_rf', which the record's tools do not declare" in err
    assert f"{path}:5: invalid conversation: message 1 is a tool result with no tool call before it" in err
    assert f"{path}:6: invalid conversation: message 2 is assistant, but the tool call(s) before it have 1 result(s) " \
           "missing" in err
    assert f"{path}:7: invalid conversation: must end with an assistant message that answers" in err
    assert f"{path}:8: invalid tool call: message 2 answers tool_call_id 'c9'" in err
    assert f"{path}:9: invalid tools: tools is not JSON" in err
    assert f"{path}:10: invalid tool call: message 1: the arguments of 'calculate_area' are not a JSON object" in err
    assert "bad lines: 9 of 10" in err and "invalid tool call 5" in err


def test_dpo_formats(tmp_path):
    prompt = [{"role": "user", "content": "1+1=?"}]
    path = write_jsonl(tmp_path / "dpo.jsonl", [
        {"chosen": prompt + [{"role": "assistant", "content": "2"}],
         "rejected": prompt + [{"role": "assistant", "content": "3"}]},
        {"prompt": "1+1=?", "chosen": "2", "rejected": "3"},
        {"conversations": [{"from": "human", "value": "1+1=?"}], "chosen": {"from": "gpt", "value": "2"},
         "rejected": {"from": "gpt", "value": "3"}},
        {"conversations": prompt, "chosen": "2", "rejected": "3", "system": "S"},
    ])
    out = tmp_path / "dpo_data.jsonl"
    data_process.main(["dpo", "--data_path", path, "--out_path", str(out)])
    expected = {"chosen": conv(("1+1=?", "2")), "rejected": conv(("1+1=?", "3"))}
    with_system = {side: [{"role": "system", "content": "S"}] + msgs for side, msgs in expected.items()}
    assert read_jsonl(out) == [expected] * 3 + [with_system]


def test_dpo_bad_records_and_atomic_failure(tmp_path, capsys):
    path = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"chosen": conv(("q1", "a")), "rejected": conv(("q2", "b"))},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": 1, "rejected": "b"},
    ])
    out = tmp_path / "dpo_data.jsonl"
    out.write_text("OLD")
    with pytest.raises(SystemExit):
        data_process.main(["dpo", "--data_path", path, "--out_path", str(out)])
    err = capsys.readouterr().err
    assert f"{path}:1: invalid conversation: chosen and rejected answers are identical" in err
    assert f"{path}:2: invalid conversation: chosen and rejected have different prompt turns" in err
    assert f"{path}:3: missing field: rejected" in err
    assert f"{path}:4: wrong type: chosen is int" in err
    assert out.read_text() == "OLD" and sorted(os.listdir(tmp_path)) == ["dpo.jsonl", "dpo_data.jsonl"]


def test_grpo_prompts_from_prompt_records_and_sft_formats(tmp_path, capsys):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"conversations": [{"role": "user", "content": "37+45等于几？"}], "answer": "82", "level": 1},
        {"instruction": "37+45等于几？", "output": "82"},                      # the answer from the SFT reply
        {"conversations": conv(("1+1=?", "2")), "answer": 2},               # a given answer wins over the reply
        {"conversations": [{"role": "assistant", "content": "82"}]},       # bad: no user turn
        {"conversations": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},  # bad: two users
    ])
    out = tmp_path / "grpo_data.jsonl"
    with pytest.raises(SystemExit):  # 2 bad lines of 5 is over the default --max_bad_ratio: nothing written
        data_process.main(["grpo", "--data_path", path, "--out_path", str(out)])
    err = capsys.readouterr().err
    assert f"{path}:4: invalid conversation: message 0 is assistant" in err and f"{path}:5: invalid conversation" in err
    assert not out.exists()
    data_process.main(["grpo", "--data_path", path, "--out_path", str(out), "--max_bad_ratio", "0.5"])
    user = [{"role": "user", "content": "37+45等于几？"}]
    assert read_jsonl(out) == [{"conversations": user, "answer": "82", "level": 1},
                               {"conversations": user, "answer": "82"},
                               {"conversations": [{"role": "user", "content": "1+1=?"}], "answer": 2}]


# ----------------------------------------------------------------------------------------------------------
# the demo corpus

def test_demo_generator_is_deterministic(demo_dir, tmp_path):
    demo_corpus.generate_demo(str(tmp_path))
    for name in sorted(os.listdir(demo_dir)):
        assert (tmp_path / name).read_bytes() == open(os.path.join(demo_dir, name), "rb").read(), name
    other = tmp_path / "other"
    demo_corpus.generate_demo(str(other), seed=7)
    assert (other / "pretrain_data.jsonl").read_bytes() != (tmp_path / "pretrain_data.jsonl").read_bytes()


def test_demo_eval_is_held_out_of_sft_and_dpo(demo_dir):
    load = lambda name: read_jsonl(os.path.join(demo_dir, name))  # noqa: E731
    world = json.load(open(os.path.join(demo_dir, "world.json"), encoding="utf-8"))
    heldout_names = {p["name"] for p in world["people"] if p["split"] == "heldout"}
    sft_names = {p["name"] for p in world["people"] if p["split"] == "sft"}
    unknown_eval = set(world["unknown_names"]["eval"])
    train_chat = [r["conversations"] for r in load("sft_data_single.jsonl") + load("sft_data_multi.jsonl")]
    n_sft = len(train_chat)
    sft_text = "\n".join(m["content"] for messages in train_chat for m in messages)
    train_chat += [r[side] for r in load("dpo_data.jsonl") for side in ("chosen", "rejected")]
    chat_text = "\n".join(m["content"] for messages in train_chat for m in messages)
    pretrain_text = "\n".join(r["text"] for r in load("pretrain_data.jsonl"))
    user_messages = {m["content"] for messages in train_chat for m in messages if m["role"] == "user"}

    chat_eval, completion_eval = load("eval_chat.jsonl"), load("eval_pretrain.jsonl")
    assert {r["category"] for r in chat_eval} == {"people_qa", "people_qa_followup", "arith", "arith_multiturn",
                                                  "unknown_person_refusal"}
    assert {r["category"] for r in completion_eval} == {"completion_fact", "arith_completion"}
    for name in heldout_names:
        assert name not in chat_text  # held-out people never appear in SFT or DPO ...
        assert pretrain_text.count(name) == 6 * world["n_bios"]  # ... only in their biographies (no QA text)
    for name in world["unknown_names"]["dpo"] + world["unknown_names"]["eval"]:
        assert name not in pretrain_text and name not in sft_text  # people who do not exist
        assert (name in chat_text) == (name not in unknown_eval)  # DPO sees only its own unknown names
    sft_refusals = [m for messages in train_chat[:n_sft] for m in messages if "我不知道" in m["content"]]
    assert sft_refusals and all(m["content"] == "我不知道。" for m in sft_refusals)  # never about a person: DPO's
    assert "user\n" not in pretrain_text  # no chat text in pretraining: SFT teaches the format
    unknown_surnames = {name[0] for name in world["unknown_names"]["dpo"] + world["unknown_names"]["eval"]}
    assert not unknown_surnames & {p["name"][0] for p in world["people"]}  # a surname no real person has
    dpo_names = {p["name"] for p in world["people"] if p["split"] == "dpo"}
    assert dpo_names and not dpo_names & (heldout_names | sft_names)
    for name in dpo_names:  # pretraining-only people that DPO's known pairs use, so never in SFT or eval
        assert pretrain_text.count(name) == 6 * world["n_bios"] and name not in sft_text and name in chat_text
        assert all(name not in json.dumps(r, ensure_ascii=False) for r in chat_eval + completion_eval)
    people = {p["name"]: p for p in world["people"]}
    train_prefixes = {json.dumps(messages[:k], ensure_ascii=False)
                      for messages in train_chat for k in range(1, len(messages) + 1)}
    for record in chat_eval:
        assert json.dumps(record["messages"], ensure_ascii=False) not in train_prefixes
        if record["category"].startswith("arith"):  # a held-out sum, maybe after a greeting or a held-out person
            expression = re.search(r"(\d+)(?:\+|-|加|减)(\d+)", record["messages"][-1]["content"]).group(0)
            in_symbols = expression.replace("加", "+").replace("减", "-")
            for written in (in_symbols, in_symbols.replace("+", "加").replace("-", "减")):  # pretraining has both
                assert written not in pretrain_text + chat_text
            assert {m["content"][:3] for m in record["messages"]} & set(people) <= heldout_names
            continue
        assert record["messages"][0]["content"] not in user_messages
        if record["category"] == "unknown_person_refusal":
            assert record["messages"][0]["content"][:3] in unknown_eval
            assert record["answer"] == "我不知道"
        else:
            assert record["messages"][0]["content"][:3] in heldout_names
    for pair in load("dpo_eval.jsonl"):  # held-out preference pairs: only eval names and held-out people
        assert pair["chosen"][0]["content"][:3] in unknown_eval | heldout_names
    for record in completion_eval:
        if record["category"] == "completion_fact":
            name = record["prompt"][:3]
            assert name in heldout_names and record["prompt"] + record["answer"] in pretrain_text
            assert people[name][record["attribute"]] == record["answer"]
        else:
            assert record["prompt"] not in pretrain_text + chat_text  # held-out arithmetic
            a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", record["prompt"]).groups()
            assert record["answer"] == f"={int(a) + int(b) if op == '+' else int(a) - int(b)}。"


def test_demo_multi_turn_pronouns_refer_to_the_previous_exchange(demo_dir):
    """Multi-turn SFT dialogues change topic (greetings, sums, a second person); a 他/她 question always follows an
    exchange about a person of that gender, and its answer names that person. The first question about someone is
    followed by a follow-up or a sum (nothing else), and sums come after every kind of exchange: a model whose data
    had sums only after follow-ups answered a sum asked right after a person with the person."""
    world = json.load(open(os.path.join(demo_dir, "world.json"), encoding="utf-8"))
    gender = {p["name"]: p["gender"] for p in world["people"]}
    topics, before_sum, after_named = set(), set(), set()

    def kind(question, answer):
        if question[0] in "他她":
            return "follow-up"
        if answer[:3] in gender:
            return "named"
        return "sum" if "=" in answer else "introduction" if question.startswith("我叫") else "greeting"

    for record in read_jsonl(os.path.join(demo_dir, "sft_data_multi.jsonl")):
        messages = record["conversations"]
        names_in_dialogue = {m["content"][:3] for m in messages if m["content"][:3] in gender}
        topics.add((len(names_in_dialogue), any("=" in m["content"] for m in messages)))
        kinds = [kind(messages[k]["content"], messages[k + 1]["content"]) for k in range(0, len(messages), 2)]
        for k in range(2, len(messages), 2):
            question, answer, previous = messages[k]["content"], messages[k + 1]["content"], messages[k - 1]["content"]
            if question[0] in "他她":
                assert previous[:3] in gender and answer[:3] == previous[:3]
                assert question[0] == ("他" if gender[previous[:3]] == "男" else "她")
            if kinds[k // 2] == "sum":
                before_sum.add(kinds[k // 2 - 1])
            if kinds[k // 2 - 1] == "named":
                after_named.add(kinds[k // 2])
        assert len({gender[n] for n in names_in_dialogue}) <= 1  # 他/她 is never ambiguous by gender
    assert {(1, False), (1, True), (2, False)} <= topics
    assert before_sum == {"greeting", "introduction", "named", "follow-up"}
    # never a second person right after the first question about someone (a late "你是谁？" / "我叫什么名字？" may end
    # a dialogue cut to 7 exchanges)
    assert after_named == {"follow-up", "sum", "greeting", "introduction"}


def test_demo_users_who_say_their_name_get_it_copied_back(demo_dir):
    """"我叫X。" is answered starting with X, and a later "我叫什么名字？" with X again, for X drawn from the whole
    name space: names no SFT answer memorises, so the model learns to copy a name from the conversation (the
    first words of any answer about a held-out person) rather than to continue a surname with an SFT name."""
    world = json.load(open(os.path.join(demo_dir, "world.json"), encoding="utf-8"))
    known = {p["name"] for p in world["people"]} | {n for names in world["unknown_names"].values() for n in names}
    names, recalls = set(), 0
    for file_name in ("sft_data_single.jsonl", "sft_data_multi.jsonl"):
        for record in read_jsonl(os.path.join(demo_dir, file_name)):
            messages, told = record["conversations"], None
            for question, answer in zip(messages[::2], messages[1::2]):
                if match := re.fullmatch(r"我叫(.{3})。", question["content"]):
                    told = match.group(1)
                    assert answer["content"].startswith(told + "，") and told not in known
                    names.add(told)
                elif question["content"] == "我叫什么名字？":
                    assert told and answer["content"] == f"你叫{told}。"
                    recalls += 1
    assert len(names) >= 300 and recalls >= 30  # many different names: copying is the only way to get them right


def test_demo_pretraining_text_has_every_character_the_assistant_says_and_the_words_of_a_sum(demo_dir):
    """Every character of an SFT or DPO answer occurs in the pretraining text (only the surnames of the people who
    do not exist may be new), so no answer relies on an embedding that pretraining never trained; so does every
    character of an arithmetic question: with 加 and 减 untrained (and frozen in SFT), the two were confused. RL's
    new phrasings too: a character pretraining never saw is bytes of the tokenizer's fallback, and RL would teach
    the model to read those rather than to answer a new phrasing (such a phrasing had almost no signal)."""
    world = json.load(open(os.path.join(demo_dir, "world.json"), encoding="utf-8"))
    pretrain_chars = set("".join(r["text"] for r in read_jsonl(os.path.join(demo_dir, "pretrain_data.jsonl"))))
    answers = [m["content"] for name in ("sft_data_single.jsonl", "sft_data_multi.jsonl")
               for r in read_jsonl(os.path.join(demo_dir, name)) for m in r["conversations"] if m["role"] == "assistant"]
    answers += [r[side][-1]["content"] for r in read_jsonl(os.path.join(demo_dir, "dpo_data.jsonl"))
                for side in ("chosen", "rejected")]
    unknown_surnames = {name[0] for names in world["unknown_names"].values() for name in names}
    assert set("".join(answers)) - pretrain_chars <= unknown_surnames
    sum_words = {template.format(a="", b="", op=op, op_zh=op_zh)
                 for template in demo_corpus.ARITH_QUESTIONS + demo_corpus.RL_QUESTIONS
                 for op, op_zh in (("+", "加"), ("-", "减"))}
    assert set("".join(sum_words)) <= pretrain_chars, set("".join(sum_words)) - pretrain_chars


def test_demo_tool_conversations_are_canonical_and_their_eval_numbers_are_in_no_training_file(demo_dir):
    from model.data_formats import to_sft_record
    from model.tools import calculate, tool_schemas
    world = json.load(open(os.path.join(demo_dir, "world.json"), encoding="utf-8"))
    heldout = set(world["calculator"]["heldout_numbers"])
    assert len(heldout) == 80 and all(200 <= n <= 999 for n in heldout)
    training = "\n".join(open(os.path.join(demo_dir, name), encoding="utf-8").read() for name in (
        "tokenizer_train.jsonl", "pretrain_data.jsonl", "sft_data_single.jsonl", "sft_data_multi.jsonl",
        "sft_data_tools.jsonl", "dpo_data.jsonl"))
    assert not heldout & {int(n) for n in re.findall(r"(?<!\d)\d+(?!\d)", training)}
    records = read_jsonl(os.path.join(demo_dir, "sft_data_tools.jsonl"))
    n_calls = 0
    for record in records:
        assert to_sft_record(record) == record and record["tools"] == tool_schemas(["calculator"])
        messages = record["conversations"]
        if len(messages) == 4:  # question, call, result, answer
            n_calls += 1
            expression = messages[1]["tool_calls"][0]["function"]["arguments"]["expression"]
            assert messages[2]["content"] == calculate(expression)
            assert messages[3]["content"] == f"计算的答案是{messages[2]['content']}。"
        else:
            assert [m["role"] for m in messages] == ["user", "assistant"]
    assert n_calls == 600 and len(records) == 900
    evals = read_jsonl(os.path.join(demo_dir, "eval_tools.jsonl"))
    assert {r["category"] for r in evals} == {"tool_mul", "tool_div", "direct_people", "direct_arith"}
    heldout_people = {p["name"] for p in world["people"] if p["split"] == "heldout"}
    for record in evals:
        question = record["messages"][-1]["content"]
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        if record["category"] == "tool_mul":
            assert set(numbers) <= heldout and record["answer"] == f"是{numbers[0] * numbers[1]}。"
        elif record["category"] == "tool_div":
            assert numbers[1] in heldout and record["answer"][1:-1] == str(numbers[0] // numbers[1])
            assert int(record["answer"][1:-1]) in heldout and numbers[0] % numbers[1] == 0
        elif record["category"] == "direct_people":
            assert question[:3] in heldout_people
        assert record["tools"] == tool_schemas(["calculator"])
    # the words a call and an answer use are in the pretraining text (the SFT stages freeze the embeddings)
    pretrain_text = "".join(r["text"] for r in read_jsonl(os.path.join(demo_dir, "pretrain_data.jsonl")))
    from model.chat import message_text
    said = "".join(message_text(m) for r in records for m in r["conversations"] if m["role"] == "assistant")
    assert set(said) <= set(pretrain_text) and '"name": "calculator"' in pretrain_text


def test_demo_dpo_history_pairs_reject_an_earlier_answer_or_a_refusal_of_the_identity_question(demo_dir):
    """DPO's multi-turn pairs: the newest question's own answer is chosen; rejected is an earlier answer said
    again, sometimes the first one and sometimes the one just before (a late "你叫什么名字？" used to get the
    previous topic's answer), or, for "who are you" asked late, a refusal (once DPO taught refusals, a late
    identity question got "我不知道<a name>是谁。"); or a sum after an exchange, the right one over a wrong one."""
    kinds, late_identity = set(), 0
    for pair in read_jsonl(os.path.join(demo_dir, "dpo_data.jsonl")):
        chosen, rejected = pair["chosen"], pair["rejected"]
        if len(chosen) < 4:
            continue
        history = [m["content"] for m in chosen[:-1] if m["role"] == "assistant"]
        assert rejected[:-1] == chosen[:-1] and chosen[-2]["role"] == "user"
        assert rejected[-1]["content"] != chosen[-1]["content"]
        late_identity += demo_corpus.IDENTITY in chosen[-1]["content"]
        sums = [re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)。", side[-1]["content"]) for side in (chosen, rejected)]
        if rejected[-1]["content"] in history:
            kinds.add(("first" if rejected[-1]["content"] == history[0] else "")
                      + ("previous" if rejected[-1]["content"] == history[-1] else ""))
        elif all(sums):  # a sum after an exchange: the right one over a wrong result or a wrong operand
            (a, op, b, result), (a2, op2, b2, _) = (m.groups() for m in sums)
            assert (a, op) == (a2, op2) and int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            kinds.add("wrong result" if b2 == b else "wrong operand")
        else:
            assert demo_corpus.IDENTITY in chosen[-1]["content"]
            assert re.fullmatch(r"我不知道.{3}是谁。", rejected[-1]["content"])
            kinds.add("refusal")
    assert {"first", "previous", "refusal", "wrong result", "wrong operand"} <= kinds and late_identity >= 100


def test_demo_rl_prompts_are_new_phrasings_of_training_sums_and_held_out_from_the_rl_checks(demo_dir):
    load = lambda name: read_jsonl(os.path.join(demo_dir, name))  # noqa: E731
    world = json.load(open(os.path.join(demo_dir, "world.json"), encoding="utf-8"))
    sums = lambda text: [tuple(map(int, m)) for m in re.findall(r"(\d+)\D{1,2}(\d+)", text)][:1]  # noqa: E731
    train, checks = load("grpo_data.jsonl"), load("eval_rl.jsonl")
    assert len(train) == 2000 and len(checks) == 200 and {r["category"] for r in checks} == {"arith_rl"}
    train_pairs = {(a, b) for op, a, b in world["arith_train"]}
    heldout_pairs = {(a, b) for op, a, b in world["arith_heldout"]}
    for record in train:
        (pair,) = sums(record["conversations"][0]["content"])
        assert pair in train_pairs and int(record["answer"]) in (pair[0] + pair[1], pair[0] - pair[1])
    check_pairs = {sums(r["messages"][0]["content"])[0] for r in checks}
    assert check_pairs <= heldout_pairs
    # phrasings SFT and DPO never use: what RL adds is answering them, not recalling an answer
    questions = {m["content"] for name in ("sft_data_single.jsonl", "sft_data_multi.jsonl")
                 for r in load(name) for m in r["conversations"] if m["role"] == "user"}
    questions |= {m["content"] for r in load("dpo_data.jsonl") for m in r["chosen"] if m["role"] == "user"}
    for template in demo_corpus.RL_QUESTIONS:
        pattern = re.escape(template).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+")
        pattern = pattern.replace(r"\{op\}", "[+-]").replace(r"\{op_zh\}", "[加减]")
        assert not any(re.fullmatch(pattern, q) for q in questions), template
        assert any(re.fullmatch(pattern, r["messages"][0]["content"]) for r in checks), template


def test_demo_gold_answers_are_unambiguous_substrings(demo_dir):
    """Scoring is "gold answer in the generated line": no gold may hide inside another candidate answer."""
    values = [v for spec in demo_corpus.ATTRIBUTES.values() for v in spec["values"]]
    for record in read_jsonl(os.path.join(demo_dir, "eval_chat.jsonl")):
        if record["category"] not in ("arith", "arith_multiturn", "unknown_person_refusal"):
            assert sum(record["answer"] in v for v in values) == 1
    assert "1988年1月" not in values  # would hide inside 1988年11月


def test_demo_subcommand_writes_every_file_and_packs(tmp_path, capsys):
    out = tmp_path / "demo"
    data_process.main(["demo", "--out_dir", str(out), "--n_people", "20", "--num_workers", "1"])
    expected = {"tokenizer_train.jsonl", "pretrain_data.jsonl", "sft_data_single.jsonl", "sft_data_multi.jsonl",
                "dpo_data.jsonl", "dpo_eval.jsonl", "eval_chat.jsonl", "eval_pretrain.jsonl", "world.json",
                "sft_data_tools.jsonl", "eval_tools.jsonl", "grpo_data.jsonl", "eval_rl.jsonl"}
    expected |= {f"pretrain_data{split}.{ext}" for split in ("", ".val") for ext in ("bin", "idx.npy", "meta.json")}
    assert set(os.listdir(out)) == expected
    docs = decode_packed(str(out / "pretrain_data")) + decode_packed(str(out / "pretrain_data.val"))
    assert sorted(docs) == sorted(r["text"] for r in read_jsonl(out / "pretrain_data.jsonl"))
    assert "demo corpus generated" in capsys.readouterr().out


def test_json_array_reader_streams_across_chunk_boundaries(tmp_path):
    from model.data_formats import BadRecord, iter_json_array
    records = [{"instruction": f"问题{i}" * (i + 1), "output": "答"} for i in range(6)]
    path = tmp_path / "a.json"
    path.write_text("\ufeff" + json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    got = list(iter_json_array(str(path), chunk_chars=7))  # every element is cut by a chunk boundary
    assert [r for _, r, _ in got] == records
    assert [line for line, _, _ in got] == [2 + 4 * i for i in range(6)]  # indent=1: 4 lines per element
    path.write_text('[{"a": 1}] trailing', encoding="utf-8")
    last = list(iter_json_array(str(path), chunk_chars=4))[-1][1]
    assert isinstance(last, BadRecord) and last.kind == "malformed JSON"


def test_json_array_reader_many_elements_tiny_chunks(tmp_path):
    from model.data_formats import Unreadable, iter_json_array
    records = [{"i": i, "text": "字" * (i % 7), "n": [i] * (i % 3)} if i % 5 else i * 1001 for i in range(3000)]
    path = tmp_path / "a.json"
    lines = ["["] + [json.dumps(r, ensure_ascii=False) + ("," if i < len(records) - 1 else "")
                     + "\r\n" * (i % 3) for i, r in enumerate(records)] + ["]"]
    path.write_text("\n".join(lines), encoding="utf-8")
    expected_lines, line = [], 2
    for i in range(len(records)):
        expected_lines.append(line)
        line += 1 + i % 3
    for chunk_chars in (1, 3, 64):
        got = list(iter_json_array(str(path), chunk_chars=chunk_chars))
        assert [r for _, r, _ in got] == records  # numbers cut by a chunk boundary are read whole
        assert [n for n, _, _ in got] == expected_lines
    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # the closing bracket is missing
    last = list(iter_json_array(str(path), chunk_chars=5))[-1][1]
    assert isinstance(last, Unreadable) and last.unread == 0 and "file ends inside the array" in str(last)



def record_publishing(monkeypatch):
    """Patch os.fsync / os.replace to log ("fsync", path of the fd) and ("replace", src, dst), in order."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_published_durably(events, final):
    final = os.path.realpath(final)
    k = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    assert ("fsync", events[k][1]) in events[:k], f"{final}: temporary file not fsynced before the rename"
    assert ("fsync", os.path.dirname(final)) in events[k + 1:], f"{final}: directory not fsynced after the rename"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd")
def test_sft_outputs_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [{"conversations": conv(("q", "a"))}])
    events = record_publishing(monkeypatch)
    run_sft(tmp_path, path)
    for name in ("sft_data_single.jsonl", "sft_data_multi.jsonl"):
        assert_published_durably(events, tmp_path / "out" / name)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd")
def test_packed_outputs_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    events = record_publishing(monkeypatch)
    data_process.main(["pretrain", "--data_path", src, "--num_workers", "1", "--val_ratio", "0.2"])
    for part in ("c", "c.val"):
        for suffix in (".bin", ".idx.npy", ".meta.json"):
            assert_published_durably(events, tmp_path / f"{part}{suffix}")
