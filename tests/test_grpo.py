"""model/grpo.py: GRPO's math against values computed by hand, and its sampling (the distribution the loss scores,
seeded per prompt, one prefill per prompt, the end-of-turn token trained, truncated completions masked or
penalised)."""
import math
from types import SimpleNamespace

import pytest
import torch

from model.grpo import (STAT_NAMES, RolloutBatches, clipped_objective, group_advantages, make_grpo_loss,
                        sample_groups, token_logps)
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
    width = a["completion_ids"].shape[1]
    logits = model(input_ids=torch.cat([a["prompt_ids"], a["completion_ids"]], 1),
                   attention_mask=torch.cat([a["prompt_mask"], a["completion_mask"]], 1),
                   logits_to_keep=width + 1).logits[:, :-1]
    fresh = token_logps(logits, a["completion_ids"], 1.0)[0] * a["completion_mask"]
    assert torch.allclose(fresh, a["old_logps"], atol=1e-5)


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
