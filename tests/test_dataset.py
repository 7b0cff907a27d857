"""model/dataset.py: packed pretraining rows, SFT/DPO label masks, truncation, packing and collation."""
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import data_process
from conftest import make_tiny_model
from model.dataset import (DPODataset, PretrainDataset, PretrainReplay, SFTDataset, pretrain_useful_fraction,
                           token_fractions)

IGNORE = -100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def packed_file(tmp_path, texts, val_ratio="0"):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    data_process.main(["pretrain", "--data_path", str(src), "--num_workers", "1", "--val_ratio", val_ratio])
    path = str(tmp_path / "corpus.bin")
    return path, np.fromfile(path, dtype=np.uint16).astype(np.int64)


TEXTS = [f"第{i}篇文档：张伟出生于杭州，{'很' * (i % 7)}好。" for i in range(40)]


def test_pretrain_rows_are_consecutive_shifted_windows(tmp_path):
    path, tokens = packed_file(tmp_path, TEXTS)
    ds = PretrainDataset(path, max_seq_len=16)
    assert len(ds) == (len(tokens) - 1) // 16 and ds.vocab_size == 6400
    for i in (0, 1, len(ds) - 1):
        item = ds[i]
        assert set(item) == {"input_ids", "shift_labels"}
        assert item["input_ids"].tolist() == tokens[i * 16:i * 16 + 16].tolist()
        assert item["shift_labels"].tolist() == tokens[i * 16 + 1:i * 16 + 17].tolist()
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == batch["shift_labels"].shape == (4, 16)
    assert batch["input_ids"].dtype == torch.long
    assert pretrain_useful_fraction(ds) * len(tokens) >= len(tokens) - 17  # packing wastes at most the tail


def test_pretrain_doc_mask_positions_restart_and_boundary_targets_are_ignored(tmp_path):
    path, tokens = packed_file(tmp_path, TEXTS)
    plain, masked = PretrainDataset(path, 64), PretrainDataset(path, 64, doc_mask=True)
    for i in range(len(masked)):
        row = tokens[i * 64:i * 64 + 65]
        item = masked[i]
        expected_pos, pos = [], 0
        for t, token in enumerate(row[:-1]):
            pos = 0 if token == 1 else (pos + 1 if t else 0)
            expected_pos.append(pos)
        assert item["position_ids"].tolist() == expected_pos
        expected = [IGNORE if nxt == 1 else nxt for nxt in row[1:]]
        assert item["shift_labels"].tolist() == expected
        assert plain[i]["shift_labels"].tolist() == row[1:].tolist()  # the flag changes only what it should
    assert 1 in tokens[64:-1]  # the test really crossed document boundaries inside rows


def test_pretrain_val_path_and_split(tmp_path):
    path, _ = packed_file(tmp_path, TEXTS, val_ratio="0.1")
    val = PretrainDataset(PretrainDataset.val_path(path), 8)
    assert PretrainDataset.val_path(path).endswith("corpus.val.bin") and len(val) >= 1


def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read RSS")
def test_one_gigabyte_file_opens_without_being_read(tmp_path):
    path = tmp_path / "big.bin"
    n_bytes = 1 << 30
    with open(path, "wb") as f:
        f.truncate(n_bytes)  # sparse: costs no disk and no page cache until read
    meta = {"dtype": "uint16", "n_tokens": n_bytes // 2, "vocab_size": 6400, "bos_id": 1, "eos_id": 2}
    (tmp_path / "big.meta.json").write_text(json.dumps(meta))
    before = rss_kib()
    ds = PretrainDataset(str(path), max_seq_len=512, doc_mask=True)
    rows = [ds[i] for i in (0, len(ds) // 2, len(ds) - 1)]
    grown_mib = (rss_kib() - before) / 1024
    assert len(ds) == (n_bytes // 2 - 1) // 512
    assert all(r["input_ids"].shape == (512,) for r in rows)
    assert grown_mib < 32, f"RSS grew by {grown_mib:.0f} MiB"
    # DataLoader workers get the path, not the mapped data (what they receive is __getstate__)
    assert ds.__getstate__()["_tokens"] is None and not any(isinstance(v, np.memmap) for v in ds.__getstate__().values())


def test_pretrain_size_mismatch_is_a_clear_error(tmp_path):
    path, _ = packed_file(tmp_path, TEXTS)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(ValueError, match="meta.json says"):
        PretrainDataset(path, 16)
    with pytest.raises(FileNotFoundError, match="data_process.py pretrain"):
        PretrainDataset(str(tmp_path / "missing.bin"), 16)


def test_pretrain_packed_with_another_tokenizer_is_a_stage_error(tmp_path, capsys):
    from conftest import SHIPPED_TOKENIZER
    from model.chat import tokenizer_sha256
    from model.errors import StageError
    path, _ = packed_file(tmp_path, TEXTS)
    shipped = tokenizer_sha256(SHIPPED_TOKENIZER)
    meta_path = tmp_path / "corpus.meta.json"
    assert json.loads(meta_path.read_text())["tokenizer_sha256"] == shipped  # data_process uses the same hash
    assert len(PretrainDataset(path, 16, tokenizer_sha256=shipped)) > 0
    other = "ab" * 32
    with pytest.raises(StageError) as info:
        PretrainDataset(path, 16, tokenizer_sha256=other)
    message = str(info.value)
    assert SHIPPED_TOKENIZER in message and shipped[:12] in message and other[:12] in message
    assert "data_process.py pretrain" in message and "--tokenizer_dir" in message
    meta = json.loads(meta_path.read_text())
    del meta["tokenizer_sha256"]  # packed by an older data_process.py: warned about once, not an error
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    PretrainDataset(path, 16, tokenizer_sha256=other)
    PretrainDataset(path, 16, tokenizer_sha256=other)
    assert capsys.readouterr().err.count("does not record its tokenizer") == 1


# ----------------------------------------------------------------------------------------------------------
# chat data

CONVERSATION = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "张伟出生在哪个城市？"},
    {"role": "assistant", "content": "张伟出生于杭州。"},
    {"role": "user", "content": "他在哪里工作？"},
    {"role": "assistant", "content": "张伟的工作单位是蓝海科技。"},
    {"role": "user", "content": "37+45等于多少？"},
    {"role": "assistant", "content": "37+45=82。 Done!"},
]


def jsonl(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def labelled_runs(labels):
    """Consecutive labelled positions as lists of target ids."""
    runs, current = [], []
    for label in labels:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_sft_labels_cover_exactly_every_assistant_turn(tmp_path, tokenizer):
    ds = SFTDataset(jsonl(tmp_path, "sft.jsonl", [{"conversations": CONVERSATION}]), tokenizer, 512)
    item = ds[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    # the ids are the chat template's, so label positions refer to what the model sees at inference
    assert ids == tokenizer.apply_chat_template(CONVERSATION)["input_ids"]
    assert all(label in (IGNORE, token) for label, token in zip(labels, ids))  # aligned, the model shifts
    runs = labelled_runs(labels)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == [a + "</s>" for a in answers]


def test_sft_ids_match_the_chat_template_on_the_demo_corpus(demo_dir, tokenizer):
    path = os.path.join(demo_dir, "sft_data_multi.jsonl")
    ds = SFTDataset(path, tokenizer, 512)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(next(f)) for _ in range(30)]
    for i, record in enumerate(records):
        assert ds[i]["input_ids"].tolist() == tokenizer.apply_chat_template(record["conversations"])["input_ids"]


def test_sft_truncation_never_labels_a_prompt_token(tmp_path, tokenizer):
    long_prompt = [{"role": "user", "content": "很长的问题" * 40}, {"role": "assistant", "content": "简短的回答。"}]
    long_answer = [{"role": "user", "content": "问"}, {"role": "assistant", "content": "很长的回答" * 40}]
    ds = SFTDataset(jsonl(tmp_path, "t.jsonl", [{"conversations": long_prompt}, {"conversations": long_answer},
                                                {"conversations": CONVERSATION}]), tokenizer, 32)
    for i, answers in enumerate([["简短的回答。</s>"], ["很长的回答" * 40], None]):
        item = ds[i]
        assert len(item["input_ids"]) == 32
        runs = [tokenizer.decode(run) for run in labelled_runs(item["labels"].tolist())]
        assert runs, "a truncated example must keep at least one label"
        for run in runs:  # every labelled stretch is a piece of an assistant answer
            assert any(run in a + "</s>" for a in answers or [m["content"] for m in CONVERSATION
                                                               if m["role"] == "assistant"])
    assert tokenizer.decode(labelled_runs(ds[0]["labels"].tolist())[0]) == "简短的回答。</s>"


def test_sft_collate_pads_right_with_masks(tmp_path, tokenizer):
    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]
    ds = SFTDataset(jsonl(tmp_path, "c.jsonl", [{"conversations": short}, {"conversations": CONVERSATION}]),
                    tokenizer, 512)
    batch = ds.collate([ds[0], ds[1]])
    n0, n1 = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n1) and batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n0:] == IGNORE).all()
    fractions = token_fractions(batch)
    assert fractions["non_pad"] == pytest.approx((n0 + n1) / (2 * n1))
    assert 0 < fractions["labelled"] < fractions["non_pad"]


def test_sft_packing_keeps_conversations_apart(tmp_path, tokenizer):
    convs = [[{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": f"回答{i}" * (i % 3 + 1)}]
             for i in range(12)]
    path = jsonl(tmp_path, "p.jsonl", [{"conversations": c} for c in convs])
    plain, packed = SFTDataset(path, tokenizer, 64), SFTDataset(path, tokenizer, 64, pack=True)
    assert len(packed) < len(plain)
    pieces = []
    for i in range(len(packed)):
        item = packed[i]
        ids, pos = item["input_ids"].tolist(), item["position_ids"].tolist()
        assert len(ids) <= 64
        starts = [t for t, p in enumerate(pos) if p == 0]
        assert all(ids[t] == tokenizer.bos_token_id and item["labels"][t] == IGNORE for t in starts)
        for a, b in zip(starts, starts[1:] + [len(ids)]):
            pieces.append((ids[a:b], item["labels"][a:b].tolist()))
    # unpacking gives back every conversation exactly, labels included
    assert pieces == [(plain[j]["input_ids"].tolist(), plain[j]["labels"].tolist()) for j in range(len(plain))]
    batch = packed.collate([packed[0], packed[len(packed) - 1]])
    assert batch["position_ids"].shape == batch["input_ids"].shape
    assert token_fractions(batch)["non_pad"] > 0.5


@pytest.mark.parametrize("pack", [False, True])
def test_pretraining_rows_replayed_in_sft_are_fixed_distinct_and_batch_with_conversations(tmp_path, tokenizer, pack):
    # 3-full_sft.py --ptx_data: rows of the packed pretraining text join the SFT rows, every token a target
    path, _ = packed_file(tmp_path, TEXTS * 3)
    rows = PretrainDataset(path, max_seq_len=16)
    replay = PretrainReplay(rows, 5, seed=3, with_positions=pack)
    assert replay.rows == PretrainReplay(rows, 5, seed=3, with_positions=pack).rows  # a resumed run sees the same
    assert len(set(replay.rows)) == 5 and replay.rows != PretrainReplay(rows, 5, seed=4, with_positions=pack).rows
    more = PretrainReplay(rows, len(rows) + 2, seed=3, with_positions=pack).rows  # more rows than the file has:
    assert sorted(more[:len(rows)]) == list(range(len(rows))) and len(more) == len(rows) + 2  # each once, then again
    item = replay[1]
    assert item["input_ids"].tolist() == rows[replay.rows[1]]["input_ids"].tolist()
    assert torch.equal(item["labels"], item["input_ids"])  # aligned, the model shifts: every next token a target
    sft = SFTDataset(jsonl(tmp_path, "c.jsonl", [{"conversations": CONVERSATION}] * 4), tokenizer, 64, pack=pack)
    assert set(item) == set(sft[0])  # the same keys, so one collate takes both
    batch = sft.collate([sft[0], item])
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"][1, :16] == item["input_ids"]).all()
    if pack:
        assert batch["position_ids"][1, :16].tolist() == list(range(16))


@pytest.mark.parametrize("pack", [False, True])
def test_sft_bad_records_fail_at_construction_whatever_pack(tmp_path, tokenizer, capsys, pack):
    from model.errors import StageError
    good = {"conversations": CONVERSATION}
    path = jsonl(tmp_path, "bad.jsonl", [good, good, {"text": "pretraining text"}, good,
                                         {"conversations": CONVERSATION[:-1]}] + [good] * 3)
    with pytest.raises(StageError) as info:
        SFTDataset(path, tokenizer, 64, pack=pack)
    assert f"{path}: 2 of 8 records are not canonical SFT" in str(info.value)
    assert f'the first: {path}:3: expected {{"conversations": [...]}}' in str(info.value)
    err = capsys.readouterr().err
    assert f"{path}:3: expected" in err and f"{path}:5: the last message must be from the assistant" in err
    assert not [name for name in os.listdir(tmp_path) if ".sft-" in name]  # no cache of a bad file


def test_dpo_bad_records_fail_at_construction(tmp_path, tokenizer):
    from model.errors import StageError
    good = {"chosen": CONVERSATION, "rejected": CONVERSATION[:-1] + [{"role": "assistant", "content": "不"}]}
    path = jsonl(tmp_path, "dpo.jsonl", [good] * 5 + [{"chosen": CONVERSATION, "rejected": "x"}])
    with pytest.raises(StageError, match=r"dpo\.jsonl: 1 of 6 records .* the first: .*dpo\.jsonl:6: \(rejected\): "
                                         r"expected a non-empty list"):
        DPODataset(path, tokenizer, 64)


def old_packed_items(path, tokenizer, max_seq_len):
    """The packed items as the in-memory implementation built them (the reference for the cache)."""
    from model.chat import ChatEncoder
    encoder = ChatEncoder(tokenizer, max_seq_len)
    with open(path, encoding="utf-8") as f:
        encodings = [encoder.encode(json.loads(line)["conversations"]) for line in f if line.strip()]
    rows, current, length = [], [], 0
    for i, (ids, _) in enumerate(encodings):
        if current and length + len(ids) > max_seq_len:
            rows.append(current)
            current, length = [], 0
        current.append(i)
        length += len(ids)
    rows.append(current)
    items = []
    for row in rows:
        ids, labels, positions = [], [], []
        for j in row:
            ids += encodings[j][0]
            labels += encodings[j][1]
            positions += range(len(encodings[j][0]))
        items.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return items


def as_lists(ds):
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(len(ds))]


def sft_caches(tmp_path):
    return sorted({name.split(".sft-")[1].split(".")[0] for name in os.listdir(tmp_path) if ".sft-" in name})


def test_sft_packed_cache_items_equal_the_in_memory_encoding_across_a_rebuild(tmp_path, tokenizer):
    convs = [{"conversations": CONVERSATION[:1 + 2 * (i % 3 + 1)]} for i in range(30)]
    convs += [{"conversations": [{"role": "user", "content": "长" * 300}, {"role": "assistant", "content": "短"}]}]
    path = jsonl(tmp_path, "sft.jsonl", convs)
    expected = old_packed_items(path, tokenizer, 96)
    first = SFTDataset(path, tokenizer, 96, pack=True)
    assert as_lists(first) == expected
    assert len(sft_caches(tmp_path)) == 1
    cache_files = sorted(os.listdir(tmp_path))
    assert SFTDataset.prepare(path, tokenizer, 96) == first.cache  # reused, not rebuilt
    for name in cache_files:
        if ".sft-" in name and not name.endswith(".meta.json"):
            os.remove(tmp_path / name)  # a cache with a missing part is rebuilt
    assert as_lists(SFTDataset(path, tokenizer, 96, pack=True)) == expected
    assert sorted(os.listdir(tmp_path)) == cache_files and not [n for n in cache_files if ".tmp" in n]
    # a DataLoader worker gets paths, not arrays, and reopens the memmaps
    # (what DataLoader sends a worker is __getstate__; it rebuilds the object from it as below)
    first[0]
    state = first.__getstate__()
    assert first._arrays is not None and state["_arrays"] is None
    assert not any(isinstance(v, np.memmap) for v in state.values())  # small line indexes travel, the data does not
    clone = SFTDataset.__new__(SFTDataset)
    clone.__dict__.update(state)
    assert clone._arrays is None and as_lists(clone) == expected


def test_sft_cache_is_rebuilt_when_data_tokenizer_or_length_change(tmp_path, tokenizer):
    from transformers import AutoTokenizer
    from conftest import SHIPPED_TOKENIZER
    convs = [{"conversations": CONVERSATION[:3]}] * 10
    path = jsonl(tmp_path, "sft.jsonl", convs)
    base = SFTDataset.prepare(path, tokenizer, 64)
    assert SFTDataset.prepare(path, tokenizer, 64) == base
    assert SFTDataset.prepare(path, tokenizer, 128) != base  # other max_seq_len
    other = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    assert SFTDataset.prepare(path, other, 64) == base  # an equal tokenizer loaded again: same cache
    other.add_tokens(["张伟出生"])  # a different tokenizer encodes differently
    assert SFTDataset.prepare(path, other, 64) != base
    assert as_lists(SFTDataset(path, other, 64, pack=True)) == old_packed_items(path, other, 64)
    n_caches = len(sft_caches(tmp_path))
    edited = [{"conversations": CONVERSATION[:5]}] + convs[1:]  # the data edited
    jsonl(tmp_path, "sft.jsonl", edited)
    ds = SFTDataset(path, tokenizer, 64, pack=True)
    assert ds.cache != base and len(sft_caches(tmp_path)) == n_caches + 1
    assert as_lists(ds) == old_packed_items(path, tokenizer, 64)


def test_sft_stage_builds_every_packed_cache_on_rank_0_before_the_barrier(tmp_path, monkeypatch):
    """The validation cache was built after the barrier, by every DDP rank at once, racing on the same files."""
    import importlib.util
    import sys

    from model.chat import DEFAULT_TOKENIZER_DIR
    from model.checkpoint import copy_tokenizer
    from model.runtime import Runtime
    init = str(tmp_path / "pretrain_32")
    make_tiny_model(vocab_size=6400, max_seq_len=64).save_pretrained(init)
    copy_tokenizer(DEFAULT_TOKENIZER_DIR, init)
    train = jsonl(tmp_path, "train.jsonl", [{"conversations": CONVERSATION}] * 3)
    val = jsonl(tmp_path, "val.jsonl", [{"conversations": CONVERSATION[:3]}] * 2)
    spec = importlib.util.spec_from_file_location("script_3_full_sft", os.path.join(ROOT, "3-full_sft.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    events = []

    class Reached(Exception):
        pass

    class Rank0(Runtime):
        def barrier(self):
            events.append("barrier")
            raise Reached  # what rank 0 has built by now is what the other ranks find

    monkeypatch.setattr(script, "init_runtime", lambda device: Rank0(torch.device("cpu"), True, 0, 0, 2))
    build = SFTDataset._build_cache
    monkeypatch.setattr(SFTDataset, "_build_cache", lambda self, base, key: (
        events.append(os.path.basename(base).split(".")[0]), build(self, base, key)))
    monkeypatch.setattr(sys, "argv", ["3-full_sft.py", "--data_path", train, "--val_path", val, "--init_from", init,
                                      "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    with pytest.raises(Reached):
        script.main()
    assert events == ["train", "val", "barrier"]


def test_dpo_cuts_a_long_prompt_at_the_same_place_for_both_sides(tmp_path, tokenizer):
    """Each side's window used to start where its own length put it: with a prompt longer than the context, a short
    chosen answer and a long rejected one were scored under two different cuts of the prompt."""
    prompt = [{"role": "user", "content": "请读下面的长文：" + "北京上海广州深圳杭州成都" * 12}]
    record = {"chosen": prompt + [{"role": "assistant", "content": "好。"}],
              "rejected": prompt + [{"role": "assistant", "content": "这个回答很长，" * 12}]}
    ds = DPODataset(jsonl(tmp_path, "dpo.jsonl", [record]), tokenizer, 64)
    item = ds[0]
    prompts = []
    for side in ("chosen", "rejected"):
        ids, labels = item[f"{side}_input_ids"].tolist(), item[f"{side}_labels"].tolist()
        first = next(k for k, label in enumerate(labels) if label != IGNORE)
        assert len(ids) <= 64 and first > 0
        prompts.append(ids[:first])
    assert prompts[0] == prompts[1]
    assert tokenizer.decode(labelled_runs(item["chosen_labels"].tolist())[0]) == "好。</s>"
    assert len(labelled_runs(item["rejected_labels"].tolist())[0]) >= 16  # both responses keep their start


def test_dpo_labels_only_the_response_and_prompts_match(tmp_path, tokenizer):
    prompt = CONVERSATION[:-1]
    record = {"chosen": prompt + [{"role": "assistant", "content": "37+45=82。"}],
              "rejected": prompt + [{"role": "assistant", "content": "37+45=83。这是错的"}]}
    ds = DPODataset(jsonl(tmp_path, "dpo.jsonl", [record, record]), tokenizer, 512)
    item = ds[0]
    for side, answer in (("chosen", "37+45=82。"), ("rejected", "37+45=83。这是错的")):
        runs = labelled_runs(item[f"{side}_labels"].tolist())
        assert [tokenizer.decode(r) for r in runs] == [answer + "</s>"]  # earlier assistant turns: prompt only
    prompt_len = len(tokenizer.apply_chat_template(prompt)["input_ids"])
    assert item["chosen_input_ids"][:prompt_len].tolist() == item["rejected_input_ids"][:prompt_len].tolist()
    batch = ds.collate([ds[0], ds[1]])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    n = len(item["chosen_input_ids"])
    assert batch["chosen_attention_mask"][0].sum() == n and (batch["chosen_labels"][0, n:] == IGNORE).all()
