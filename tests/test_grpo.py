"""model/grpo.py: GRPO's math against values computed by hand, and its sampling (the distribution the loss scores,
seeded per prompt, one prefill per prompt, the end-of-turn token trained, truncated completions masked or
penalised)."""
import math
from types import SimpleNamespace

import pytest
import torch

from model.grpo import (STAT_NAMES, RolloutBatches, clipped_objective, completion_logits, group_advantages,
                        make_grpo_loss, sample_groups, token_logps)
from model.LMConfig import LMConfig
from model.rewards import parse_rewards
from model.runtime import Runtime
from tests.conftest import make_tiny_model


# ----------------------------------------------------------------------------------------------------------
# the math, by hand

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    advantages, flat = group_advantages(rewards, 4, scale=False)
    assert advantages.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert flat.tolist() == [False, True]
    scaled, _ = group_advantages(rewards, 4, scale=True)
    std = math.sqrt((4 * 0.25) / 3)  # Bessel-corrected, as TRL's
    assert scaled[:4].tolist() == pytest.approx([a / (std + 1e-4) for a in (0.5, -0.5, -0.5, 0.5)], rel=1e-6)
    assert scaled[4:].tolist() == [0.0] * 4  # equal rewards: exactly zero, not 0/eps noise
    # a group of 0.1s: the float mean is not exactly 0.1, the advantage still is exactly 0
    assert group_advantages(torch.full((8,), 0.1), 8)[0].abs().max().item() == 0.0


def test_clipped_objective_by_hand():
    old = torch.zeros(3, 1)
    logps = torch.log(torch.tensor([[1.5], [0.5], [1.1]])).requires_grad_(True)  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([1.0, -1.0, 2.0])
    mask = torch.ones(3, 1)
    loss, clipped, kl = clipped_objective(logps, old, advantages, mask, 0.2, 0.2)
    # min(1.5, 1.2) * 1 -> -1.2 (clipped); min(-0.5, -0.8) -> +0.8 (clipped); min(2.2, 2.2) -> -2.2
    assert loss.item() == pytest.approx(-1.2 + 0.8 - 2.2)
    assert clipped.item() == 2 and kl.item() == 0
    loss.backward()
    # a clipped token has no gradient; the free one has d(-ratio * A)/d logp = -ratio * A
    assert logps.grad.flatten().tolist() == pytest.approx([0.0, 0.0, -1.1 * 2.0])
    # DAPO's clip-higher: the upper bound at 1 + 0.6 leaves the first token free
    loss, clipped, _ = clipped_objective(logps.detach(), old, advantages, mask, 0.2, 0.6)
    assert loss.item() == pytest.approx(-1.5 + 0.8 - 2.2) and clipped.item() == 1
    # the mask weighs tokens: a masked token adds nothing
    loss, clipped, _ = clipped_objective(logps.detach(), old, advantages, torch.tensor([[0.0], [1.0], [1.0]]), 0.2, 0.2)
    assert loss.item() == pytest.approx(0.8 - 2.2) and clipped.item() == 1


def test_k3_kl_by_hand():
    logps = torch.log(torch.tensor([[0.25, 0.5]]))
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    loss, _, kl = clipped_objective(logps, logps, torch.zeros(1), torch.ones(1, 2), 0.2, 0.2, ref, beta=0.1)
    k3 = 2 - math.log(2) - 1  # exp(d) - d - 1 with d = log(0.5 / 0.25); 0 for the equal token
    assert kl.item() == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3)  # advantage 0: only the KL term


def grpo_batch(model, advantages, width=3, prompt=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = len(advantages)
    input_ids = torch.randint(3, 64, (n, prompt + width), generator=generator)
    completion = input_ids[:, prompt:]
    with torch.no_grad():
        logits = model(input_ids=input_ids, logits_to_keep=width + 1).logits[:, :-1]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_ids": completion,
            "completion_mask": torch.ones(n, width), "old_logps": token_logps(logits, completion, 1.0)[0],
            "advantages": advantages, "stats": torch.zeros(len(STAT_NAMES))}


def test_a_group_with_equal_rewards_gives_zero_gradient():
    model = make_tiny_model()
    loss_fn = make_grpo_loss(1.0, 0.2, 0.2, 0.0, STAT_NAMES)
    advantages, flat = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), 4)
    assert flat.all()
    loss, _ = loss_fn(model, grpo_batch(model, advantages))
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max().item() == 0 for p in model.parameters())
    model.zero_grad()
    loss, metrics = loss_fn(model, grpo_batch(model, group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)[0]))
    loss.backward()
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 0
    assert metrics["clipped"].item() == 0  # the weights that sampled: ratio 1, nothing clipped


@pytest.mark.parametrize("use_moe", [False, True])
def test_each_prompt_runs_once_in_the_loss_with_the_logits_and_gradient_of_full_rows(use_moe):
    # two prompts of different lengths (left-padded), 3 completions each, one ended early (padding after it)
    model = make_tiny_model(seed=3, vocab_size=64, use_moe=use_moe)
    G, width = 3, 4
    prompts = torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
    prompt_mask = (prompts != 0).long()
    completion = torch.randint(3, 64, (2 * G, width), generator=torch.Generator().manual_seed(0))
    completion_mask = torch.ones(2 * G, width, dtype=torch.long)
    completion[1, 2:], completion_mask[1, 3:] = 0, 0
    batch = {"input_ids": torch.cat([prompts.repeat_interleave(G, 0), completion], 1),
             "attention_mask": torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask], 1),
             "completion_ids": completion, "group_size": torch.tensor(G)}
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    weights = torch.randn(2 * G, width)

    def score(logits):
        model.zero_grad()
        (token_logps(logits, completion, 1.0)[0] * completion_mask * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    logits, aux = completion_logits(model, batch)
    assert calls == [(2, 5), (2 * G, width - 1)]  # the prompts once, then the completions after them
    assert (aux is not None) == use_moe
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 logits_to_keep=width + 1).logits[:, :-1]
    real = completion_mask.bool()
    assert torch.allclose(logits[real], full[real], atol=1e-5)
    shared_grads, full_grads = score(logits), score(full)
    assert len(shared_grads) == len(full_grads)
    for shared, reference in zip(shared_grads, full_grads):
        assert torch.allclose(shared, reference, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# sampling

class FixedLogits(torch.nn.Module):
    """A stand-in model: the same logits for every row (eos forced first for the prompts listed in ends_at_once,
    never otherwise), and a record of every forward's input width."""

    def __init__(self, logits, eos_id, ends_at_once=()):
        super().__init__()
        self.config = LMConfig(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=len(logits))
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits, self.eos_id, self.ends_at_once, self.calls = logits, eos_id, set(ends_at_once), []

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0):
        rows, width = input_ids.shape
        self.calls.append((rows, width))
        logits = self.logits.expand(rows, 1, -1).clone()
        logits[:, :, self.eos_id] = -1e9
        if width > 1:  # the prefill: one row per prompt
            for i in self.ends_at_once:
                logits[i, :, self.eos_id] = 1e9
        return SimpleNamespace(logits=logits)


def test_sampling_draws_from_softmax_over_temperature_without_truncation():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, -9.0])  # the last: the eos token, never drawn here
    model = FixedLogits(logits, eos_id=5)
    out = sample_groups(model, [[1, 2, 3]], 4000, 1, 2.0, eos_id=5, pad_id=0, seeds=[7])
    counts = torch.bincount(out["completion_ids"][:, 0], minlength=6).float() / 4000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, -1e9]) / 2.0, dim=0)
    assert (counts - expected).abs().max().item() < 0.025
    assert counts[4].item() > 0.02  # an unlikely token is still drawn: no top-k / top-p cut
    # the recorded log-probs are those of that distribution
    assert torch.allclose(out["old_logps"][:, 0], expected.log()[out["completion_ids"][:, 0]], atol=1e-5)


def test_each_prompt_is_prefilled_once_and_its_samples_share_it():
    model = FixedLogits(torch.zeros(6), eos_id=5)
    sample_groups(model, [[1, 2, 3], [4, 5]], 3, 4, 1.0, eos_id=5, pad_id=0, seeds=[1, 2])
    assert model.calls[0] == (2, 3)                   # one prefill: two prompts, left-padded to 3
    assert all(call == (6, 1) for call in model.calls[1:]) and len(model.calls) == 4  # 2 x 3 rows, a token each


def assert_logps_of_a_fresh_forward(model, rollout):
    """The log-probs sample_groups recorded equal those of one forward of prompt + completion."""
    width = rollout["completion_ids"].shape[1]
    logits = model(input_ids=torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], 1),
                   attention_mask=torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], 1),
                   logits_to_keep=width + 1).logits[:, :-1]
    fresh = token_logps(logits, rollout["completion_ids"], 1.0)[0] * rollout["completion_mask"]
    assert torch.allclose(fresh, rollout["old_logps"], atol=1e-5)


def test_seeded_samples_are_reproducible_and_independent_of_the_batch():
    model = make_tiny_model(seed=1, vocab_size=64).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    a = sample_groups(model, prompts, 4, 6, 1.0, eos_id=2, pad_id=0, seeds=[11, 12])
    b = sample_groups(model, prompts, 4, 6, 1.0, eos_id=2, pad_id=0, seeds=[11, 12])
    assert torch.equal(a["completion_ids"], b["completion_ids"]) and torch.equal(a["old_logps"], b["old_logps"])
    alone = sample_groups(model, prompts[1:], 4, 6, 1.0, eos_id=2, pad_id=0, seeds=[12])
    assert torch.equal(alone["completion_ids"], a["completion_ids"][4:, :alone["completion_ids"].shape[1]])
    other = sample_groups(model, prompts, 4, 6, 1.0, eos_id=2, pad_id=0, seeds=[11, 99])
    assert not torch.equal(other["completion_ids"][4:], a["completion_ids"][4:])
    # the recorded log-probs are the ones a fresh forward of prompt + completion gives (the loss's ratio starts at 1)
    assert_logps_of_a_fresh_forward(model, a)


def test_finished_rows_leave_the_batch_and_the_others_decode_as_a_fresh_forward_scores_them():
    # 8 tokens, the end-of-turn among them: rows end at different steps, so the batch shrinks while others go on
    model = make_tiny_model(seed=2, vocab_size=8).eval()
    rows = []  # the rows of each forward pass: the prefill, then one per decoded token
    hook = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    out = sample_groups(model, [[5, 6, 7, 3], [4, 5]], 8, 10, 1.0, eos_id=2, pad_id=0, seeds=[3, 4])
    hook.remove()
    decode_rows = rows[1:]
    assert decode_rows[0] == 16 and min(decode_rows) < 16  # some rows left the batch
    assert decode_rows == sorted(decode_rows, reverse=True)
    ends = out["completion_mask"].sum(dim=1)
    assert len(set(ends.tolist())) > 2 and out["finished"].any() and (ends < out["completion_ids"].shape[1]).any()
    # every row still decoded from its own keys/values: its recorded log-probs are a fresh forward's
    assert_logps_of_a_fresh_forward(model, out)


class Prompts:
    """What RolloutBatches reads of a PromptDataset."""

    def __init__(self, n):
        self.ids = [[5, 6, 7]] * n
        self.records = [{"conversations": [{"role": "user", "content": "?"}], "answer": "7"}] * n
        self.where = [f"p.jsonl:{i + 1}" for i in range(n)]


def rollout_args(**overrides):
    args = dict(num_generations=4, max_new_tokens=3, temperature=1.0, seed=0, truncated="mask",
                truncated_reward=-1.0, scale_rewards=True, beta=0.0, num_iterations=1)
    return SimpleNamespace(**{**args, **overrides})


@pytest.mark.parametrize("mode", ["mask", "penalize"])
def test_end_of_turn_gets_gradient_and_truncated_completions_are_masked_or_penalised(tokenizer, mode):
    eos = tokenizer.eos_token_id
    model = FixedLogits(torch.zeros(len(tokenizer)), eos_id=eos, ends_at_once=[0])  # prompt 0 ends at once
    runtime = Runtime(torch.device("cpu"), False, 0, 0, 1)
    hook = RolloutBatches(model, Prompts(2), tokenizer, parse_rewards("accuracy"), rollout_args(truncated=mode),
                          runtime, "float32", {})
    batch = hook(0, [{"index": torch.tensor([0, 1])}], 0)[0]
    stats = dict(zip(STAT_NAMES, batch["stats"].tolist()))
    assert stats["truncated/n_completions"] == 4 and stats["n_completions"] == 8
    assert batch["completion_ids"][:4, 0].tolist() == [eos] * 4
    if mode == "mask":  # the finished ones' </s> is a target; a cut-off completion is no target at all
        assert batch["completion_mask"][:4].tolist() == [[1.0, 0.0, 0.0]] * 4
        assert batch["completion_mask"][4:].sum().item() == 0
        assert stats["reward/n_completions"] == 0.0
    else:  # penalised: trained, with the penalty as its reward (below the finished ones' 0)
        assert batch["completion_mask"][4:].sum().item() == 12
        assert stats["reward/n_completions"] == -4.0
        assert batch["advantages"][4:].tolist() == [0.0] * 4  # equal within their group


# ----------------------------------------------------------------------------------------------------------
# the stage, as users run it: 5-grpo.py in a subprocess

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from tests.test_stages import stage, wait_for_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dtype", "float32", "--device", "cpu", "--log_interval", "1", "--warmup_iters", "0", "--min_lr_ratio", "1",
        "--max_new_tokens", "4", "--num_generations", "4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A tiny chat model that answers "说一个数字。" with one digit and </s> (a few steps of SFT in this process),
    and prompts whose reward is the digit 7: a task GRPO can learn in seconds."""
    from model.chat import DEFAULT_TOKENIZER_DIR, ChatEncoder, load_tokenizer
    from model.checkpoint import copy_tokenizer
    work = tmp_path_factory.mktemp("grpo")
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER_DIR, 6400)
    model = make_tiny_model(vocab_size=6400, max_seq_len=64, dropout=0.0)
    encoder = ChatEncoder(tokenizer, 64)
    question = {"role": "user", "content": "说一个数字。"}
    rows = [encoder.encode([question, {"role": "assistant", "content": str(d)}]) for d in range(10)]
    input_ids, labels = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(work / "digit")
    copy_tokenizer(DEFAULT_TOKENIZER_DIR, str(work / "digit"))
    with open(work / "seven.jsonl", "w", encoding="utf-8") as f:
        for _ in range(32):
            f.write(json.dumps({"conversations": [{"role": "user", "content": "说一个数字。"}], "answer": "7"},
                               ensure_ascii=False) + "\n")
    return work


def grpo(work, out, *args, torchrun=0, check=True, script=None, **popen):
    """5-grpo.py (or script, an absolute path) from the digit model on seven.jsonl, run as test_stages runs stages."""
    return stage(work, script or "5-grpo.py", "--init_from", "digit", "--data_path", "seven.jsonl", "--out_dir", out,
                 *FAST, *args, torchrun=torchrun, check=check, **popen)


def rows(work, out):
    with open(work / out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if "reward" in line]


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_grpo_raises_the_reward_on_a_toy_task(digits):
    grpo(digits, "out/learn", "--max_steps", "20", "--batch_size", "4", "--learning_rate", "3e-3")
    rewards = [r["reward"] for r in rows(digits, "out/learn")]
    assert sum(rewards[:5]) / 5 < 0.35 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    last = rows(digits, "out/learn")[-1]
    for key in ("reward", "reward_std", "accuracy", "pass@G", "kl", "clipped", "entropy", "length", "truncated",
                "repeated_ngrams", "zero_signal", "rollout_s", "step_s"):
        assert key in last, key
    assert last["accuracy"] == last["reward"] and 1.9 <= last["length"] <= 2.1  # a digit and </s>
    assert (digits / "out/learn/reward.png").exists() and (digits / "out/learn/loss.png").exists()


@pytest.mark.slow
def test_rollouts_are_seeded_and_a_resume_between_iterations_continues_bitwise(digits):
    # --num_iterations 2: steps 1-2 train on one batch of rollouts, 3-4 on the next, ...; the clip acts on the second
    args = ["--batch_size", "4", "--learning_rate", "3e-3", "--num_iterations", "2", "--save_interval", "100"]
    grpo(digits, "out/seeded_a", *args, "--max_steps", "10")
    grpo(digits, "out/seeded_b", *args, "--max_steps", "10")
    assert sha256(digits / "out/seeded_a/model.safetensors") == sha256(digits / "out/seeded_b/model.safetensors")
    a, b = rows(digits, "out/seeded_a"), rows(digits, "out/seeded_b")
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert [r["clipped"] for r in a][0] == 0 and max(r["clipped"] for r in a[1::2]) > 0  # old log-probs recorded
    # stopped after step 5, between the two updates of step 5-6's rollouts: the checkpoint carries them
    grpo(digits, "out/seeded_c", *args, "--max_steps", "5")
    state = torch.load(digits / "out/seeded_c/step_000005/training_state.pt", weights_only=True)
    assert int(state["extra"]["rollouts.step"]) == 4
    result = grpo(digits, "out/seeded_c", *args, "--max_steps", "10", "--resume")
    assert "resumed from out/seeded_c/step_000005" in result.stdout
    assert sha256(digits / "out/seeded_a/model.safetensors") == sha256(digits / "out/seeded_c/model.safetensors")


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal_to_the_uninterrupted_run(digits):
    args = ["--batch_size", "4", "--learning_rate", "3e-3", "--num_iterations", "2", "--max_steps", "16",
            "--save_interval", "3"]
    grpo(digits, "out/whole", *args)
    run = grpo(digits, "out/killed", *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(digits / "out/killed", 4, run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    result = grpo(digits, "out/killed", *args, "--resume")
    assert "resumed from out/killed/step_0000" in result.stdout
    assert sha256(digits / "out/whole/model.safetensors") == sha256(digits / "out/killed/model.safetensors")


def test_lora_with_a_kl_to_the_adapters_off_and_a_full_model_with_a_frozen_reference_and_replay(digits):
    grpo(digits, "out/lora", "--max_steps", "3", "--batch_size", "2", "--learning_rate", "1e-2", "--lora_rank", "4",
         "--beta", "0.1")
    kl = [r["kl"] for r in rows(digits, "out/lora")]
    assert kl[0] == 0 and kl[-1] > 0  # the adapters start at zero: the policy is the reference, then moves
    assert (digits / "out/lora/adapter_model.safetensors").exists()
    replay = {"conversations": [{"role": "user", "content": "说一个数字。"}, {"role": "assistant", "content": "3"}]}
    (digits / "replay.jsonl").write_text(json.dumps(replay, ensure_ascii=False) + "\n", encoding="utf-8")
    pair = {"chosen": replay["conversations"], "rejected": replay["conversations"][:1] + [
        {"role": "assistant", "content": "我不知道。"}]}
    (digits / "pairs.jsonl").write_text(json.dumps(pair, ensure_ascii=False) + "\n", encoding="utf-8")
    grpo(digits, "out/full_kl", "--max_steps", "3", "--batch_size", "2", "--learning_rate", "1e-2", "--beta", "0.1",
         "--freeze_embeddings", "--replay_data", "replay.jsonl", "pairs.jsonl")
    kl = [r["kl"] for r in rows(digits, "out/full_kl")]
    assert kl[0] < 1e-6 and kl[-1] > 0
    # the replayed conversation's loss rides in every step (a digit out of ten: about ln 10 / 2 per target)
    assert all(0.3 < r["replay_loss"] < 3 for r in rows(digits, "out/full_kl"))
    before, after = load_file(digits / "digit/model.safetensors"), load_file(digits / "out/full_kl/model.safetensors")
    assert torch.equal(before["tok_embeddings.weight"], after["tok_embeddings.weight"])


@pytest.mark.parametrize("line, message", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    ('{"conversations": [{"role": "assistant", "content": "7"}]}', "bad.jsonl:2: invalid conversation"),
    ('{"conversations": [{"role": "user", "content": "' + "说" * 80 + '"}], "answer": "7"}',
     "bad.jsonl:2: the prompt is"),
])
def test_a_bad_prompt_line_is_named_by_file_and_line(tmp_path, tokenizer, line, message):
    from model.dataset import PromptDataset
    from model.errors import StageError
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD_PROMPT + line + "\n", encoding="utf-8")
    with pytest.raises(StageError, match=message.replace("bad.jsonl", str(bad))):
        PromptDataset(str(bad), tokenizer, 40)


GOOD_PROMPT = '{"conversations": [{"role": "user", "content": "说一个数字。"}], "answer": "7"}\n'


def test_prompt_records_in_sft_formats_become_prompts_with_an_answer(tmp_path, tokenizer):
    from model.dataset import PromptDataset
    path = tmp_path / "p.jsonl"
    path.write_text(GOOD_PROMPT + json.dumps({"instruction": "37+45等于几？", "output": "82", "level": 2}) + "\n" +
                    json.dumps({"messages": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                                             {"from": "human", "value": "1+1=?"}],
                                "answer": 2}) + "\n")
    dataset = PromptDataset(str(path), tokenizer, 64)
    assert dataset.records[1] == {"conversations": [{"role": "user", "content": "37+45等于几？"}], "answer": "82",
                                  "level": 2}
    assert dataset.records[2]["answer"] == 2 and len(dataset.records[2]["conversations"]) == 3
    assert dataset.where == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert dataset.ids[0][-3:] == tokenizer("<s>assistant\n", add_special_tokens=False)["input_ids"][-3:]


def test_a_record_the_reward_cannot_score_stops_the_stage_before_it_writes(digits):
    no_answer = '{"conversations": [{"role": "user", "content": "说一个数字。"}]}\n'
    (digits / "bad.jsonl").write_text(GOOD_PROMPT + no_answer, encoding="utf-8")
    result = grpo(digits, "out/bad", "--data_path", "bad.jsonl", "--max_steps", "1", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: reward accuracy failed on bad.jsonl:2: ValueError: the "
                                                      "record has no 'answer' field (the accuracy reward compares "
                                                      "with it)"), result.stderr
    assert not (digits / "out/bad").exists()


RANK_WEIGHTS = """
import hashlib, runpy, sys, torch
sys.argv = [{script!r}] + sys.argv[1:]
from model import trainer
real_fit = trainer.fit

def fit(model, *args, **kwargs):  # every rank writes what its own weights are after the run
    model = real_fit(model, *args, **kwargs)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    open(f"rank{{rank}}.sha", "w").write(digest)
    return model
trainer.fit = fit
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_two_processes_train_like_one_and_keep_identical_weights(digits):
    script = digits / "rank_weights.py"
    script.write_text(RANK_WEIGHTS.format(script=os.path.join(ROOT, "5-grpo.py")))
    args = ["--learning_rate", "1e-3", "--max_steps", "4", "--num_iterations", "2"]
    grpo(digits, "out/one", *args, "--batch_size", "4")
    grpo(digits, "out/two", *args, "--batch_size", "2", torchrun=2, script=str(script))
    # DDP must average the gradients (a forward through model.module would not): both ranks hold the same weights
    assert (digits / "rank0.sha").read_text() == (digits / "rank1.sha").read_text()
    one, two = load_file(digits / "out/one/model.safetensors"), load_file(digits / "out/two/model.safetensors")
    # the same rollouts (seeded per prompt, not per process); the weights differ by the order of float additions,
    # which Adam's first steps amplify for gradients near zero (one weight of a near-zero gradient can move by the
    # whole learning rate either way): so the whole update is compared, not its largest element
    assert [r["reward"] for r in rows(digits, "out/one")] == [r["reward"] for r in rows(digits, "out/two")]
    start = load_file(digits / "digit/model.safetensors")
    moved = sum((one[k] - start[k]).pow(2).sum().item() for k in one) ** 0.5
    apart = sum((one[k] - two[k]).pow(2).sum().item() for k in one) ** 0.5
    assert moved > 0 and apart < 0.02 * moved, (apart, moved)
