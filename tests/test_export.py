"""export_model.py: a dense checkpoint becomes a plain LlamaForCausalLM with the same logits."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from model.LMConfig import LMConfig
from model.model import Transformer

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_export(checkpoint, out_dir):
    return subprocess.run([sys.executable, "export_model.py", "--checkpoint", str(checkpoint), "--out_dir",
                           str(out_dir)], cwd=ROOT, capture_output=True, text=True)


def test_exported_llama_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64, rope_theta=5e5)
    model = Transformer(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm mapping would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "ckpt")
    result = run_export(tmp_path / "ckpt", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported) is LlamaForCausalLM
    assert not (tmp_path / "hf" / "configuration_nanollm.py").exists()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        diff = (exported(x).logits - model(x).logits).abs().max().item()
    assert diff <= 1e-4
    # generation through the exported model matches ours token for token
    with torch.no_grad():
        ours = model.generate(x[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
        theirs = exported.generate(x[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_llama_state_dict_has_exactly_llamas_names():
    from model.llama import llama_config, llama_state_dict
    model = Transformer(LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300))
    with torch.device("meta"):
        theirs = LlamaForCausalLM(llama_config(model.config)).state_dict()
    ours = llama_state_dict(model)
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: stored once, as the embedding
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_moe_export_is_refused_clearly(tmp_path):
    config = LMConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, use_moe=True)
    Transformer(config).save_pretrained(tmp_path / "moe")
    result = run_export(tmp_path / "moe", tmp_path / "hf")
    assert result.returncode != 0
    assert "MoE" in result.stderr and "not supported yet" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_of_missing_checkpoint_is_one_line(tmp_path):
    result = run_export(tmp_path / "nope", tmp_path / "hf")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "nope" in result.stderr
