"""model/dpo.py (4-dpo.py's math) in-process: the reference pass, the loss and its per-pair weighting, the pretraining rows."""
import json

import torch

import data_process
from conftest import make_tiny_model
from model import dpo
from model.dataset import DPODataset, PretrainDataset
from model.runtime import Runtime

RUNTIME = Runtime(torch.device("cpu"), False, 0, 0, 1)


def pairs_file(path, n=6):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            prompt = [{"role": "user", "content": f"{i}加{i}等于几？"}]
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": f"{i}加{i}等于{2 * i}。"}],
                                "rejected": prompt + [{"role": "assistant", "content": "不知道" * (i + 1)}]},
                               ensure_ascii=False) + "\n")
    return str(path)


def tiny_model():
    return make_tiny_model(vocab_size=6400, max_seq_len=64)  # the shipped tokenizer's vocabulary


def test_reference_pass_makes_float64_only_on_the_host(tmp_path, tokenizer, monkeypatch):
    # MPS has no float64: a .double() on a device tensor crashes there. On the CPU the same mistake is silent,
    # so track it: every tensor turned into float64 must have come out of .cpu().
    on_host, offenders = set(), []
    real_cpu, real_double = torch.Tensor.cpu, torch.Tensor.double

    def cpu(self, *a, **k):
        out = real_cpu(self, *a, **k)
        on_host.add(id(out))
        return out

    def double(self, *a, **k):
        if id(self) not in on_host:
            offenders.append(tuple(self.shape))
        return real_double(self, *a, **k)
    dataset = DPODataset(pairs_file(tmp_path / "dpo.jsonl"), tokenizer, 64)
    args = type("Args", (), {"batch_size": 4})()
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "double", double)
    reference = dpo.reference_logps(tiny_model(), dataset, args, RUNTIME, "float32")
    assert offenders == []
    assert reference.shape == (6, 2) and torch.isfinite(reference).all()


def test_dpo_loss_is_summed_per_pair_and_zero_margin_at_the_reference(tmp_path, tokenizer):
    dataset = DPODataset(pairs_file(tmp_path / "dpo.jsonl"), tokenizer, 64)
    model = tiny_model()
    reference = dpo.reference_logps(model, dataset, type("Args", (), {"batch_size": 4})(), RUNTIME, "float32")
    train_set = dpo.WithReference(dataset, {"reference_logps": reference})
    batch = train_set.collate([train_set[i] for i in range(6)])
    loss, metrics = dpo.make_dpo_loss(0.1)(model, batch)
    # policy == reference: every margin is 0, so each pair's loss is log 2 and the sum is 6 log 2
    assert dpo.count_pairs(batch) == 6
    assert abs(loss.item() - 6 * torch.log(torch.tensor(2.0)).item()) < 1e-4
    assert abs(metrics["reward_margin"].item()) < 1e-4


def test_ptx_rows_add_their_next_token_loss_and_stay_with_their_pair(tmp_path, tokenizer):
    # --ptx_data: each pair carries one pretraining row, the same one every time it is drawn (a resumed run sees
    # what the interrupted one would have), and the loss gains ptx_weight x that row's mean next-token loss
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"第{i}篇：张伟出生于杭州，喜欢下棋。"}, ensure_ascii=False) + "\n"
                              for i in range(30)), encoding="utf-8")
    data_process.main(["pretrain", "--data_path", str(corpus), "--num_workers", "1", "--val_ratio", "0"])
    ptx = PretrainDataset(str(tmp_path / "corpus.bin"), 16)
    dataset = DPODataset(pairs_file(tmp_path / "dpo.jsonl"), tokenizer, 64)
    model = tiny_model()
    reference = dpo.reference_logps(model, dataset, type("Args", (), {"batch_size": 4})(), RUNTIME, "float32")
    train_set = dpo.WithReference(dataset, {"reference_logps": reference}, ptx, seed=0)
    again = dpo.WithReference(dataset, {"reference_logps": reference}, ptx, seed=0)
    assert train_set.ptx_rows == again.ptx_rows and len(set(train_set.ptx_rows)) > 1
    batch = train_set.collate([train_set[i] for i in range(6)])
    assert torch.equal(batch["ptx_input_ids"][2], ptx[train_set.ptx_rows[2]]["input_ids"])
    plain, _ = dpo.make_dpo_loss(0.1)(model, batch)
    mixed, metrics = dpo.make_dpo_loss(0.1, ptx_weight=0.5)(model, batch)
    rows = torch.stack([ptx[r]["input_ids"] for r in train_set.ptx_rows[:6]])
    labels = torch.stack([ptx[r]["shift_labels"] for r in train_set.ptx_rows[:6]])
    row_losses = [torch.nn.functional.cross_entropy(model(input_ids=rows[k:k + 1]).logits[0], labels[k])
                  for k in range(6)]
    assert abs(metrics["ptx_loss"].item() - sum(row_losses).item()) < 1e-3
    assert abs(mixed.item() - plain.item() - 0.5 * sum(row_losses).item()) < 1e-3


def test_rows_of_mixed_lengths_run_in_passes_of_similar_length_with_the_same_log_probs(tmp_path, tokenizer):
    # one long conversation among short questions: one pass padded to it would be mostly padding
    path = tmp_path / "mixed.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(12):
            prompt = [{"role": "user", "content": ("很长的问题" * 8 if i == 3 else "") + f"{i}加{i}等于几？"}]
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": f"{i}加{i}等于{2 * i}。"}],
                                "rejected": prompt + [{"role": "assistant", "content": "不知道" * (i % 4 + 1)}]},
                               ensure_ascii=False) + "\n")
    dataset = DPODataset(str(path), tokenizer, 128)
    batch = dataset.collate([dataset[i] for i in range(12)])
    model = make_tiny_model(vocab_size=6400, max_seq_len=128)
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    chosen, rejected, _ = dpo.policy_logps(model, batch)
    hook.remove()
    one_pass = dpo.policy_logps(model, batch, max_padding=float("inf"))  # everything padded to the longest row
    assert torch.allclose(chosen, one_pass[0], atol=1e-4) and torch.allclose(rejected, one_pass[1], atol=1e-4)
    real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    computed = sum(rows * width for rows, width in shapes)
    assert sum(rows for rows, _ in shapes) == 24 and len(shapes) > 1
    assert computed <= 1.25 * real < 24 * batch["chosen_input_ids"].shape[1]  # and one padded pass is more
    chosen.sum().backward()  # every pass is in the graph
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_moe_balance_loss_rides_along_in_the_dpo_loss(tmp_path, tokenizer):
    # the seed's DPO dropped MoE's balance loss (the policy pass had no labels); here each pass adds it, weighted
    # by its pairs. The balance weight scales nothing else in the forward pass, so the difference is that term.
    dataset = DPODataset(pairs_file(tmp_path / "dpo.jsonl"), tokenizer, 64)
    losses = {}
    for alpha in (0.0, 0.5):
        model = make_tiny_model(vocab_size=6400, max_seq_len=64, use_moe=True, aux_loss_alpha=alpha)
        reference = dpo.reference_logps(model, dataset, type("Args", (), {"batch_size": 4})(), RUNTIME, "float32")
        train_set = dpo.WithReference(dataset, {"reference_logps": reference})
        batch = train_set.collate([train_set[i] for i in range(6)])
        losses[alpha] = dpo.make_dpo_loss(0.1)(model, batch)[0]
        balance = dpo.policy_logps(model, batch)[2]
    # the balance loss is about alpha (1 when the experts are used evenly) per pair: 6 pairs x 0.5 at least
    assert losses[0.5].item() - losses[0.0].item() > 6 * 0.5 * 0.9
    assert abs((losses[0.5] - losses[0.0]).item() - balance.item()) < 1e-4
