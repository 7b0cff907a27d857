"""Run directories and checkpoints: a fresh run never mixes with an old one, numeric step order, an interrupted
save cleaned up, settings checked on resume, training knobs applied when starting from a checkpoint."""
import argparse
import json
import os
import shutil

import pytest
import torch

from conftest import make_tiny_model
from model import checkpoint
from model.runtime import Runtime
from model.chat import DEFAULT_TOKENIZER_DIR
from model.errors import StageError

RUNTIME = Runtime(torch.device("cpu"), False, 0, 0, 1)


def tiny_model(**overrides):
    return make_tiny_model(**overrides)


def fake_checkpoint(run_dir, step):
    path = os.path.join(run_dir, f"step_{step:06d}")
    os.makedirs(path)
    open(os.path.join(path, "training_state.pt"), "wb").close()
    return path


def test_steps_sort_as_numbers_and_pruning_keeps_the_newest(tmp_path):
    for step in (999_998, 999_999, 1_000_000):
        fake_checkpoint(tmp_path, step)
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))]
    assert names == ["step_999998", "step_999999", "step_1000000"]
    checkpoint.save_checkpoint(str(tmp_path), tiny_model(), {"step": 1_000_001}, keep_last=2)
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))]
    assert names == ["step_1000000", "step_1000001"]


def test_a_fresh_run_into_a_used_directory_stops_with_both_ways_out(tmp_path):
    run_dir = str(tmp_path / "run")
    fake_checkpoint(run_dir, 5)
    with pytest.raises(StageError, match="already holds a run: continue it with --resume.*--overwrite"):
        checkpoint.prepare_run_dir(run_dir, None, False, RUNTIME)
    assert checkpoint.prepare_run_dir(run_dir, "yes", False, RUNTIME) is True
    assert checkpoint.prepare_run_dir(run_dir, "auto", False, RUNTIME) is True
    # --overwrite moves the old run aside, it does not delete it
    assert checkpoint.prepare_run_dir(run_dir, None, True, RUNTIME) is False
    assert os.listdir(run_dir) == []
    aside = [n for n in os.listdir(tmp_path) if n.startswith("run.replaced-")]
    assert len(aside) == 1 and os.path.isdir(tmp_path / aside[0] / "step_000005")
    # auto on an empty directory starts fresh; --resume on it is an error
    assert checkpoint.prepare_run_dir(run_dir, "auto", False, RUNTIME) is False
    with pytest.raises(StageError, match="--resume: no checkpoint"):
        checkpoint.prepare_run_dir(run_dir, "yes", False, RUNTIME)


def test_final_weights_alone_also_count_as_a_run(tmp_path):
    tiny_model().save_pretrained(tmp_path / "run")
    with pytest.raises(StageError, match="already holds a run"):
        checkpoint.prepare_run_dir(str(tmp_path / "run"), None, False, RUNTIME)


def test_a_kill_between_the_two_renames_of_a_save_is_repaired(tmp_path):
    run_dir = str(tmp_path)
    fake_checkpoint(run_dir, 5)
    os.rename(tmp_path / "step_000005", tmp_path / "step_000005.old")  # the old step moved aside, then killed
    os.makedirs(tmp_path / ".tmp_step_000005")
    assert checkpoint.list_checkpoints(run_dir) == []
    checkpoint.clean_interrupted_save(run_dir)
    assert sorted(os.listdir(tmp_path)) == ["step_000005"]
    fake_checkpoint(run_dir, 6)
    os.makedirs(tmp_path / "step_000006.old")  # replacement done, the old copy left behind
    checkpoint.clean_interrupted_save(run_dir)
    assert sorted(os.listdir(tmp_path)) == ["step_000005", "step_000006"]


def test_training_knobs_from_flags_are_the_ones_the_model_runs_with(tmp_path):
    tiny_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0).save_pretrained(tmp_path)
    model = checkpoint.load_init_model(str(tmp_path), {"dropout": 0.5, "aux_loss_alpha": 0.3, "max_seq_len": 128})
    assert model.config.dropout == 0.5 and model.config.max_seq_len == 128
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.5 for p in dropouts)
    gates = [m for m in model.modules() if hasattr(m, "alpha")]
    assert gates and all(g.alpha == 0.3 for g in gates)
    model.save_pretrained(tmp_path / "next")
    assert json.load(open(tmp_path / "next" / "config.json"))["max_seq_len"] == 128


def test_a_tokenizer_other_than_the_checkpoints_is_refused_even_at_the_same_size(tmp_path):
    tiny_model(vocab_size=6400).save_pretrained(tmp_path / "ckpt")
    checkpoint.copy_tokenizer(DEFAULT_TOKENIZER_DIR, str(tmp_path / "ckpt"))
    other = tmp_path / "other"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, other)
    spec = json.load(open(other / "tokenizer.json", encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    json.dump(spec, open(other / "tokenizer.json", "w", encoding="utf-8"), ensure_ascii=False)
    args = argparse.Namespace(tokenizer_dir=str(other))
    with pytest.raises(StageError, match="is not the one .* was trained with"):
        checkpoint.start_from_checkpoint(str(tmp_path / "ckpt"), args, {})
    args.tokenizer_dir = None
    assert checkpoint.start_from_checkpoint(str(tmp_path / "ckpt"), args, {})[2] == str(tmp_path / "ckpt")


def test_resume_refuses_changed_settings_and_allows_a_longer_run(capsys):
    saved = {"batch_size": 8, "accumulation_steps": 1, "world_size": 2, "seed": 1, "data": "a.bin",
             "n_examples": 100, "tokenizer_sha256": "x", "total_steps": 50}
    with pytest.raises(StageError) as err:
        checkpoint.check_settings(saved, {**saved, "batch_size": 4, "world_size": 1}, "out/run/step_000010")
    assert "batch_size 8 -> 4" in str(err.value) and "world_size 2 -> 1" in str(err.value)
    with pytest.raises(StageError, match="data 'a.bin' -> 'b.bin'"):
        checkpoint.check_settings(saved, {**saved, "data": "b.bin"}, "x")
    checkpoint.check_settings(saved, {**saved, "total_steps": 80}, "x")
    assert "total steps 50 -> 80" in capsys.readouterr().out


def test_resume_refuses_another_doc_mask_or_pretraining_replay():
    saved = {"data": "a.bin", "n_examples": 100, "doc_mask": False, "ptx_data": None}
    with pytest.raises(StageError, match="doc_mask False -> True"):
        checkpoint.check_settings(saved, {**saved, "doc_mask": True}, "x")
    with pytest.raises(StageError, match="ptx_data None -> '/data/pretrain.bin'"):  # a replay added on resume
        checkpoint.check_settings(saved, {**saved, "ptx_data": "/data/pretrain.bin"}, "x")
    replay = {**saved, "ptx_data": "/data/pretrain.bin", "ptx_file_rows": 500, "ptx_seq_len": 64}
    for change in ({"ptx_file_rows": 800}, {"ptx_seq_len": 32}, {"ptx_data": "/data/other.bin"}):
        with pytest.raises(StageError, match=next(iter(change))):
            checkpoint.check_settings(replay, {**replay, **change}, "x")


def test_stage_scripts_record_the_settings_a_resume_compares(tmp_path, monkeypatch):
    """1-pretrain.py did not record --doc_mask, 4-dpo.py not --ptx_seq_len, and neither SFT nor DPO which replay
    file (or none) a run used: a resume with other values went on silently."""
    import importlib.util
    import sys

    import data_process
    from model import trainer
    texts = [f"第{i}篇文档：张伟出生于杭州，{'很' * (i % 7)}好。" for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                           encoding="utf-8")
    data_process.main(["pretrain", "--data_path", str(tmp_path / "corpus.jsonl"), "--num_workers", "1",
                       "--val_ratio", "0"])
    packed = str(tmp_path / "corpus.bin")
    init = str(tmp_path / "sft_single_32")
    tiny_model(vocab_size=6400, max_seq_len=64).save_pretrained(init)
    checkpoint.copy_tokenizer(DEFAULT_TOKENIZER_DIR, init)
    turn = [{"role": "user", "content": "1加1等于几？"}]
    with open(tmp_path / "sft.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"conversations": turn + [{"role": "assistant", "content": "2。"}]}, ensure_ascii=False)
                + "\n")
    with open(tmp_path / "dpo.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"chosen": turn + [{"role": "assistant", "content": "2。"}],
                            "rejected": turn + [{"role": "assistant", "content": "3。"}]}, ensure_ascii=False) + "\n")
    recorded = {}

    class Recorded(Exception):
        pass

    def fit(*args, settings=None, **kwargs):
        recorded.update(settings)
        raise Recorded

    monkeypatch.setattr(trainer, "fit", fit)
    common = ["--device", "cpu", "--dtype", "float32"]
    runs = {
        "1-pretrain.py": ["--data_path", packed, "--doc_mask", "--dim", "32", "--n_layers", "2", "--n_heads", "4",
                          "--n_kv_heads", "2", "--max_seq_len", "64"],
        "3-full_sft.py": ["--data_path", str(tmp_path / "sft.jsonl"), "--init_from", init, "--ptx_data", packed],
        "4-dpo.py": ["--data_path", str(tmp_path / "dpo.jsonl"), "--init_from", init, "--ptx_data", packed,
                     "--ptx_seq_len", "32"],
    }
    expected = {
        "1-pretrain.py": {"doc_mask": True},
        "3-full_sft.py": {"ptx_data": os.path.abspath(packed), "ptx_rows": 1},
        "4-dpo.py": {"ptx_data": os.path.abspath(packed), "ptx_seq_len": 32},
    }
    for script, argv in runs.items():
        spec = importlib.util.spec_from_file_location("script_" + script[:-3].replace("-", "_"),
                                                      os.path.join(os.path.dirname(__file__), "..", script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        recorded.clear()
        monkeypatch.setattr(sys, "argv", [script, *argv, *common, "--out_dir", str(tmp_path / "out" / script)])
        with pytest.raises(Recorded):
            module.main()
        assert expected[script].items() <= recorded.items(), (script, recorded)
        assert all(key in recorded for key in expected[script]), script
        if "ptx_data" in expected[script]:
            assert recorded["ptx_file_rows"] > 1
