"""
grpo: 5-grpo.py side by side with TRL's GRPOTrainer (what a user would pick instead), from the same start model
(TRL trains it as the LlamaForCausalLM export_model.py writes, passed by path), on the same prompt file and reward,
with the same G, prompts per step, learning rate (constant), max new tokens, temperature 1.0 (no top-k / top-p),
beta, epsilon, num_iterations and steps, in fp32 on the CPU. Each side runs in its own process with --grpo_threads
threads (1 by default: on a busy 2-core machine multi-threaded steps swing tenfold), one after the other. Printed:
both configurations; the median seconds per step, rollout (sampling + rewards) and update (the rest) separately;
the held-out accuracy of the start model and of each final model, all three scored by this project's evaluation
(model.evaluate.score_eval_file, greedy; TRL's result comes back through model.llama.from_llama); the peak RSS of
each process. Not in the default sections. Needs trl (`make bench-trl`, or pip install -r requirements-bench.txt).
Measurements: docs/rl.md.

    python -m bench grpo                      # out/demo/dpo on dataset/demo/{grpo_data,eval_rl}.jsonl (make demo)
    python -m bench grpo --grpo_init out/demo/dpo --grpo_data dataset/demo/grpo_data.jsonl \\
        --grpo_eval dataset/demo/eval_rl.jsonl --grpo_steps 20 --grpo_batch 16 --grpo_generations 8

How the step is timed: ours from its metrics.jsonl (step_s, rollout_s, --log_interval 1); TRL's with a callback
(on_step_begin -> on_step_end) and its rollout by timing GRPOTrainer._generate_and_score_completions, never
train_runtime (which holds the start-up). The settings that differ between the two by default are set on both:
TRL's loss_type "dapo" is ours (the loss summed over the step's completion tokens, divided by their number), its
scale_rewards "group" ours (a group's Bessel std + 1e-4), its 1e-6 learning rate, activation checkpointing, linear
decay and AdamW betas are set to ours; weight decay is 0 on both (they decay different parameter sets).
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "pip install -r requirements-bench.txt (or make bench-trl)"


def add_args(parser):
    a = parser.add_argument
    a("--grpo_init", default="out/demo/dpo", help="grpo: the chat checkpoint both sides start from")
    a("--grpo_data", default="dataset/demo/grpo_data.jsonl", help="grpo: training prompts (5-grpo.py's format)")
    a("--grpo_eval", default="dataset/demo/eval_rl.jsonl", help="grpo: held-out checks (2-eval.py's chat format)")
    a("--grpo_steps", type=int, default=20, help="grpo: optimizer steps per side")
    a("--grpo_batch", type=int, default=16, help="grpo: prompts per step")
    a("--grpo_generations", type=int, default=8, help="grpo: completions per prompt (G)")
    a("--grpo_lr", type=float, default=1e-4, help="grpo: learning rate (constant, no warm-up)")
    a("--grpo_max_new_tokens", type=int, default=24, help="grpo: longest completion (and held-out answer)")
    a("--grpo_reward", default="accuracy", help="grpo: --reward of 5-grpo.py; TRL gets the same Rewards object")
    a("--grpo_beta", type=float, default=0.0, help="grpo: KL weight")
    a("--grpo_epsilon", type=float, default=0.2, help="grpo: clip range")
    a("--grpo_num_iterations", type=int, default=1, help="grpo: updates per batch of rollouts")
    a("--grpo_scale_rewards", action=__import__("argparse").BooleanOptionalAction, default=True,
      help="grpo: divide advantages by the group's std (TRL: scale_rewards group / none)")
    a("--grpo_threads", type=int, default=1, help="grpo: torch threads of each side")
    a("--grpo_seed", type=int, default=0, help="grpo: seed of both sides")
    a("--grpo_work", default=None, help="grpo: keep the runs, logs and held-out answers in this directory "
      "(default: a temporary one, removed)")
    a("--grpo_child", choices=["trl"], default=None, help=__import__("argparse").SUPPRESS)
    a("--grpo_child_dir", default=None, help=__import__("argparse").SUPPRESS)


def settings(args) -> dict:
    return {"steps": args.grpo_steps, "prompts_per_step": args.grpo_batch, "G": args.grpo_generations,
            "learning_rate": args.grpo_lr, "max_new_tokens": args.grpo_max_new_tokens, "temperature": 1.0,
            "reward": args.grpo_reward, "beta": args.grpo_beta, "epsilon": args.grpo_epsilon,
            "num_iterations": args.grpo_num_iterations, "scale_rewards": args.grpo_scale_rewards,
            "threads": args.grpo_threads, "seed": args.grpo_seed}


def child_env(args) -> dict:
    threads = str(args.grpo_threads)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": ROOT,
            "TOKENIZERS_PARALLELISM": "false"}


def run_measured(command, log_path, env) -> tuple:
    """Run command (output to log_path); -> (seconds, peak RSS in MiB of that process, the machine's 1-minute load
    average when it started: the sides run one after the other, so a load that changed between them shows here).
    Exits with the log's tail if it fails."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this process's own rusage (ru_maxrss: KiB on Linux)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        sys.exit(f"python -m bench grpo: {' '.join(command[:3])} failed:\n{tail}")
    return seconds, usage.ru_maxrss / 1024, load


def ours_command(args, out_dir) -> list:
    return [sys.executable, os.path.join(ROOT, "5-grpo.py"), "--init_from", args.grpo_init, "--data_path",
            args.grpo_data, "--out_dir", out_dir, "--max_steps", str(args.grpo_steps), "--batch_size",
            str(args.grpo_batch), "--num_generations", str(args.grpo_generations), "--learning_rate", str(args.grpo_lr),
            "--warmup_iters", "0", "--min_lr_ratio", "1", "--weight_decay", "0", "--grad_clip", "1.0",
            "--max_new_tokens", str(args.grpo_max_new_tokens), "--temperature", "1.0", "--reward", args.grpo_reward,
            "--beta", str(args.grpo_beta), "--epsilon", str(args.grpo_epsilon), "--num_iterations",
            str(args.grpo_num_iterations), "--scale_rewards" if args.grpo_scale_rewards else "--no-scale_rewards",
            "--truncated", "mask", "--dtype", "float32", "--device", "cpu", "--seed", str(args.grpo_seed),
            "--log_interval", "1", "--save_interval", "100000", "--eval_interval", "0"]


def trl_config(args, out_dir):
    """The GRPOConfig, every setting that matters given explicitly (TRL's defaults differ from ours)."""
    from trl import GRPOConfig
    G = args.grpo_generations
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, seed=args.grpo_seed, max_steps=args.grpo_steps, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False, fp16=False,
        model_init_kwargs={"dtype": "float32"},
        # one step = grpo_batch prompts x G completions, generated once, one optimizer step on them
        per_device_train_batch_size=args.grpo_batch * G, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=G, num_iterations=args.grpo_num_iterations,
        # the optimiser as ours: constant rate, AdamW (fused on CPU as ours) with betas (0.9, 0.95), clip 1.0
        learning_rate=args.grpo_lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False,
        # sampling from softmax(logits / 1.0), nothing truncated, as ours
        temperature=1.0, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        max_completion_length=args.grpo_max_new_tokens, mask_truncated_completions=True,
        # the loss as ours: "dapo" = summed over the step's completion tokens / their number (ours: trainer.fit's
        # rule); group-std scaling with Bessel's correction + 1e-4 (ours: model.grpo.group_advantages)
        loss_type="dapo", scale_rewards="group" if args.grpo_scale_rewards else "none", beta=args.grpo_beta,
        epsilon=args.grpo_epsilon, epsilon_high=args.grpo_epsilon)


TRL_KEYS = ("use_cpu", "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
            "num_generations", "num_iterations", "learning_rate", "lr_scheduler_type", "warmup_steps", "optim",
            "adam_beta1", "adam_beta2", "weight_decay", "max_grad_norm", "gradient_checkpointing", "temperature",
            "top_k", "top_p", "max_completion_length", "mask_truncated_completions", "loss_type", "scale_rewards",
            "beta", "epsilon", "epsilon_high", "bf16", "seed")


def trl_child(args):
    """The TRL side, in its own process: train, save the model, write the step times to --grpo_child_dir."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from model.dataset import PromptDataset
    from model.rewards import parse_rewards

    torch.set_num_threads(args.grpo_threads)
    work = args.grpo_child_dir
    start = os.path.join(work, "start_hf")
    tokenizer = AutoTokenizer.from_pretrained(start)
    rewards = parse_rewards(args.grpo_reward)
    data = PromptDataset(args.grpo_data, tokenizer, 10 ** 9)  # the records and prompt ids 5-grpo.py reads
    rendered = tokenizer.apply_chat_template(data.records[0]["conversations"], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    if list(rendered) != data.ids[0]:  # TRL renders prompts with the chat template: it must give our tokens
        sys.exit(f"python -m bench grpo: the chat template renders {data.where[0]} as other tokens than "
                 f"5-grpo.py's encoder ({list(rendered)} vs {data.ids[0]})")
    dataset = Dataset.from_list([{"prompt": r["conversations"], "index": i} for i, r in enumerate(data.records)])

    def reward_fn(prompts, completions, index, **_):
        """TRL's reward function: the Rewards object 5-grpo.py scores with (its weighted sum per completion)."""
        return [rewards.score(data.records[i]["conversations"], completion[-1]["content"], data.records[i],
                              data.where[i])[0] for completion, i in zip(completions, index)]
    reward_fn.__name__ = args.grpo_reward.replace(",", "+")  # TRL logs the reward under the function's name

    times = {"step_s": [], "rollout_s": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times["step_s"].append(time.perf_counter() - self.start)

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                times["rollout_s"].append(time.perf_counter() - t0)

    config = trl_config(args, os.path.join(work, "trl_out"))
    trainer = TimedGRPOTrainer(model=start, reward_funcs=reward_fn, args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepTimer()])
    print(f"TRL GRPOTrainer, loss_type {config.loss_type!r} (of {trl_loss_types()}), scale_rewards "
          f"{config.scale_rewards!r}, {torch.get_num_threads()} thread(s)", flush=True)
    trainer.train()
    trainer.save_model(os.path.join(work, "trl_final"))
    history = [row for row in trainer.state.log_history if "reward" in row]
    with open(os.path.join(work, "trl_times.json"), "w") as f:
        json.dump({**times, "reward": [row["reward"] for row in history],
                   "config": {key: getattr(config, key) for key in TRL_KEYS}}, f)


def trl_loss_types() -> str:
    """The loss_type values TRL's GRPOConfig lists ("Supported values are 'grpo', ... and 'vespo'."), read from its
    help text so that another version shows its own."""
    from trl import GRPOConfig
    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata.get("help", "")
    listed = re.search(r"Supported values are (.*?)\.", help_text)
    return ", ".join(re.findall(r"'(\w+)'", listed.group(1))) if listed else "?"


def ours_times(run_dir) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"rollout_s"' in line]
    return {"step_s": [r["step_s"] for r in rows], "rollout_s": [r["rollout_s"] for r in rows],
            "reward": [r["reward"] for r in rows]}


def held_out(checkpoint, eval_path, max_new_tokens, answers_path) -> float:
    """Greedy accuracy on the held-out checks, by 2-eval.py's rule (the gold in the answer's first line)."""
    from model.evaluate import load_checkpoint, score_eval_file
    model, tokenizer, _ = load_checkpoint(checkpoint, device="cpu", dtype="float32")
    return score_eval_file(model, tokenizer, eval_path, "chat", max_new_tokens=max_new_tokens,
                           out_path=answers_path)["overall"]


def as_checkpoint(hf_dir, start_dir, out_dir):
    """TRL's saved LlamaForCausalLM as a nano-LLM checkpoint (model.llama.from_llama), the start's config and
    tokenizer."""
    from transformers import LlamaForCausalLM

    from model.checkpoint import copy_tokenizer
    from model.llama import from_llama
    from model.model import Transformer
    config = Transformer.from_pretrained(start_dir).config
    from_llama(LlamaForCausalLM.from_pretrained(hf_dir, dtype="float32"), config).save_pretrained(out_dir)
    copy_tokenizer(start_dir, out_dir)


def summary(times: dict) -> dict:
    steps, rollouts = times["step_s"], times["rollout_s"]
    updates = [s - r for s, r in zip(steps, rollouts)]
    return {"step_s": statistics.median(steps), "rollout_s": statistics.median(rollouts),
            "update_s": statistics.median(updates), "steps": len(steps),
            "reward_first": statistics.mean(times["reward"][:5]), "reward_last": statistics.mean(times["reward"][-5:])}


def run(args, results) -> dict:
    try:
        import trl
    except ImportError as err:
        sys.exit(f"python -m bench grpo: needs trl, a benchmark-only dependency ({err}): {INSTALL}")
    for flag, path, what in (("--grpo_init", args.grpo_init, "config.json"), ("--grpo_data", args.grpo_data, None),
                             ("--grpo_eval", args.grpo_eval, None)):
        if not os.path.isfile(os.path.join(path, what) if what else path):
            sys.exit(f"python -m bench grpo: {flag} {path} not found (make demo writes the defaults, or pass {flag})")
    import torch
    torch.set_num_threads(args.grpo_threads)
    env = child_env(args)
    out = {"settings": settings(args), "init": args.grpo_init, "data": args.grpo_data, "eval": args.grpo_eval}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        work = args.grpo_work or tmp
        if args.grpo_work and os.path.exists(os.path.join(work, "ours")):
            sys.exit(f"python -m bench grpo: --grpo_work {work} holds an earlier run; pass an empty directory")
        os.makedirs(work, exist_ok=True)
        start = os.path.join(work, "start_hf")
        run_measured([sys.executable, os.path.join(ROOT, "export_model.py"), "--checkpoint", args.grpo_init,
                      "--out_dir", start], os.path.join(work, "export.log"), env)

        command = ours_command(args, os.path.join(work, "ours"))
        wall, rss, load = run_measured(command, os.path.join(work, "ours.log"), env)
        out["ours"] = {**summary(ours_times(os.path.join(work, "ours"))), "wall_s": wall, "peak_rss_mib": rss,
                       "load_at_start": load,
                       "config": " ".join(["python"] + [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                                                        for c in command[1:]]).replace(work, "$TMP")}
        print(f"[grpo: ours done in {wall:.0f} s]", file=sys.stderr, flush=True)

        command = [sys.executable, "-m", "bench", "grpo", "--grpo_child", "trl", "--grpo_child_dir", work,
                   *[token for key, value in vars(args).items() if key.startswith("grpo_") and
                     key not in ("grpo_child", "grpo_child_dir", "grpo_scale_rewards", "grpo_work")
                     for token in (f"--{key}", str(value))],
                   "--grpo_scale_rewards" if args.grpo_scale_rewards else "--no-grpo_scale_rewards"]
        wall, rss, load = run_measured(command, os.path.join(work, "trl.log"), env)
        with open(os.path.join(work, "trl_times.json")) as f:
            trl_run = json.load(f)
        with open(os.path.join(work, "trl.log")) as f:
            loss_line = next((line.strip() for line in f if line.startswith("TRL GRPOTrainer")), "")
        out["trl"] = {**summary(trl_run), "wall_s": wall, "peak_rss_mib": rss, "load_at_start": load,
                      "config": trl_run["config"],
                      "version": trl.__version__, "loss_line": loss_line}
        print(f"[grpo: TRL done in {wall:.0f} s]", file=sys.stderr, flush=True)

        as_checkpoint(os.path.join(work, "trl_final"), args.grpo_init, os.path.join(work, "trl_ours"))
        n = args.grpo_max_new_tokens
        out["held_out"] = {name: held_out(path, args.grpo_eval, n, os.path.join(work, f"{name}.answers.jsonl"))
                           for name, path in (("start", args.grpo_init), ("ours", os.path.join(work, "ours")),
                                              ("trl", os.path.join(work, "trl_ours")))}
    out["speedup"] = out["trl"]["step_s"] / out["ours"]["step_s"]
    return out


def table(grpo: dict) -> list:
    s, ours, trl, acc = grpo["settings"], grpo["ours"], grpo["trl"], grpo["held_out"]
    lines = ["", f"GRPO side by side with TRL {trl['version']}: {s['steps']} steps of {s['prompts_per_step']} prompts "
                 f"x G={s['G']}, lr {s['learning_rate']:g}, <= {s['max_new_tokens']} new tokens, reward "
                 f"{s['reward']}, beta {s['beta']:g}, epsilon {s['epsilon']:g}, num_iterations {s['num_iterations']}, "
                 f"{s['threads']} thread(s), fp32",
             f"  start {grpo['init']}, prompts {grpo['data']}, held-out {grpo['eval']}",
             f"  ours: {ours['config']}",
             f"  TRL:  GRPOConfig({', '.join(f'{k}={v!r}' for k, v in trl['config'].items())})",
             f"  TRL:  {trl['loss_line']}",
             f"  {'':22s} {'step s':>7s} {'rollout s':>9s} {'update s':>8s} {'reward 5 first->last':>21s} "
             f"{'held-out':>8s} {'peak RSS MiB':>12s} {'run s':>6s} {'load':>5s}"]
    for name, label, r in (("ours", "ours (5-grpo.py)", ours), ("trl", "TRL GRPOTrainer", trl)):
        lines.append(f"  {label:22s} {r['step_s']:7.2f} {r['rollout_s']:9.2f} {r['update_s']:8.2f} "
                     f"{r['reward_first']:10.3f} -> {r['reward_last']:6.3f} {100 * acc[name]:7.1f}% "
                     f"{r['peak_rss_mib']:12.0f} {r['wall_s']:6.0f} {r.get('load_at_start', float('nan')):5.1f}")
    lines += [f"  start model held-out {100 * acc['start']:.1f}%; step time median over {ours['steps']} / "
              f"{trl['steps']} steps; ours {grpo['speedup']:.2f}x faster per step than TRL, held-out accuracy "
              f"{100 * (acc['ours'] - acc['trl']):+.1f} points vs TRL"]
    return lines
