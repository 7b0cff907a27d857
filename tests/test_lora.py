"""LoRA (model/lora.py): only adapters train, the checkpoint holds the adapter and a checked reference to its base,
exact resume, DPO's reference is the base, merged export and eval loading match base + adapter."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model import checkpoint, lora, stages, trainer
from model.LMConfig import LMConfig
from model.model import Transformer
from model.checkpoint import list_checkpoints
from model.runtime import Runtime
from model.errors import StageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "model", "tokenizer")
V = 6400  # the shipped tokenizer's size, so eval and DPO can encode text
RUNTIME = Runtime(torch.device("cpu"), False, 0, 0, 1)


def tiny_config(**kw):
    return LMConfig(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=64), **kw})


def save_base(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**kw))
    with torch.no_grad():  # non-trivial norms, so a norm that trains by mistake would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    checkpoint.copy_tokenizer(TOKENIZER, str(path))
    return str(path)


class Counting(torch.utils.data.Dataset):
    """Rows counting upwards from a random start: learnable in a few steps."""

    def __init__(self, n=128, length=17, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = (torch.randint(0, 60, (n, 1), generator=g) + torch.arange(length)) % 60 + 3

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i, :-1], "shift_labels": self.rows[i, 1:]}


def make_args(out_dir, *extra):
    parser = argparse.ArgumentParser()
    trainer.add_training_args(parser)
    trainer.add_model_args(parser)
    lora.add_lora_args(parser)
    return parser.parse_args(["--batch_size", "8", "--learning_rate", "1e-2", "--warmup_iters", "2",
                              "--log_interval", "5", "--save_interval", "5", "--eval_interval", "0",
                              "--dtype", "float32", "--device", "cpu", "--lora_rank", "4",
                              "--out_dir", str(out_dir)] + list(extra))


def lora_model(base_dir, args, dropout=None):
    overrides = {} if dropout is None else {"dropout": dropout}
    return lora.maybe_wrap(checkpoint.load_init_model(base_dir, overrides), args, base_dir)


def train(base_dir, out_dir, *extra, loss_fn=trainer.lm_loss, dropout=None):
    args = make_args(out_dir, *extra)
    model = lora_model(base_dir, args, dropout)
    torch.manual_seed(0)  # the dropout stream of a fresh run (a resumed one gets its own back from the checkpoint)
    return trainer.fit(model, Counting(), None, loss_fn, args, RUNTIME, str(out_dir))


def perturbed(model, seed=1):
    """Non-zero B matrices (fresh adapters are exactly the identity), so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def base(tmp_path):
    return save_base(tmp_path / "base")


def test_only_adapters_train_and_the_checkpoint_holds_only_the_adapter(base, tmp_path, capsys):
    model = train(base, tmp_path / "run", "--max_steps", "10")
    out = capsys.readouterr().out
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert f"training {n_lora:,} of" in out
    saved = load_file(os.path.join(base, "model.safetensors"))
    state = model.get_base_model().state_dict()
    base_state = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert all(torch.equal(saved[k], base_state[k]) for k in saved)  # bitwise: the base never moved
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    run = tmp_path / "run"
    for where in (run, run / "step_000010"):
        assert not (where / "model.safetensors").exists()
        for name in ("adapter_config.json", "adapter_model.safetensors", "lora_base.json", "config.json"):
            assert (where / name).exists(), (where, name)
    adapter = load_file(run / "adapter_model.safetensors")
    assert sum(v.numel() for v in adapter.values()) == n_lora
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it learned something
    reference = json.load(open(run / "lora_base.json"))
    assert reference["base_sha256"] == lora.file_sha256(os.path.join(base, "model.safetensors"))
    assert stages.find_run("run", root=str(tmp_path)) is None and lora.is_adapter_dir(str(run))
    os.rename(run, tmp_path / "sft_single_32")  # the next stage finds an adapter run as it finds a full one
    assert stages.find_run("sft_single", 32, root=str(tmp_path)) == str(tmp_path / "sft_single_32")


def test_disabled_adapters_give_the_base_logits_exactly(base, tmp_path):
    model = perturbed(lora_model(base, make_args(tmp_path))).eval()
    plain = Transformer.from_pretrained(base).eval()
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(x).logits, plain(x).logits)
        assert not torch.allclose(model(x).logits, plain(x).logits)


def test_merged_export_matches_base_plus_adapter(base, tmp_path):
    from transformers import AutoModelForCausalLM
    model = perturbed(lora_model(base, make_args(tmp_path))).eval()
    lora.save_adapter(model, str(tmp_path / "adapter"))
    result = subprocess.run([sys.executable, "export_model.py", "--checkpoint", str(tmp_path / "adapter"),
                             "--out_dir", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert (exported(x).logits - model(x).logits).abs().max().item() <= 1e-4


class Crash(Exception):
    pass


def test_resume_after_crash_is_bitwise_equal_to_uninterrupted(base, tmp_path):
    common = ["--max_steps", "20", "--accumulation_steps", "2", "--lora_dropout", "0.1"]
    train(base, tmp_path / "a", *common, dropout=0.1)
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 12 + 1:  # in step 13, after the step-10 save
            raise Crash()
        return trainer.lm_loss(model, batch)
    with pytest.raises(Crash):
        train(base, tmp_path / "b", *common, loss_fn=crashing, dropout=0.1)
    assert os.path.basename(list_checkpoints(str(tmp_path / "b"))[-1]) == "step_000010"
    train(base, tmp_path / "b", *common, "--resume", dropout=0.1)
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a resume with other LoRA settings is refused, and so is a full run resuming a LoRA one
    with pytest.raises(StageError, match="LoRA settings changed"):
        train(base, tmp_path / "b", *common, "--resume", "--lora_rank", "8", "--max_steps", "25")
    args = make_args(tmp_path / "b", *common, "--resume", "--max_steps", "25")
    with pytest.raises(StageError, match="holds a LoRA adapter but this run is a full fine-tune"):
        trainer.fit(Transformer.from_pretrained(base), Counting(), None, trainer.lm_loss, args, RUNTIME,
                    str(tmp_path / "b"))


def test_a_changed_or_reshaped_base_is_refused(base, tmp_path):
    from model import evaluate
    model = perturbed(lora_model(base, make_args(tmp_path)))
    lora.save_adapter(model, str(tmp_path / "adapter"))
    evaluate.load_checkpoint(str(tmp_path / "adapter"), device="cpu")  # fine as saved
    save_base(base, seed=5)  # same shape, other weights
    with pytest.raises(StageError, match=r"changed since adapter .* was trained on it \(weights sha256"):
        evaluate.load_checkpoint(str(tmp_path / "adapter"), device="cpu")
    shutil.rmtree(base)
    save_base(base, dim=64)
    with pytest.raises(StageError, match="trained on a base with dim=32, but its base .* has dim=64"):
        checkpoint.load_init_model(str(tmp_path / "adapter"), {})
    shutil.rmtree(base)
    save_base(base, vocab_size=V + 64)
    with pytest.raises(StageError, match="vocab_size=6400"):
        checkpoint.load_init_model(str(tmp_path / "adapter"), {})
    shutil.rmtree(base)
    with pytest.raises(StageError, match="is gone"):
        checkpoint.load_init_model(str(tmp_path / "adapter"), {})


def test_eval_of_an_adapter_dir_equals_the_merged_model(base, tmp_path):
    from model import chat, evaluate, generate
    model = perturbed(lora_model(base, make_args(tmp_path)), seed=3).eval()
    lora.save_adapter(model, str(tmp_path / "adapter"))
    checkpoint.copy_tokenizer(TOKENIZER, str(tmp_path / "adapter"))
    loaded, tokenizer, path = evaluate.load_checkpoint(str(tmp_path / "adapter"), device="cpu")
    assert path == str(tmp_path / "adapter") and type(loaded) is Transformer
    merged = model.merge_and_unload().eval()
    prompts = [chat.encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in ("你好", "1+1=?", "谁?")]
    ours = generate.generate_batch(loaded, tokenizer, prompts, max_new_tokens=12, stop_at_newline=False)
    theirs = generate.generate_batch(merged, tokenizer, prompts, max_new_tokens=12, stop_at_newline=False)
    assert ours == theirs


def test_lora_on_a_lora_run_merges_the_chain(base, tmp_path):
    """LoRA DPO on LoRA SFT: the first adapter is merged into its base, the second trains on that."""
    first = perturbed(lora_model(base, make_args(tmp_path)), seed=1)
    lora.save_adapter(first, str(tmp_path / "sft"))
    second = perturbed(lora_model(str(tmp_path / "sft"), make_args(tmp_path)), seed=2).eval()
    lora.save_adapter(second, str(tmp_path / "dpo"))
    x = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        expected = second(x).logits
        with second.disable_adapter():  # the reference of the second stage is the first, merged (rounding only)
            assert torch.allclose(second(x).logits, first.eval()(x).logits, atol=1e-5)
        merged = checkpoint.load_init_model(str(tmp_path / "dpo"), {})
        assert torch.allclose(merged.eval()(x).logits, expected, atol=1e-5)
    assert type(merged) is Transformer and all(p.requires_grad for p in merged.parameters())  # full training works
    # the first link is checked too
    save_base(base, seed=7)
    with pytest.raises(StageError, match="changed since"):
        checkpoint.load_init_model(str(tmp_path / "dpo"), {})


def write_dpo_data(path, n=12):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            question = [{"role": "user", "content": f"{i}+{i}等于几?"}]
            f.write(json.dumps({"chosen": question + [{"role": "assistant", "content": f"{2 * i}"}],
                                "rejected": question + [{"role": "assistant", "content": f"{2 * i + 1}。"}]},
                               ensure_ascii=False) + "\n")


def test_dpo_reference_with_lora_is_the_base(base, tmp_path, tokenizer):
    from model import dpo
    from model.dataset import DPODataset
    write_dpo_data(tmp_path / "dpo.jsonl")
    dataset = DPODataset(str(tmp_path / "dpo.jsonl"), tokenizer, 64)
    args = make_args(tmp_path, "--batch_size", "4")
    model = perturbed(lora_model(base, args))  # as if trained: the adapter must not leak into the reference
    reference = dpo.reference_logps(model, dataset, args, RUNTIME, "float32")
    plain = Transformer.from_pretrained(base).eval()
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        chosen, rejected, _ = dpo.policy_logps(plain, batch)
    assert torch.allclose(reference, torch.stack([chosen, rejected], 1).float(), atol=1e-5)
    assert model.training  # reference_logps hands the model back in training mode
    with torch.no_grad():
        assert not torch.allclose(dpo.policy_logps(model.eval(), batch)[0], chosen, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# the stage scripts (subprocesses)

TRAIN = ["--dtype", "float32", "--device", "cpu", "--log_interval", "1", "--eval_interval", "0",
         "--warmup_iters", "2", "--batch_size", "4", "--learning_rate", "3e-3"]
LORA = ["--lora_rank", "4"]


def write_sft_data(path, n=64):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"{i}加{i + 1}是多少?"},
                                                  {"role": "assistant", "content": f"是{2 * i + 1}。"}]},
                               ensure_ascii=False) + "\n")


@pytest.mark.slow
def test_lora_stages_sigkill_resume_and_chain(tmp_path):
    from tests.test_stages import stage as script, wait_for_step  # the stage-running helper, one place
    save_base(tmp_path / "out" / "pretrain_32")
    write_sft_data(tmp_path / "sft.jsonl")
    write_dpo_data(tmp_path / "dpo.jsonl", n=16)
    args = ["--data_path", "sft.jsonl", "--max_steps", "30", "--save_interval", "10", "--dropout", "0.1",
            "--lora_dropout", "0.1", *TRAIN, *LORA]
    result = script(tmp_path, "3-full_sft.py", *args, "--out_dir", "out/full")
    assert "starting from out/pretrain_32" in result.stdout and "training " in result.stdout
    run = script(tmp_path, "3-full_sft.py", *args, "--out_dir", "out/killed", stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    wait_for_step(str(tmp_path / "out/killed"), 14, run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    result = script(tmp_path, "3-full_sft.py", *args, "--out_dir", "out/killed", "--resume")
    assert "resumed from out/killed/step_0000" in result.stdout
    assert lora.file_sha256(tmp_path / "out/full/adapter_model.safetensors") == \
        lora.file_sha256(tmp_path / "out/killed/adapter_model.safetensors")

    # the default output dir, then LoRA DPO finds the LoRA SFT run; eval takes the DPO adapter
    script(tmp_path, "3-full_sft.py", "--data_path", "sft.jsonl", "--max_steps", "5", *TRAIN, *LORA)
    result = script(tmp_path, "4-dpo.py", "--data_path", "dpo.jsonl", "--max_steps", "4", *TRAIN, *LORA)
    assert "starting from out/sft_single_32" in result.stdout
    rows = [json.loads(line) for line in open(tmp_path / "out/dpo_32/metrics.jsonl")]
    assert abs([r for r in rows if "reward_margin" in r][0]["reward_margin"]) < 1e-3  # reference == start
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n", encoding="utf-8")
    result = script(tmp_path, "2-eval.py", "--checkpoint", "out/dpo_32", "--device", "cpu", "--prompts",
                    str(prompts), "--max_new_tokens", "4")
    # a full DPO run from the LoRA SFT run trains the merged model
    script(tmp_path, "4-dpo.py", "--data_path", "dpo.jsonl", "--max_steps", "2", "--out_dir", "out/dpo_full", *TRAIN)
    assert (tmp_path / "out/dpo_full/model.safetensors").exists()


def test_freeze_embeddings_trains_everything_but_the_tied_embedding(base, tmp_path):
    model = train(base, tmp_path / "run", "--max_steps", "6", "--lora_rank", "0", "--freeze_embeddings")
    saved = load_file(os.path.join(base, "model.safetensors"))
    state = model.state_dict()
    assert torch.equal(saved["tok_embeddings.weight"], state["tok_embeddings.weight"])  # bitwise unchanged
    assert model.output.weight is model.tok_embeddings.weight  # still tied: the output layer did not move either
    moved = [k for k in saved if k != "tok_embeddings.weight" and not torch.equal(saved[k], state[k])]
    assert "layers.0.attention.wq.weight" in moved and "layers.1.feed_forward.w2.weight" in moved
    # resuming with another set of trainable parameters is refused in one line (not a torch optimizer error)
    with pytest.raises(StageError, match="trainable_params"):
        train(base, tmp_path / "run", "--max_steps", "8", "--lora_rank", "0", "--resume")
