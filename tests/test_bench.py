"""bench.py reports the ratios it promises; the fast paths it times give the reference's results."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from model import LMConfig, Transformer
from model.generate import generate_stream
from model.model import apply_rope, rope_cos_sin

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64)
    return Transformer(LMConfig(**{**kwargs, **overrides}))


def test_bench_json_on_a_tiny_config():
    cmd = [sys.executable, "bench.py", "--json", "--only", "train,decode,moe", "--dim", "64", "--n_layers", "2",
           "--n_heads", "4", "--n_kv_heads", "2", "--vocab_size", "300", "--seq_len", "32", "--batch_size", "2",
           "--steps", "2", "--warmup", "1", "--new_tokens", "8", "--decode_rounds", "1", "--no-compile",
           "--bf16", "off", "--peak_n", "256"]
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


def test_gpu_mfu_script_runs_its_code_path_on_cpu():
    """bench_gpu.py cannot run here without a GPU; its --device cpu mode keeps the script from rotting."""
    cmd = [sys.executable, "bench_gpu.py", "--json", "--device", "cpu", "--dim", "64", "--n_layers", "2",
           "--n_heads", "4", "--n_kv_heads", "2", "--seq_len", "32", "--batch_size", "2", "--steps", "1",
           "--warmup", "1", "--no_compile", "--peak_n", "128"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens_per_step"] == 64 and report["achieved_tflops"] > 0
    assert report["fraction_of_measured_matmul"] > 0 and report["mfu_vs_datasheet"] is None


def test_rope_roll_is_llamas_rotate_half_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)  # (B, heads, T, head_dim), Llama's layout
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    cos, signed_sin = rope_cos_sin(position_ids, 16, 10000.0, torch.float32)
    sin = torch.cat((-signed_sin[..., :8], signed_sin[..., 8:]), dim=-1)  # back to the plain sin table
    theirs_q, theirs_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q.transpose(1, 2), cos, signed_sin).transpose(1, 2), theirs_q)
    assert torch.equal(apply_rope(k.transpose(1, 2), cos, signed_sin).transpose(1, 2), theirs_k)


def test_configure_optimizer_groups_and_fused_steps_match_plain_adamw():
    model, reference = tiny_model(), tiny_model()
    optimizer = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert optimizer.defaults["fused"] and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "tok_embeddings" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight"}
    plain = torch.optim.AdamW([{"params": [dict(reference.named_parameters())[names[id(p)]] for p in g["params"]],
                                "weight_decay": g["weight_decay"]} for g in (decay, no_decay)],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, 300, (2, 16))
    for _ in range(3):
        for m, opt in ((model, optimizer), (reference, plain)):
            m(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_generate_stream_repetition_penalty_matches_transformers():
    """The preallocated token buffer feeds the penalty exactly what transformers' generate sees."""
    model = tiny_model().eval()
    from export_model import to_llama
    llama: LlamaForCausalLM = to_llama(model).eval()
    prompt = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        theirs = llama.generate(prompt, max_new_tokens=15, do_sample=False, repetition_penalty=10.0,
                                eos_token_id=None, pad_token_id=0)[0, 6:]
        ours = torch.stack(list(generate_stream(model, prompt, max_new_tokens=15, temperature=0,
                                                repetition_penalty=10.0)), dim=1)[0]
    assert torch.equal(ours, theirs)
    assert len(set(ours.tolist())) > 10  # without the penalty this model repeats one token 15 times
