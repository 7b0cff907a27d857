"""
GRPO, Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath): the math 5-grpo.py trains with, and
its rollouts. The choices, their references and their measured effect: docs/rl.md.

For each prompt G completions are sampled from the model being trained (the rollout policy pi_old) and scored by
computed rewards (model/rewards.py). A completion's advantage is its reward relative to its group,

    A_i = r_i - mean(r)        divided by std(r) + 1e-4 with scale_rewards (Dr. GRPO, Liu et al. 2025, drops it)

and each of its tokens t, the closing end-of-turn token included, is trained with PPO's clipped surrogate and a
KL penalty towards the start model:

    ratio_t = pi(o_t) / pi_old(o_t)            pi_old(o_t): the log-prob recorded when o_t was sampled
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (the k3 estimator, Schulman 2020: >= 0)

summed over the completion tokens and divided by the completion tokens of the whole optimizer step, all
micro-batches and processes (DAPO's token-level normalisation, Yu et al. 2025; trainer.fit's rule).

    group_advantages(rewards, G, scale)   advantages and the groups whose rewards are all equal (no signal)
    token_logps(logits, targets, T)       log p of each target under softmax(logits / T)
    completion_logits(model, batch)       the logits that score the completions, each group's prompt run once
    clipped_objective(...)                the loss above, summed; clipped tokens; KL sum
    sample_groups(model, prompts, G, ...) batched sampling: each prompt prefilled once, its KV cache shared by its
                                          G samples; per-row noise from a seed per prompt and step
    RolloutBatches                        trainer.fit's make_batches hook: a step's prompts -> scored rollouts
    make_grpo_loss(...), count_completion_tokens(batch)   loss_fn / count_fn for trainer.fit

Sampling draws from exactly the distribution the loss scores: softmax(logits / temperature), no top-k/top-p.
"""
import copy
import hashlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from . import lora
from .generate import KVCache, left_pad
from .rewards import repeated_ngram_share
from .runtime import autocast


# ----------------------------------------------------------------------------------------------------------
# the math

def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-4):
    """rewards (N,), N = groups x group_size, a group's completions together -> (advantages (N,), flat (N / G,)):
    reward minus its group's mean, over the group's (Bessel-corrected) std + eps when scale; a group whose rewards
    are all equal gets exactly 0 (it carries no signal) and is marked in flat."""
    grouped = rewards.float().view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    flat = grouped.max(dim=1).values == grouped.min(dim=1).values
    return advantages.masked_fill(flat[:, None], 0.0).flatten(), flat


def token_logps(logits, targets, temperature: float):
    """(log p(target) (B, T), log-softmax (B, T, V)) under softmax(logits / temperature), in float32."""
    logps = F.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logps


def completion_logits(model, batch):
    """-> (logits (rows, width, V) predicting each completion token, MoE balance loss or None).

    batch: input_ids / attention_mask (rows, prompt + width), the prompt left-padded and the completion after it;
    completion_ids (rows, width); group_size (a 0-d tensor, 1 if absent): rows i*G .. i*G + G - 1 are the G
    completions of one prompt. The prompt is the same in all G of them, so it goes through the model once per
    group and its keys/values, kept in a cache with their autograd history, are repeated for its G completions;
    the completions then run as a continuation, and the gradient through the repeated keys/values sums over the
    group exactly as it would over G copies of the prompt. Same logits as one forward of the full rows (to float
    rounding), for about 40% less compute at the demo's shapes (docs/rl.md)."""
    group_size = int(batch["group_size"]) if "group_size" in batch else 1
    width = batch["completion_ids"].shape[1]
    prompt_len = batch["input_ids"].shape[1] - width
    if prompt_len < 1:
        raise ValueError("completion_logits needs a prompt before the completion")
    cache = DynamicCache()
    first = model(input_ids=batch["input_ids"][::group_size, :prompt_len],
                  attention_mask=batch["attention_mask"][::group_size, :prompt_len], cache=cache, logits_to_keep=1)
    logits, aux, parts = first.logits.repeat_interleave(group_size, dim=0), first.aux_loss, 1
    if width > 1:  # the completion's own tokens, but its last, predict the rest of it
        if group_size > 1:
            cache.batch_repeat_interleave(group_size)
        rest = model(input_ids=batch["input_ids"][:, prompt_len:-1], attention_mask=batch["attention_mask"][:, :-1],
                     cache=cache)
        logits = torch.cat([logits, rest.logits], dim=1)
        if rest.aux_loss is not None:
            aux, parts = aux + rest.aux_loss, 2
    return logits, (None if aux is None else aux / parts)


def clipped_objective(logps, old_logps, advantages, mask, epsilon_low: float, epsilon_high: float,
                      ref_logps=None, beta: float = 0.0):
    """-> (loss summed over the tokens mask weighs, tokens whose objective the clip changed, KL summed).
    logps / old_logps / ref_logps / mask (B, T); advantages (B,)."""
    ratio = torch.exp(logps - old_logps)
    advantage = advantages[:, None]
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    was_clipped = (clipped < unclipped).float()  # the min took the clipped term: no gradient through ratio
    return (per_token * mask).sum(), (was_clipped * mask).sum().detach(), (kl * mask).sum().detach()


def count_completion_tokens(batch) -> int:
    """trainer.fit's count_fn: the completion tokens that carry loss (end-of-turn included, masked ones not)."""
    return int(batch["completion_mask"].sum())


def make_grpo_loss(temperature, epsilon_low, epsilon_high, beta, stat_names, replay_weight=0.0):
    """loss_fn for trainer.fit: summed over the batch's completion tokens; the rollout statistics riding in
    batch["stats"] come back as metric sums (names per model.metrics.metric_means). With replay rows in the batch,
    + replay_weight x their mean next-token loss, weighted by the batch's completion tokens like the rest (so the
    step's loss is GRPO's per-token loss + replay_weight x the replay loss)."""
    def grpo_loss(model, batch):
        logits, aux_loss = completion_logits(model, batch)
        logps, all_logps = token_logps(logits, batch["completion_ids"], temperature)
        mask = batch["completion_mask"]
        loss, clipped, kl = clipped_objective(logps, batch["old_logps"], batch["advantages"], mask, epsilon_low,
                                              epsilon_high, batch.get("ref_logps"), beta)
        if aux_loss is not None:  # MoE balance loss (the mean of the prompt and completion passes' own), weighted
            loss = loss + aux_loss * mask.sum()  # by the batch's tokens like the rest
        with torch.no_grad():
            entropy = -(all_logps.exp() * all_logps).sum(dim=-1)
        metrics = {"kl": kl, "clipped": clipped, "entropy": (entropy * mask).sum()}
        if "replay_input_ids" in batch:
            replay = model(input_ids=batch["replay_input_ids"], attention_mask=batch["replay_attention_mask"],
                           labels=batch["replay_labels"]).loss * mask.sum()
            loss = loss + replay_weight * replay
            metrics["replay_loss"] = replay.detach()
        metrics.update(zip(stat_names, batch["stats"]))
        return loss, metrics
    return grpo_loss


# ----------------------------------------------------------------------------------------------------------
# sampling

def sample_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of one prompt at one rollout step: the same wherever the prompt lands (rank, batch)."""
    digest = hashlib.sha256(f"{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


@torch.no_grad()
def sample_groups(model, prompts, group_size, max_new_tokens, temperature, eos_id, pad_id, seeds):
    """G completions of each prompt (token-id lists), batched. The prompts are prefilled once, left-padded, and each
    one's keys/values are repeated for its G rows; then every unfinished row decodes one token per forward pass.
    Row i*G + g is sample g of prompt i. Its tokens come from inverse-CDF sampling of softmax(logits / temperature)
    with uniform noise drawn from torch.Generator(seeds[i]), so a prompt's samples do not depend on its batch.
    -> dict: prompt_ids (B*G, P) and prompt_mask, completion_ids (B*G, C) (pad_id after the end), old_logps
    (B*G, C) (log p of each sampled token, 0 after the end), completion_mask (B*G, C) (1 up to and including the
    end-of-turn token), finished (B*G,) (False: truncated at max_new_tokens)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: each prompt samples from its own seed")
    device = next(model.parameters()).device
    n_prompts, G = len(prompts), group_size
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    cache = KVCache(model.config, n_prompts, prompt_ids.shape[1] + max_new_tokens, device,
                    next(model.parameters()).dtype)
    logits = model(prompt_ids, attention_mask=prompt_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    # one prefill per prompt; its G samples share the keys/values (and the first token's distribution)
    cache.keys, cache.values = cache.keys.repeat_interleave(G, dim=1), cache.values.repeat_interleave(G, dim=1)
    logits = logits.repeat_interleave(G, dim=0)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, dim=0), prompt_mask.repeat_interleave(G, dim=0)
    noise = torch.cat([torch.rand(G, max_new_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                       for seed in seeds]).to(device)
    rows = n_prompts * G
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # the rows the forward pass still computes (logits: one per live row)
    attention_mask, tokens, logps, active = prompt_mask, [], [], []
    for t in range(max_new_tokens):
        log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
        cdf = log_probs.double().exp().cumsum(dim=-1)
        sampled = torch.searchsorted(cdf, (noise[live, t] * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        sampled = sampled.clamp(max=cdf.shape[1] - 1)
        token = torch.full((rows,), pad_id, dtype=torch.long, device=device).index_copy(0, live, sampled)
        token_logp = torch.zeros(rows, device=device).index_copy(0, live, log_probs.gather(1, sampled[:, None])[:, 0])
        active.append(~finished)
        tokens.append(token.masked_fill(finished, pad_id))
        logps.append(token_logp.masked_fill(finished, 0.0))
        finished = finished | (token == eos_id)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        # Finished rows leave the batch once they are an eighth of it: the rest decode with less compute (completions
        # end at very different lengths), and a row's tokens do not depend on which other rows are in its batch.
        still = ~finished[live]
        if int(still.sum()) <= len(live) * 7 // 8:
            keep = still.nonzero()[:, 0]
            live, attention_mask = live[keep], attention_mask[keep]
            cache.keys, cache.values = cache.keys[:, keep], cache.values[:, keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
        logits = model(token[live][:, None], attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": torch.stack(tokens, dim=1),
            "old_logps": torch.stack(logps, dim=1), "completion_mask": torch.stack(active, dim=1).long(),
            "finished": finished}


# ----------------------------------------------------------------------------------------------------------
# the make_batches hook

STAT_NAMES = ("reward/n_completions", "reward_std/n_groups", "accuracy/n_completions", "pass@G/n_groups",
              "length/n_completions", "truncated/n_completions", "repeated_ngrams/n_completions",
              "zero_signal/n_groups", "rollout_s/n_ranks", "n_completions", "n_groups", "n_ranks")


class RolloutBatches:
    """trainer.fit's make_batches hook. At a rollout step each micro-batch of prompt indices becomes a batch of
    G scored completions per prompt, sampled from the model as it is now; with num_iterations > 1 the next
    num_iterations - 1 steps train on the same rollouts (the trainer repeats the prompts: batch_repeats), which are
    also kept in extra_state so that a resume between them continues with them.

    model: the unwrapped model (sampling needs no gradient; the loss goes through DDP). reference: the frozen
    start model for the KL term (None: with LoRA the model with adapters disabled; unused when beta is 0).
    replay: conversations (an SFTDataset or a concatenation, with its collate) whose rows ride along, one per prompt,
    chosen by the prompt and the step (so 2 processes see the rows 1 process sees)."""

    def __init__(self, model, dataset, tokenizer, rewards, args, runtime, dtype, extra_state, reference=None,
                 replay=None, replay_collate=None):
        self.model, self.dataset, self.tokenizer, self.rewards = model, dataset, tokenizer, rewards
        self.args, self.runtime, self.dtype, self.extra_state = args, runtime, dtype, extra_state
        self.reference, self.replay, self.replay_collate = reference, replay, replay_collate
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.cached, self.cached_step = None, None

    def __call__(self, epoch, micro_batches, step):
        first = step - step % self.args.num_iterations  # the step these rollouts were sampled at
        if step != first:
            if self.cached_step != first:  # resumed between the iterations: the rollouts come from the checkpoint
                self.cached, self.cached_step = self.restore(first), first
            return [{**batch, "stats": batch["stats"] * self.reused} for batch in self.cached]
        t0 = time.perf_counter()
        self.model.eval()  # no dropout, and MoE computes no balance loss while sampling
        try:
            batches = [self.rollout(batch["index"].tolist(), step) for batch in micro_batches]
        finally:
            self.model.train()
        batches[0]["stats"][STAT_NAMES.index("rollout_s/n_ranks")] = time.perf_counter() - t0
        batches[0]["stats"][STAT_NAMES.index("n_ranks")] = 1.0
        if self.args.num_iterations > 1:
            self.cached, self.cached_step = batches, step
            self.keep(step, batches)
        return batches

    # the statistics a reused batch logs again: all but its rollout time (it had none)
    reused = torch.tensor([0.0 if name in ("rollout_s/n_ranks", "n_ranks") else 1.0 for name in STAT_NAMES])

    def rollout(self, indices, step):
        args, G = self.args, self.args.num_generations
        with autocast(self.runtime.device, self.dtype):
            out = sample_groups(self.model, [self.dataset.ids[i] for i in indices], G, args.max_new_tokens,
                                args.temperature, self.tokenizer.eos_token_id, self.pad_id,
                                [sample_seed(args.seed, step, i) for i in indices])
        completions = out["completion_ids"].cpu()
        ends = out["completion_mask"].sum(dim=1).tolist()
        finished = out["finished"].cpu()
        rewards, accuracy, repeated, texts = [], [], [], []
        for row, (i, g) in enumerate((i, g) for i in indices for g in range(G)):
            ids = completions[row, :ends[row] - int(finished[row])].tolist()  # the text without the </s>
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            total, values = self.rewards.score(self.dataset.records[i]["conversations"], text,
                                               self.dataset.records[i], self.dataset.where[i])
            if not finished[row] and args.truncated == "penalize":
                total = args.truncated_reward
            rewards.append(total)
            accuracy.append(values[self.rewards.names[0]])  # the first reward is the one accuracy reports
            repeated.append(repeated_ngram_share(text))
            texts.append(text)
        rewards = torch.tensor(rewards)
        advantages, flat = group_advantages(rewards, G, args.scale_rewards)
        completion_mask = out["completion_mask"].float()
        if args.truncated == "mask":  # a cut-off answer is no evidence either way: its tokens get no loss
            completion_mask = completion_mask * out["finished"][:, None].float()
        batch = {"input_ids": torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1),
                 "attention_mask": torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1),
                 "completion_ids": out["completion_ids"], "completion_mask": completion_mask,
                 "old_logps": out["old_logps"], "advantages": advantages.to(completion_mask.device),
                 "group_size": torch.tensor(G)}
        if args.beta:
            batch["ref_logps"] = self.reference_logps(batch)
        if self.replay is not None:
            rows = self.replay_collate([self.replay[sample_seed(args.seed + 1, step, i) % len(self.replay)]
                                        for i in indices])
            batch.update({f"replay_{key}": value for key, value in rows.items()})
        batch = {k: v.cpu() for k, v in batch.items()}
        grouped_accuracy = torch.tensor(accuracy).view(-1, G)
        stats = {"reward/n_completions": rewards.sum(), "reward_std/n_groups": rewards.view(-1, G).std(dim=1).sum(),
                 "accuracy/n_completions": grouped_accuracy.sum(),
                 "pass@G/n_groups": (grouped_accuracy.max(dim=1).values > 0).float().sum(),
                 "length/n_completions": out["completion_mask"].sum().float().cpu(),
                 "truncated/n_completions": (~finished).float().sum(), "repeated_ngrams/n_completions": sum(repeated),
                 "zero_signal/n_groups": flat.float().sum(), "n_completions": len(rewards), "n_groups": len(indices)}
        batch["stats"] = torch.tensor([float(stats.get(name, 0.0)) for name in STAT_NAMES])
        self.last_texts = texts
        return batch

    @torch.no_grad()
    def reference_logps(self, batch):
        """The start model's log-probs of the sampled tokens (with LoRA: this model with its adapters disabled),
        computed once per rollout: the reference never changes."""
        reference = self.reference if self.reference is not None else self.model
        with autocast(self.runtime.device, self.dtype), lora.reference_mode(reference):
            logits = completion_logits(reference, batch)[0]
        return token_logps(logits, batch["completion_ids"], self.args.temperature)[0]

    # -- rollouts kept with the checkpoint (num_iterations > 1) -------------------------------------------------

    def keep(self, step, batches):
        """Every rank's rollouts of this step into extra_state (rank 0 writes the checkpoint; each rank reads its own
        on resume). Only tensors: training_state.pt loads with weights_only=True."""
        every_rank = [batches]
        if self.runtime.ddp:
            every_rank = [None] * self.runtime.world_size
            dist.all_gather_object(every_rank, batches)
        for key in [k for k in self.extra_state if k.startswith("rollouts.")]:
            del self.extra_state[key]
        self.extra_state["rollouts.step"] = torch.tensor(step)
        for rank, rank_batches in enumerate(every_rank):
            for m, batch in enumerate(rank_batches):
                for key, value in batch.items():
                    self.extra_state[f"rollouts.{rank}.{m}.{key}"] = value

    def restore(self, step):
        if int(self.extra_state.get("rollouts.step", torch.tensor(-1))) != step:
            raise RuntimeError(f"no rollouts of step {step} in the checkpoint to continue --num_iterations with")
        prefix, batches = f"rollouts.{self.runtime.rank}.", {}
        for key, value in self.extra_state.items():
            if key.startswith(prefix):
                m, name = key[len(prefix):].split(".", 1)
                batches.setdefault(int(m), {})[name] = value
        return [batches[m] for m in sorted(batches)]


def frozen_copy(model):
    """The start model for the KL term when it is not LoRA: a copy, in eval mode, without gradients."""
    reference = copy.deepcopy(model).eval()
    return reference.requires_grad_(False)
