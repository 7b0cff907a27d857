"""
Reinforcement learning with checkable rewards: GRPO (Shao et al. 2024) on prompts whose answers a function can
check, starting from the chat model (DPO, else multi-turn SFT). Native PyTorch on the shared training loop.

Each step, every prompt of the batch is answered --num_generations times by the model being trained (sampled
with --temperature, nothing truncated, through the project's KV cache: the prompt prefilled once for its
samples); the rewards score each answer (model/rewards.py: --reward accuracy,format=0.2,my_module:my_fn=0.5);
each answer's advantage is its reward against its group's mean (and std, --scale_rewards), and its tokens, the
closing </s> included, are trained with the clipped ratio to the log-probs recorded while sampling (--epsilon,
--epsilon_high) and, with --beta > 0, a KL penalty to the start model (with LoRA: the adapters disabled; with
--beta 0 no reference model is kept). The math and its choices: model/grpo.py, docs/rl.md.

Data: JSONL prompts {"conversations": [{"role": "user", "content": "37+45等于几？"}], "answer": "82"} (the
conversation ends with the user turn the model answers; every other field is there for the rewards), or any
format `data_process.py sft` reads (the last assistant turn becomes "answer"); `data_process.py grpo` converts.

Run as:
    python 5-grpo.py --data_path dataset/grpo_data.jsonl          # from the newest out/dpo_* (else out/sft_multi_*)
                                                                  #   -> out/grpo_<dim>
    torchrun --nproc_per_node N 5-grpo.py --batch_size 4          # N processes, global batch N x 4 prompts
    python 5-grpo.py --reward accuracy,repetition=0.5 --beta 0.04 --num_iterations 2 --lora_rank 16
    python 5-grpo.py --replay_data dataset/sft_data_single.jsonl dataset/dpo_data.jsonl   # + SFT's conversations
                                                                  #   and DPO's chosen answers, trained beside RL

Logged every --log_interval steps to metrics.jsonl (reward, reward_std within groups, accuracy and pass@G of the
first --reward, kl, clipped, entropy, length, truncated, repeated_ngrams, zero_signal, rollout_s, step_s) and
plotted in reward.png.
"""
import argparse
import os

from model import chat, checkpoint, lora, stages, trainer
from torch.utils.data import ConcatDataset

from model.dataset import PromptDataset, open_conversations
from model.errors import StageError
from model.grpo import STAT_NAMES, RolloutBatches, count_completion_tokens, frozen_copy, make_grpo_loss
from model.metrics import plot_panels
from model.rewards import parse_rewards
from model.runtime import init_runtime, run_stage, training_precision

REWARD_PANELS = [("reward", ["reward", "reward_std", "accuracy", "pass@G"]),
                 ("completion", ["length"]),
                 ("share", ["zero_signal", "truncated", "repeated_ngrams", "clipped"]),
                 ("seconds per step", ["step_s", "rollout_s"])]


def add_grpo_args(parser):
    a = parser.add_argument
    a("--data_path", default="dataset/grpo_data.jsonl", help="prompts JSONL ({\"conversations\": [...], "
      "\"answer\": ...}; `data_process.py grpo` converts other formats)")
    a("--init_from", default=None, help="chat checkpoint to start from (default: newest out/dpo_*, else "
      "out/sft_multi_*)")
    a("--reward", default="accuracy", help="rewards, comma-separated, each name[=weight]: accuracy, format, "
      "repetition, or module:function for your own (reward(prompt, completion, record) -> float)")
    a("--num_generations", type=int, default=8, help="completions sampled per prompt (the group, G >= 2)")
    a("--max_new_tokens", type=int, default=64, help="longest completion; longer ones are truncated (--truncated)")
    a("--temperature", type=float, default=1.0,
      help="sampling temperature; the loss scores the same softmax(logits / temperature)")
    a("--epsilon", type=float, default=0.2, help="clip the ratio to [1 - epsilon, 1 + epsilon_high]")
    a("--epsilon_high", type=float, default=None, help="upper clip (DAPO's clip-higher, e.g. 0.28; "
      "default: --epsilon)")
    a("--beta", type=float, default=0.0, help="weight of the KL penalty to the start model (k3 estimator); "
      "0 keeps no reference model")
    a("--scale_rewards", action=argparse.BooleanOptionalAction, default=True,
      help="divide a group's advantages by its reward std (GRPO); --no-scale_rewards: mean-centred only (Dr. GRPO)")
    a("--num_iterations", type=int, default=1, help="optimizer steps on each batch of rollouts (the clip acts "
      "from the second on)")
    a("--truncated", choices=["mask", "penalize"], default="mask",
      help="a completion cut at --max_new_tokens: mask = its tokens get no loss (its reward still counts in its "
           "group), penalize = its reward is --truncated_reward")
    a("--truncated_reward", type=float, default=-1.0, help="the reward of a truncated completion with "
      "--truncated penalize")
    a("--replay_data", nargs="+", default=None, help="conversations replayed beside the rollouts: SFT files, or DPO "
      "files (their chosen answers). Each prompt brings one row, whose next-token loss, times --replay_weight, is "
      "added. RL moves the whole model; the replay keeps what the earlier stages taught (measured in docs/rl.md)")
    a("--replay_weight", type=float, default=1.0, help="weight of the --replay_data loss")


def check_args(args):
    if args.num_generations < 2:
        raise StageError(f"--num_generations must be at least 2 (a group compares its completions), not "
                         f"{args.num_generations}")
    if not args.temperature > 0:
        raise StageError(f"--temperature must be > 0 (GRPO samples), not {args.temperature}")
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if not (0 < args.epsilon < 1 and args.epsilon_high > 0):
        raise StageError(f"--epsilon must be in (0, 1) and --epsilon_high > 0 (got {args.epsilon}, "
                         f"{args.epsilon_high})")
    if args.beta < 0 or args.num_iterations < 1 or args.max_new_tokens < 1:
        raise StageError("--beta must be >= 0, --num_iterations and --max_new_tokens >= 1")


def check_rewards(dataset, rewards):
    """Every reward on every record (with an empty completion) before anything is written: a record the rewards
    cannot score (no "answer", say) stops the run here with its file:line, not at the step that draws it."""
    for record, where in zip(dataset.records, dataset.where):
        rewards.score(record["conversations"], "", record, where)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grpo_args(parser)
    trainer.add_training_args(parser, batch_size=8, learning_rate=1e-5, warmup_iters=10, save_interval=100,
                              eval_interval=0)
    trainer.add_model_args(parser)
    lora.add_lora_args(parser)
    args = parser.parse_args()
    check_args(args)
    rewards = parse_rewards(args.reward)

    init_dir = args.init_from or stages.find_start("grpo", args.dim, args.use_moe)
    if init_dir is None:
        raise StageError("no out/dpo_* or out/sft_multi_* checkpoint found: run 4-dpo.py or 3-full_sft.py first "
                         "or pass --init_from DIR")
    if not os.path.isfile(args.data_path):
        raise StageError(f"GRPO prompts not found: {args.data_path} (make them with `python data_process.py grpo`)")
    runtime = init_runtime(args.device)
    model, tokenizer, tokenizer_dir = checkpoint.start_from_checkpoint(init_dir, args, trainer.model_overrides(args))
    if model.config.dropout:  # the ratio compares two evaluations of the same weights: dropout would differ
        raise StageError(f"GRPO trains without dropout (the checkpoint's is {model.config.dropout}): pass --dropout 0")
    max_prompt_len = model.config.max_seq_len - args.max_new_tokens
    if max_prompt_len < 1:
        raise StageError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.config.max_seq_len} tokens")
    dataset = PromptDataset(args.data_path, tokenizer, max_prompt_len)
    check_rewards(dataset, rewards)
    model = lora.maybe_wrap(model, args, init_dir)  # --lora_rank 0: the model itself, trained in full
    reference = None
    if args.beta and not lora.is_lora(model):  # with LoRA the reference is the model with its adapters disabled
        reference = frozen_copy(model).to(runtime.device)
    settings = {"data": os.path.abspath(args.data_path), "tokenizer_sha256": chat.tokenizer_sha256(tokenizer_dir),
                "reward": args.reward, "num_generations": args.num_generations}
    replay = replay_collate = None
    if args.replay_data:
        for path in args.replay_data:
            if not os.path.isfile(path):
                raise StageError(f"--replay_data not found: {path}")
        parts = [open_conversations(path, tokenizer, model.config.max_seq_len) for path in args.replay_data]
        replay, replay_collate = parts[0] if len(parts) == 1 else ConcatDataset(parts), parts[0].collate
        settings["replay_data"] = [os.path.abspath(path) for path in args.replay_data]

    run_dir = args.out_dir or os.path.join("out", stages.run_name("grpo", model.config))
    resuming = checkpoint.prepare_run_dir(run_dir, args.resume, args.overwrite, runtime)
    if runtime.is_master:
        print(f"grpo: {len(dataset)} prompts from {args.data_path}, {args.num_generations} completions each, reward "
              f"{rewards.describe()}, beta {args.beta}, starting from {init_dir} -> {run_dir}")
        checkpoint.copy_tokenizer(tokenizer_dir, run_dir)
    extra_state = {}  # with --num_iterations > 1: the rollouts of the current batch, for a resume between updates
    dtype = training_precision(args.dtype, runtime.device)
    rollouts = RolloutBatches(model, dataset, tokenizer, rewards, args, runtime, dtype, extra_state, reference,
                              replay, replay_collate)
    loss_fn = make_grpo_loss(args.temperature, args.epsilon, args.epsilon_high, args.beta, STAT_NAMES,
                             args.replay_weight if replay is not None else 0.0)
    trainer.fit(model, dataset, dataset.collate, loss_fn, args, runtime, run_dir, title="grpo",
                extra_state=extra_state, count_fn=count_completion_tokens, settings=settings, resuming=resuming,
                make_batches=rollouts, batch_repeats=args.num_iterations)
    if runtime.is_master:
        plot_panels(run_dir, REWARD_PANELS, "reward.png", f"grpo: {rewards.describe()}")


if __name__ == "__main__":
    run_stage(main)
