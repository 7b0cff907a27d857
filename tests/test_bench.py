"""Smoke tests of the benchmarks (python -m bench): the CPU sections, the GPU one and the GGUF one run end to end on
a tiny config and report the ratios they promise (the model-level checks they rely on live in tests/test_model.py)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.bench_smoke


def test_bench_smoke_json_on_a_tiny_config(tmp_path):
    cmd = [sys.executable, "-m", "bench", "train,decode,int8,moe,alloc", "--json", "--dim", "64", "--n_layers", "2",
           "--n_heads", "4", "--n_kv_heads", "2", "--vocab_size", "300", "--seq_len", "32", "--batch_size", "2",
           "--steps", "2", "--warmup", "1", "--new_tokens", "8", "--decode_rounds", "1", "--no-compile",
           "--bf16", "off", "--peak_n", "256", "--alloc_rounds", "1", "--save_json", str(tmp_path / "bench.json")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    fp32 = report["train"]["fp32"]
    for name in ("hf", "ours"):
        assert fp32[name]["tok_s"] > 0 and 0 < fp32[name]["fraction_of_peak"]
    assert math.isfinite(fp32["ours"]["ratio_vs_hf"]) and fp32["ours"]["ratio_vs_hf"] > 0
    assert fp32["loss_diff_vs_hf"]["ours"] < 1e-5  # same weights, same batch: same loss
    assert "skipped" in report["train"]["bf16"]
    decode = report["decode"]
    assert decode["same_tokens"] is True
    assert decode["threads_1"]["ours eager"]["x_hf"] > 0 and decode["threads_1"]["floor"]["tok_s"] > 0
    assert "ours fast path" not in decode["threads_1"]  # --no-compile: no compiled decode step either
    int8 = report["int8"]  # --no-compile: the two eager kernels, against fp32 F.linear
    assert set(int8["rows"]) == {"fp32 F.linear", "int8 _weight_int8pack_mm"} and int8["matrices"] == 2 * 7 + 1
    assert int8["rows"]["int8 _weight_int8pack_mm"]["ms"] > 0 and 0 < int8["int8_max_rel_error"] < 0.02
    assert report["moe"]["moe_over_dense"] > 0 and report["moe"]["dense_hidden_dim"] == 3 * 192
    alloc = report["alloc"]  # glibc here: both sides ran, each in its own process
    assert alloc["default_tok_s"] > 0 and alloc["keep_tok_s"] > 0 and alloc["keep_speedup"] > 0
    # the saved JSON prints as the report table, every section's part of it
    table = subprocess.run([sys.executable, "-m", "bench", "--table_from", str(tmp_path / "bench.json")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    for heading in ("matmul peak", "training (64 tokens/step", "decode (batch 1", "int8 weight-only", "MoE (", "under glibc malloc"):
        assert heading in table.stdout, heading


def test_bench_smoke_gpu_mfu_script_runs_its_code_path_on_cpu():
    """The gpu section cannot run here without a GPU; its --device cpu mode keeps the code from rotting."""
    cmd = [sys.executable, "-m", "bench", "gpu", "--json", "--device", "cpu", "--dim", "64", "--n_layers", "2",
           "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "32", "--batch_size", "2", "--steps", "1",
           "--warmup", "1", "--no_compile", "--peak_n", "128"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens_per_step"] == 64 and report["achieved_tflops"] > 0
    assert report["fraction_of_measured_matmul"] > 0 and report["mfu_vs_datasheet"] is None



def test_bench_gpu_runs_alone_and_an_unknown_section_is_one_error_line():
    for sections, message in (("train,gpu", "gpu runs alone"), ("train,decod", "unknown section(s): decod")):
        result = subprocess.run([sys.executable, "-m", "bench", sections], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.slow
def test_bench_gguf_times_greedy_loops_that_give_generate_streams_tokens():
    """llama.cpp's eval loop once fed token 0 at every step (Llama.scores stays zero without logits_all=True):
    the section now stops with an error unless both llama.cpp loops on the f32 file give generate_stream's tokens."""
    pytest.importorskip("llama_cpp")
    cmd = [sys.executable, "-m", "bench", "gguf", "--json", "--dim", "64", "--n_layers", "2", "--n_heads", "4",
           "--n_kv_heads", "2", "--new_tokens", "24", "--decode_rounds", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["gguf"]
    rows = [v for k, v in report.items() if k.startswith("threads_")]
    assert rows and report["file_mib"]["q8_0"] < report["file_mib"]["f16"] < report["file_mib"]["f32"]
    for row in rows:
        assert row["f32 eval loop"]["same_tokens_as_ours"] == 24 and row["f32 generate()"]["same_tokens_as_ours"] == 24
        assert all(x["tok_s"] > 0 for x in row.values())


@pytest.mark.slow
def test_bench_data_section_runs_both_pretraining_sizes(tmp_path):
    # both pretraining runs once wrote to the same --out_dir, and the second refused it ("already holds a run")
    cmd = [sys.executable, "-m", "bench", "data", "--json", "--seq_len", "64", "--batch_size", "2", "--rss_tokens",
           "400000", "--rss_steps", "2", "--reader_records", "1000", "--reader_rounds", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)["data"]
    assert 0 < data["pretrain"]["useful_fraction"] <= 1 and 0 < data["sft_data_multi_packed"]["useful_fraction"] <= 1
    memory = data["pretrain_memory"]
    assert memory["small"]["peak_rss_mb"] > 0 and memory["large"]["file_mb"] == 8 * memory["small"]["file_mb"]
    assert data["json_reader"]["iter_json_array_records_s"] > 0


def test_bench_smoke_soak_reports_the_server_under_abuse():
    cmd = [sys.executable, "-m", "bench", "soak", "--json", "--soak_s", "3", "--soak_tokens", "8", "--dim", "64",
           "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    soak = json.loads(result.stdout)["soak"]
    assert soak["good"]["requests"] > 0 and soak["good"]["mismatches"] == 0 and soak["n_5xx"] == 0
    assert soak["abuse_requests"] > 0 and soak["unexpected"] == [] and soak["server_tracebacks"] == 0
    assert soak["health"]["n"] > 0 and soak["rss_mib"]["end"] > 0


@pytest.fixture(scope="module")
def grpo_files(tmp_path_factory):
    """A tiny chat checkpoint (random weights, the shipped tokenizer), prompts whose answer is 7, held-out checks."""
    import torch
    from model.LMConfig import LMConfig
    from model.chat import DEFAULT_TOKENIZER_DIR
    from model.checkpoint import copy_tokenizer
    from model.model import Transformer
    work = tmp_path_factory.mktemp("bench_grpo")
    torch.manual_seed(0)
    Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400, max_seq_len=64,
                         dropout=0.0)).save_pretrained(work / "start")
    copy_tokenizer(DEFAULT_TOKENIZER_DIR, str(work / "start"))
    question = [{"role": "user", "content": "说一个数字。"}]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"conversations": question, "answer": "7"}) + "\n"
                                                for _ in range(8)))
    (work / "eval.jsonl").write_text("".join(json.dumps({"messages": question, "answer": str(d)}) + "\n"
                                             for d in range(4)))
    return ["--grpo_init", str(work / "start"), "--grpo_data", str(work / "prompts.jsonl"), "--grpo_eval",
            str(work / "eval.jsonl")]


def test_bench_smoke_grpo_runs_ours_and_trl_with_the_same_settings(grpo_files):
    pytest.importorskip("trl")  # a benchmark-only dependency (requirements-bench.txt): CI does not install it
    cmd = [sys.executable, "-m", "bench", "grpo", "--json", *grpo_files, "--grpo_steps", "3", "--grpo_batch", "2",
           "--grpo_generations", "2", "--grpo_max_new_tokens", "4"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    grpo = json.loads(result.stdout)["grpo"]
    config = grpo["trl"]["config"]
    assert config["loss_type"] == "dapo" and config["top_k"] == 0 and config["top_p"] == 1.0
    assert config["gradient_checkpointing"] is False and config["learning_rate"] == 1e-4 and config["use_cpu"]
    assert config["per_device_train_batch_size"] == 4 and config["num_generations"] == 2
    assert "--learning_rate 0.0001" in grpo["ours"]["config"] and "--num_generations 2" in grpo["ours"]["config"]
    assert "'dapo'" in grpo["trl"]["loss_line"] and "1 thread" in grpo["trl"]["loss_line"]
    for side in ("ours", "trl"):
        r = grpo[side]
        assert r["steps"] == 3 and 0 < r["rollout_s"] < r["step_s"] and r["peak_rss_mib"] > 0, (side, r)
    assert set(grpo["held_out"]) == {"start", "ours", "trl"} and all(0 <= a <= 1 for a in grpo["held_out"].values())
    assert grpo["speedup"] > 0


def test_bench_grpo_without_trl_says_how_to_install_it(grpo_files, tmp_path):
    (tmp_path / "trl").mkdir()  # a trl that fails to import, first on the path
    (tmp_path / "trl" / "__init__.py").write_text("raise ImportError('No module named trl')\n")
    result = subprocess.run([sys.executable, "-m", "bench", "grpo", *grpo_files], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "requirements-bench.txt" in result.stderr
