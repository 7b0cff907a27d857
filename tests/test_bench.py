"""Smoke tests of the benchmark scripts: bench.py and bench_gpu.py run end to end on a tiny config and report
the ratios they promise (the model-level checks they rely on live in tests/test_model.py)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.bench_smoke


def test_bench_smoke_json_on_a_tiny_config():
    cmd = [sys.executable, "bench.py", "--json", "--only", "train,decode,moe,alloc", "--dim", "64", "--n_layers", "2",
           "--n_heads", "4", "--n_kv_heads", "2", "--vocab_size", "300", "--seq_len", "32", "--batch_size", "2",
           "--steps", "2", "--warmup", "1", "--new_tokens", "8", "--decode_rounds", "1", "--no-compile",
           "--bf16", "off", "--peak_n", "256", "--alloc_rounds", "1"]
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
    assert decode["threads_1"]["ours"]["ratio_vs_hf"] > 0 and decode["threads_1"]["floor"]["tok_s"] > 0
    assert report["moe"]["moe_over_dense"] > 0 and report["moe"]["dense_hidden_dim"] == 3 * 192
    alloc = report["alloc"]  # glibc here: both sides ran, each in its own process
    assert alloc["default_tok_s"] > 0 and alloc["keep_tok_s"] > 0 and alloc["keep_speedup"] > 0


def test_bench_smoke_gpu_mfu_script_runs_its_code_path_on_cpu():
    """bench_gpu.py cannot run here without a GPU; its --device cpu mode keeps the script from rotting."""
    cmd = [sys.executable, "bench_gpu.py", "--json", "--device", "cpu", "--dim", "64", "--n_layers", "2",
           "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "32", "--batch_size", "2", "--steps", "1",
           "--warmup", "1", "--no_compile", "--peak_n", "128"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens_per_step"] == 64 and report["achieved_tflops"] > 0
    assert report["fraction_of_measured_matmul"] > 0 and report["mfu_vs_datasheet"] is None


def test_bench_smoke_scripts_do_not_import_each_other():
    for script, other in (("bench.py", "bench_gpu"), ("bench_gpu.py", "bench")):
        source = (ROOT / script).read_text()
        assert f"import {other}\n" not in source and f"from {other} import" not in source, script
