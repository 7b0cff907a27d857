"""Evaluation: eval-file scoring, batched generation, history trimming, perplexity, C-Eval choice scoring, and the
scripts' behaviour at the edges (EOF / Ctrl-C in interactive mode, missing checkpoint)."""
import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.LMConfig import LMConfig
from model.model import Transformer
from model import chat, evaluate, generate
from model.checkpoint import copy_tokenizer
from model.chat import DEFAULT_TOKENIZER_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
# What the trained fixture model answers (it memorises these two exchanges).
TAUGHT = [("王小明在哪里工作？", "王小明在蓝海科技工作。"), ("计算12+30。", "12+30=42。")]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def load_script(filename):
    name = "script_" + filename.replace("-", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, argv, monkeypatch, cwd):
    """Run a script's main() in-process as `python script argv` from cwd; returns the exit code."""
    monkeypatch.setattr(sys, "argv", [module.__file__] + [str(a) for a in argv])
    monkeypatch.chdir(cwd)
    try:
        evaluate.run_cli(module.main)
    except SystemExit as stop:
        return stop.code
    return 0


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine a second one makes them ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """out/sft_single_32: a tiny model trained to give the TAUGHT answers; out/pretrain_32: a random one."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    work = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = Transformer(LMConfig(**TINY))
    rows = []
    for question, answer in TAUGHT:
        prompt = chat.encode_chat(tok, [user(question)])
        reply = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(80):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    for stage, weights in (("sft_single", model), ("pretrain", Transformer(LMConfig(**TINY)))):
        run_dir = str(work / "out" / f"{stage}_32")
        weights.save_pretrained(run_dir)
        copy_tokenizer(DEFAULT_TOKENIZER_DIR, run_dir)
    return work


@pytest.fixture(scope="module")
def chat_model(workdir):
    return evaluate.load_checkpoint(str(workdir / "out" / "sft_single_32"), device="cpu")


# ----------------------------------------------------------------------------------------------------------
# scoring logic, with the generator replaced by a script

def test_score_eval_file_scores_the_first_line_per_category(tokenizer, tmp_path, monkeypatch):
    follow_up = [user("段志鹏出生在哪个城市？"), assistant("段志鹏出生于重庆。"), user("他在哪里工作？")]
    chat = [
        {"category": "qa", "messages": [user("冯慧敏出生在哪个城市？")], "answer": "郑州"},       # right
        {"category": "qa", "messages": [user("冯慧敏是哪里人？")], "answer": "郑州"},             # only on line 2
        {"category": "qa", "messages": [user("冯慧敏毕业于哪所大学？")], "answer": "东湖大学"},   # wrong
        "{not json",
        {"category": "followup", "messages": follow_up, "answer": "海纳电子"},                   # right
        {"category": "arith", "prompt": "计算33+48。", "answer": "=81。"},                       # wrong (=811。)
        {"category": "arith", "messages": [user("x"), assistant("y")], "answer": "1"},          # bad: ends with assistant
    ]
    replies = {"冯慧敏出生在哪个城市？": "冯慧敏出生于郑州。\n", "冯慧敏是哪里人？": "我不知道。\n冯慧敏来自郑州。",
               "冯慧敏毕业于哪所大学？": "冯慧敏毕业于青山大学。", "他在哪里工作？": "段志鹏在海纳电子工作。",
               "计算33+48。": "33+48=811。"}
    seen = []

    def fake_generate(model, tok, prompts, **kwargs):
        seen.extend(prompts)
        texts = []
        for ids in prompts:
            rendered = tok.decode(ids)
            assert rendered.endswith("<s>assistant\n")  # chat template + generation prompt
            question = rendered.rsplit("</s>", 1)[0].rsplit("\n", 1)[1]
            texts.append(replies[question])
        return texts

    monkeypatch.setattr(evaluate, "generate_batch", fake_generate)
    path = tmp_path / "eval_chat.jsonl"
    write_jsonl(path, chat)
    out = tmp_path / "answers.jsonl"
    scores = evaluate.score_eval_file(SimpleNamespace(), tokenizer, str(path), "chat", out_path=str(out))
    assert scores["per_category"] == {"qa": (1, 3, 1 / 3), "followup": (1, 1, 1.0), "arith": (0, 1, 0.0)}
    assert scores["n"] == 5 and scores["n_correct"] == 2 and scores["overall"] == 2 / 5 and scores["n_bad"] == 2
    # the multi-turn record is rendered exactly as the chat template renders the whole history
    expected = tokenizer.apply_chat_template(follow_up, add_generation_prompt=True, tokenize=False)
    assert tokenizer(expected, add_special_tokens=False)["input_ids"] in seen
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3, 5, 6]
    assert [a["correct"] for a in answers] == [True, False, False, True, False]
    assert answers[1]["first_line"] == "我不知道。" and answers[1]["generated"] == "我不知道。\n冯慧敏来自郑州。"
    assert answers[3]["messages"] == follow_up and answers[3]["category"] == "followup"
    table = evaluate.format_scores(scores)
    assert "qa" in table and "33.33%" in table and "40.00%" in table


def test_completion_records_start_with_bos_and_bad_lines_are_reported(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "generate_batch",
                        lambda model, tok, prompts, **kw: ["=82。\n" if tok.decode(p[1:]) == "37+45" else "1999年"
                                                           for p in prompts])
    path = tmp_path / "eval_pretrain.jsonl"
    write_jsonl(path, [{"category": "arith_completion", "prompt": "37+45", "answer": "=82。"},
                       {"category": "fact", "prompt": "张伟生于", "answer": "1999年3月"},
                       {"category": "fact", "answer": "x"}])
    model = SimpleNamespace(checkpoint_dir=str(tmp_path))
    scores = evaluate.score_eval_file(model, tokenizer, str(path), "completion")
    assert scores["per_category"] == {"arith_completion": (1, 1, 1.0), "fact": (0, 1, 0.0)}
    assert scores["out_path"] == str(tmp_path / "eval_pretrain.answers.jsonl") and os.path.isfile(scores["out_path"])
    assert f"{path}:3: missing or empty string field 'prompt'" in capsys.readouterr().err
    write_jsonl(path, ["[]", '{"prompt": "a"}'])
    with pytest.raises(evaluate.StageError, match="no usable completion records"):
        evaluate.score_eval_file(model, tokenizer, str(path), "completion")


# ----------------------------------------------------------------------------------------------------------
# batched generation

class ScriptedModel(torch.nn.Module):
    """Emits scripts[last prompt token] one token per step, whatever the cache holds; counts forward calls."""

    def __init__(self, scripts, vocab_size):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(n_layers=1, n_kv_heads=1, head_dim=2, max_seq_len=128, vocab_size=vocab_size)
        self.scripts, self.calls, self.keys, self.step = scripts, 0, None, 0

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0, **kwargs):
        self.calls += 1
        if input_ids.shape[1] > 1:  # a new batch's prompts
            self.keys, self.step = input_ids[:, -1].tolist(), 0
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        for row, key in enumerate(self.keys):
            script = self.scripts[key]
            logits[row, 0, script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return SimpleNamespace(logits=logits)


def test_generate_batch_stops_rows_at_newline_or_eos_and_keeps_the_order(tokenizer):
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # each prompt ends in a whole-character token of its own (the scripted model keys on the last token)
    prompts = [chat.encode_completion(tokenizer, p) for p in ("甲", "很长的提示李", "长一点王")]
    keys = [p[-1] for p in prompts]
    scripts = {keys[0]: enc("=81。\n后面还有"), keys[1]: enc("杭州") + [tokenizer.eos_token_id],
               keys[2]: enc("没有换行的很长很长的回答")}
    model = ScriptedModel(scripts, len(tokenizer))
    texts = generate.generate_batch(model, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    assert texts == ["=81。\n", "杭州", tokenizer.decode(scripts[keys[2]][:6])]
    assert model.calls == 6
    # rows 0 and 1 alone: the batch ends when the slower of them is done (5 tokens for "=81。\n")
    model = ScriptedModel(scripts, len(tokenizer))
    assert generate.generate_batch(model, tokenizer, prompts[:2], max_new_tokens=50) == ["=81。\n", "杭州"]
    assert model.calls == len(enc("=81。\n"))


def test_batched_left_padded_generation_equals_one_by_one(tokenizer):
    torch.manual_seed(0)
    model = Transformer(LMConfig(**TINY)).eval()
    with torch.no_grad():  # large random weights: varied outputs instead of one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    prompts = [chat.encode_chat(tokenizer, [user(q)]) for q in ("你好", "计算33+48。", "王小明在哪里工作？是哪里？")]
    prompts.append(chat.encode_completion(tokenizer, "万有引力"))
    assert len({len(p) for p in prompts}) == 4
    batched = generate.generate_batch(model, tokenizer, prompts, max_new_tokens=8, stop_at_newline=False)
    single = [generate.generate_batch(model, tokenizer, [p], max_new_tokens=8, stop_at_newline=False)[0]
              for p in prompts]
    assert batched == single and len(set(batched)) == 4
    # and equal to plain greedy decoding by full forward passes
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert single[1] == tokenizer.decode(ids[0, len(prompts[1]):].tolist(), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------
# real checkpoints, in-process

def test_eval_file_end_to_end_with_a_trained_checkpoint(workdir, monkeypatch, capsys):
    eval_file = workdir / "eval_chat.jsonl"
    write_jsonl(eval_file, [
        {"category": "people", "messages": [user(TAUGHT[0][0])], "answer": "蓝海科技"},
        {"category": "people", "messages": [user(TAUGHT[0][0])], "answer": "青松银行"},
        {"category": "arith", "messages": [user(TAUGHT[1][0])], "answer": "=42。"},
    ])
    script = load_script("2-eval.py")
    assert run_main(script, ["--eval_file", eval_file], monkeypatch, workdir) == 0  # finds out/sft_single_32
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert table["people"] == ["1", "2", "50.00%"] and table["arith"] == ["1", "1", "100.00%"]
    assert table["overall"] == ["2", "3", "66.67%"]
    answers = workdir / "out" / "sft_single_32" / "eval_chat.answers.jsonl"
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert [r["generated"] for r in rows] == [TAUGHT[0][1], TAUGHT[0][1], TAUGHT[1][1]]
    assert [r["correct"] for r in rows] == [True, False, True]


def test_interactive_chat_trims_history_and_no_history_forgets(workdir, tokenizer, monkeypatch, capsys):
    script = load_script("2-eval.py")
    prompts = []

    def fake_reply(model, tok, ids, max_new_tokens, **kwargs):
        prompts.append(ids)
        assert len(ids) + max_new_tokens <= model.config.max_seq_len
        yield "好的。"

    monkeypatch.setattr(generate, "stream_reply", fake_reply)
    questions = [f"第{i}问" for i in range(1, 9)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n"))
    assert run_main(script, ["--interactive", "--max_new_tokens", "16"], monkeypatch, workdir) == 0
    budget = chat.context_budget(64, 16)
    assert len(prompts) == 8
    for k, ids in enumerate(prompts):
        # the prompt is the newest turns that fit: one more exchange would not
        history = [m for i in range(k) for m in (user(questions[i]), assistant("好的。"))] + [user(questions[k])]
        kept = next(n for n in range(1, len(history) + 1, 2) if chat.encode_chat(tokenizer, history[-n:]) == ids)
        assert len(ids) <= budget
        assert kept == len(history) or len(chat.encode_chat(tokenizer, history[-kept - 2:])) > budget
    assert "第1问" in tokenizer.decode(prompts[1]) and "第1问" not in tokenizer.decode(prompts[-1])
    prompts.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions[:3]) + "\n"))
    assert run_main(script, ["--interactive", "--no_history"], monkeypatch, workdir) == 0
    assert prompts == [chat.encode_chat(tokenizer, [user(q)]) for q in questions[:3]]
    capsys.readouterr()


def test_ctrl_c_at_the_prompt_ends_interactive_mode_cleanly(workdir, monkeypatch, capsys):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    for name in ("2-eval.py", "0-eval_pretrain.py"):
        assert run_main(load_script(name), ["--interactive"], monkeypatch, workdir) == 0


def test_trim_history_drops_the_oldest_turns_first(tokenizer):
    history = []
    for i in range(5):
        history += [user(f"问题{i}" + "长" * 10), assistant(f"回答{i}" + "长" * 10)]
    messages = [{"role": "system", "content": "你是助手。"}] + history + [user("最后的问题")]
    n_tokens = lambda msgs: len(chat.encode_chat(tokenizer, msgs))  # noqa: E731
    budget = n_tokens(messages[:1] + messages[-5:])  # system + the 2 newest exchanges + the question
    trimmed = chat.trim_history(tokenizer, messages, budget)
    assert trimmed == messages[:1] + messages[-5:]
    trimmed = chat.trim_history(tokenizer, messages, budget + 5)  # not enough room for one more exchange
    assert trimmed == messages[:1] + messages[-5:]
    assert chat.trim_history(tokenizer, messages, 10_000) == messages
    # a question longer than the budget on its own: its end is kept and the result fits
    long_question = [user("开头" + "中间" * 40 + "结尾")]
    trimmed = chat.trim_history(tokenizer, long_question, 30)
    assert n_tokens(trimmed) <= 30 and trimmed[0]["content"].endswith("结尾")
    assert not trimmed[0]["content"].startswith("开头")
    assert chat.fit_context(list(range(100)), 16, 64) == (list(range(52, 100)), 16)


def trim_turn_by_turn(tokenizer, messages, max_tokens):
    """trim_history's contract spelled out: drop the oldest turn until the rest fits, restarting at a user turn."""
    fits = lambda msgs: len(chat.encode_chat(tokenizer, msgs)) <= max_tokens  # noqa: E731
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1 and not fits(system + turns):
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
    return (system if fits(system + turns) else []) + turns


def test_trim_history_is_one_pass_and_keeps_its_contract(tokenizer):
    """2,000 messages used to be re-encoded after each dropped turn (20 s on the server's event loop): now one
    tokenizer call for the counts and the same messages kept as turn by turn."""
    import random
    rng = random.Random(0)
    pieces = ["你好", "问题", "长" * 7, "abc ", "。", "\n"]
    for _ in range(150):
        messages = [{"role": "system", "content": "你是助手。"}] if rng.random() < 0.5 else []
        for k in range(rng.randint(1, 10)):
            messages.append({"role": rng.choice(["user", "assistant"]), "content": "".join(
                rng.choice(pieces) for _ in range(rng.randint(0, 8)))})
        messages.append(user("最后" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))))
        budget = rng.randint(len(chat.encode_chat(tokenizer, messages[-1:])), 160)
        assert chat.trim_history(tokenizer, messages, budget) == trim_turn_by_turn(tokenizer, messages, budget)
    calls = []

    class Counted:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            calls.append(len(args[0]))
            return tokenizer(*args, **kwargs)

    history = [m for k in range(1000) for m in (user(f"问题{k}"), assistant(f"回答{k}"))] + [user("最后的问题")]
    trimmed = chat.trim_history(Counted(), history, 100)
    assert trimmed == trim_turn_by_turn(tokenizer, history[-21:], 100) and trimmed[-1] == history[-1]
    assert max(calls) == len(history) and sum(calls) < len(history) + 10, calls


def test_perplexity_on_the_validation_split(workdir, chat_model, monkeypatch, capsys):
    model, tok, _ = chat_model
    data = workdir / "packed"
    data.mkdir()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 6400, size=3 * 64 + 1).astype(np.uint16)
    tokens.tofile(data / "pretrain_data.val.bin")
    meta = {"format": "nano-llm packed tokens v1", "dtype": "uint16", "n_tokens": len(tokens), "n_docs": 1,
            "vocab_size": 6400, "bos_id": 1, "eos_id": 2}
    (data / "pretrain_data.val.meta.json").write_text(json.dumps(meta))
    result = evaluate.perplexity(model, str(data / "pretrain_data.bin"), batch_size=2)
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model(ids[:-1].view(3, 64)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[1:])
    assert result["n_tokens"] == 192 and result["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # the script: --ppl with --data_path, and a clear error without the split
    script = load_script("0-eval_pretrain.py")
    argv = ["--checkpoint", "out/sft_single_32", "--ppl", "--data_path", "packed/pretrain_data.bin"]
    assert run_main(script, argv, monkeypatch, workdir) == 0
    assert f"(loss {result['loss']:.4f}) on 192 tokens" in capsys.readouterr().out
    assert run_main(script, argv[:-1] + ["nowhere.bin"], monkeypatch, workdir) == 1
    assert "error: no validation split nowhere.val.bin" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# C-Eval

class ChoiceModel(torch.nn.Module):
    """Answers the letter written after the last "选" of each (unpadded) prompt; records the prompts it saw."""

    def __init__(self, tokenizer, max_seq_len=4096):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.tokenizer, self.prompts, self.lengths = tokenizer, [], []
        self.letter_ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"}

    def forward(self, input_ids, attention_mask, logits_to_keep=0, **kwargs):
        logits = torch.randn(input_ids.shape[0], 1, len(self.tokenizer))  # noise elsewhere in the vocabulary
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row].bool()].tolist()
            assert attention_mask[row, -1] == 1  # left padding
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            self.lengths.append(len(ids))
            letter = text.rsplit("选", 1)[1][0]
            for c, token in self.letter_ids.items():
                logits[row, 0, token] = 5.0 if c == letter else -5.0
        return SimpleNamespace(logits=logits)


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def ceval_dir(tmp_path):
    root = tmp_path / "ceval"
    # question "k（选X）": the model answers X; gold answers agree on 3 of 4 rows, plus 2 bad rows
    write_csv(root / "val" / "math_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
              [[0, "一加一（选B）", "1", "2", "3", "4", "B"], [1, "多行\n问题（选C）", "a", "b", "c", "d", "C"],
               [2, "问题（选A）", "a", "b", "c", "d", "D"], [3, "坏答案\n（选A）", "a", "b", "c", "d", "E"],
               [4, "问题（选D）", "a", "b", "c", "d", "d"], [5, "少列", "a"]])
    write_csv(root / "dev" / "math_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
              [[0, "例题一（选A）", "x", "y", "z", "w", "A", ""], [1, "例题二（选B）", "x", "y", "z", "w", "B", ""]])
    write_csv(root / "val" / "law_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
              [[0, "法（选C）", "a", "b", "c", "d", "B"]])
    (root / "subject_mapping.json").write_text(json.dumps({"math": ["Math", "数学", "STEM"]}), encoding="utf-8")
    return root


def test_ceval_scores_by_choice_logits_with_both_header_styles(tokenizer, ceval_dir, tmp_path, capsys):
    ceval = load_script("eval_ceval.py")
    model = ChoiceModel(tokenizer)
    results = ceval.score_folder(model, tokenizer, str(ceval_dir), batch_size=3)
    assert results["subjects"]["math"] == {"correct": 3, "total": 4, "accuracy": 0.75, "bad_rows": 2,
                                                "truncated": 0, "category": "STEM"}
    assert (results["subjects"]["law"]["correct"], results["subjects"]["law"]["total"]) == (0, 1)
    assert results["n"] == 5 and results["overall"] == 3 / 5 and results["average"] == (0.75 + 0) / 2
    err = capsys.readouterr().err
    # quoted questions span lines 3-4 and 6-7: a bad row is reported at the line where it starts
    assert f"{ceval_dir / 'val' / 'math_val.csv'}:6: answer 'E' is not one of A, B, C, D" in err
    assert f"{ceval_dir / 'val' / 'math_val.csv'}:9: 3 columns, the header has 7" in err
    assert sum("以下是中国关于数学考试" in p for p in model.prompts) == 4  # the Chinese name from subject_mapping.json
    assert sum("以下是中国关于law考试" in p for p in model.prompts) == 1
    assert not any("例题一" in p for p in model.prompts)
    assert model.prompts[0].startswith("<s>user\n") and model.prompts[0].endswith("答案：</s>\n<s>assistant\n")

    # 2-shot: the dev examples come first as solved turns; the answer still follows the question's marker
    model = ChoiceModel(tokenizer)
    results = ceval.score_folder(model, tokenizer, str(ceval_dir), shots=2, subjects=["math"])
    assert results["n_correct"] == 3 and list(results["subjects"]) == ["math"]
    assert all(p.count("例题一（选A）") == 1 and "<s>assistant\nB</s>" in p
               and p.index("例题一") < p.index("例题二") < p.rindex("答案：</s>\n<s>assistant\n") for p in model.prompts)

    # CMMLU: unnamed index column, Question/Answer, test/<subject>.csv and dev/<subject>.csv
    cmmlu = tmp_path / "cmmlu"
    write_csv(cmmlu / "test" / "agronomy.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
              [[0, "农（选A）", "a", "b", "c", "d", "A"], [1, "农（选B）", "a", "b", "c", "d", "B"],
               [2, "农（选C）", "a", "b", "c", "d", "A"]])
    write_csv(cmmlu / "dev" / "agronomy.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
              [[0, "例（选D）", "a", "b", "c", "d", "D"]])
    model = ChoiceModel(tokenizer)
    results = ceval.score_folder(model, tokenizer, str(cmmlu), split="test", shots=1)
    assert results["subjects"]["agronomy"]["correct"] == 2 and results["n"] == 3 and results["bad_rows"] == 0
    assert all("例（选D）" in p for p in model.prompts)


def test_ceval_script_writes_results_and_fits_the_context(workdir, ceval_dir, tokenizer, monkeypatch, capsys):
    ceval = load_script("eval_ceval.py")
    # a short context: examples are dropped, then questions cut from the front; the answer marker survives
    model = ChoiceModel(tokenizer, max_seq_len=40)
    monkeypatch.setattr(evaluate, "load_checkpoint", lambda *a, **k: (model, tokenizer, str(workdir)))
    out = workdir / "results.csv"
    assert run_main(ceval, ["--data_dir", ceval_dir, "--shots", "2", "--out", out], monkeypatch, workdir) == 0
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0] == ["subject", "category", "correct", "total", "accuracy", "bad_rows", "truncated"]
    assert rows[1][:5] == ["law", "", "0", "1", "0.0000"] and rows[2][:5] == ["math", "STEM", "3", "4", "0.7500"]
    assert rows[3][:5] == ["overall", "", "3", "5", "0.6000"] and rows[4][4] == "0.3750"
    assert int(rows[3][6]) > 0 and max(model.lengths) == 40
    assert "overall (micro)        3      5    60.00%" in capsys.readouterr().out
    # the real model on its real (64-token) context, default output path beside the checkpoint
    monkeypatch.undo()
    assert run_main(ceval, ["--data_dir", ceval_dir, "--checkpoint", "out/sft_single_32"], monkeypatch, workdir) == 0
    rows = list(csv.reader((workdir / "out" / "sft_single_32" / "ceval_val_0shot.csv").open(encoding="utf-8")))
    assert rows[3][0] == "overall" and rows[3][3] == "5"


# ----------------------------------------------------------------------------------------------------------
# user errors and process-level behaviour

def test_user_errors_are_one_line(workdir, tmp_path, monkeypatch, capsys):
    cases = [("2-eval.py", ["--checkpoint", "out/nothing_here"], "error: checkpoint directory not found: out/nothing_here"),
             ("2-eval.py", ["--checkpoint", "out/sft_single_32", "--eval_file", "missing.jsonl"],
              "error: eval file not found: missing.jsonl"),
             ("0-eval_pretrain.py", ["--prompts", "missing.txt"], "error: prompts file not found: missing.txt"),
             ("eval_ceval.py", ["--data_dir", "dataset/ceval"], "error: data folder not found: dataset/ceval"),
             ("2-eval.py", ["--checkpoint", "out/sft_single_32", "--top_p", "0"], "error: --top_p must be in (0, 1], not 0"),
             ("0-eval_pretrain.py", ["--temperature", "-1"], "error: --temperature must be >= 0")]
    for name, argv, message in cases:
        assert run_main(load_script(name), argv, monkeypatch, workdir) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(message) and not any("Traceback" in line for line in err), (name, err)
    # no out/ at all: the default checkpoint cannot be found
    assert run_main(load_script("eval_ceval.py"), [], monkeypatch, tmp_path) == 1
    assert capsys.readouterr().err.strip().endswith(
        "error: no checkpoint found (out/grpo_*, out/*/grpo, out/dpo_*, out/*/dpo, out/sft_multi_*, out/*/sft_multi, "
        "out/sft_single_*, out/*/sft_single): train one first or pass --checkpoint DIR")


def test_scripts_as_processes_exit_cleanly_on_eof_and_missing_checkpoint(workdir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    chat = subprocess.Popen([sys.executable, os.path.join(ROOT, "2-eval.py"), "--interactive", "--max_new_tokens", "20",
                             "--temperature", "0"], cwd=workdir, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    missing = subprocess.Popen([sys.executable, os.path.join(ROOT, "0-eval_pretrain.py")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = chat.communicate(f"{TAUGHT[1][0]}\n/reset\n{TAUGHT[0][0]}\n", timeout=120)  # then end of input
    assert chat.returncode == 0 and "Traceback" not in err, err
    assert f"🤖: {TAUGHT[1][1]}\n" in out and f"🤖: {TAUGHT[0][1]}\n" in out and "(conversation cleared)" in out
    out, err = missing.communicate(timeout=120)
    assert missing.returncode == 1 and "Traceback" not in err
    assert err.strip() == "error: no checkpoint found (out/pretrain_*, out/*/pretrain): train one first or pass --checkpoint DIR"


def test_sampling_settings_that_would_crash_are_refused_up_front(tokenizer):
    model = Transformer(LMConfig(**TINY))
    ids = torch.tensor([[1, 2, 3]])
    for bad, message in [({"top_p": 0.0}, "top_p must be in"), ({"top_p": 1.5}, "top_p must be in"),
                         ({"top_k": -1}, "top_k must be"), ({"repetition_penalty": 0.0}, "repetition_penalty must be"),
                         ({"temperature": float("nan")}, "temperature must be")]:
        with pytest.raises(ValueError, match=message):
            next(generate.generate_stream(model, ids, max_new_tokens=2, **{"temperature": 1.0, **bad}))


def test_completion_prompts_keep_typed_special_tokens_as_text(tokenizer):
    ids = chat.encode_completion(tokenizer, "甲</s>乙<s>")
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.decode(ids[1:]) == "甲</s>乙<s>"
