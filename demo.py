"""
The one-command demo: every stage, end to end, on the generated demo corpus, in minutes on a laptop CPU.

Run as:
    make demo                      # sets up .venv first, then runs this
    python demo.py                 # the same, in an environment that already has the requirements
    python demo.py --quick         # a smaller run (the end-to-end test uses it)
    python demo.py --lora          # also SFT and DPO as LoRA on the same pretrained model, compared in the report

Steps (each one is the command a user would type, run as a subprocess):
    data_process.py demo  ->  train_tokenizer.py  ->  data_process.py pretrain  ->  1-pretrain.py
    ->  3-full_sft.py (single-turn)  ->  3-full_sft.py (multi-turn)  ->  4-dpo.py  ->  5-grpo.py  ->  evaluation
and writes out/demo/report.md: config, wall time per stage, final losses, one line per stage saying what it
measurably added, loss curves, held-out accuracy of every stage's model (pretrain completion of held-out facts;
chat QA about people never seen in SFT, 他/她 follow-ups, refusals for people who do not exist, arithmetic on
held-out pairs, alone and after another exchange), DPO's reward accuracy on held-out preference pairs, tool
calling (held-out 3-digit products with the calculator and without; no call where none is needed), and sample
chats.

The demo world (demo_corpus.py) holds facts about fictional people; some people are asked about in SFT,
the others only appear in the pretraining text. Answering questions about those held-out people, and doing
arithmetic on number pairs that appear nowhere in training, is only possible if pretraining stored the facts
and the rules and SFT taught the model to use them. DPO adds one behaviour SFT never shows: "我不知道X是谁。"
for people who do not exist (measured on names DPO never saw); the report shows what it costs on the people it
knows (held-out people QA before and after DPO). GRPO (RL with a computed reward) then teaches the arithmetic asked
in phrasings no earlier stage used (demo_corpus.RL_QUESTIONS; held-out sums, greedy and pass@1/pass@8 sampled, before
and after), and the report shows what it costs every other category.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from model.stages import STAGES

ROOT = os.path.dirname(os.path.abspath(__file__))
CHAT_STAGES = [name for name, stage in STAGES.items() if stage.chat]  # the demo trains each, in this order
LORA_STAGES = ("sft_single", "sft_multi", "dpo")  # --lora runs these again as LoRA

# RL on the sums in new phrasings (5-grpo.py), rewarded for the whole worked answer (the result alone also paid
# operands copied wrong, and RL taught that to the old phrasings too). RL alone took a quarter of the sums in the
# old phrasings; the conversations of SFT and DPO's chosen answers trained beside it (--replay_data, one row per
# prompt) keep every category (the settings tried: docs/rl.md)
GRPO_PLAN = ["--max_steps", "100", "--batch_size", "16", "--num_generations", "8", "--max_new_tokens", "24",
             "--learning_rate", "1e-4", "--warmup_iters", "5", "--reward", "exact"]
RL_SAMPLES = 8  # the report's pass@8 on the held-out RL checks

# Model and schedule chosen to fit the 10-minute budget on 2 CPU cores (see docs/demo.md).
FULL = dict(
    data=["--n_people", "100", "--n_bios", "16", "--heldout_pair_ratio", "0.2", "--sft_people_ratio", "0.4",
          "--dpo_people_ratio", "0.2"],
    model=["--dim", "128", "--n_layers", "4", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "256"],
    # batch 8: twice the steps of batch 16 for little more time; 100 people and 1400 steps leave a margin for how
    # much the stored facts vary from run to run (the validation loss is flat from step 1200 on: docs/demo.md)
    pretrain=["--max_steps", "1400", "--batch_size", "8", "--learning_rate", "3e-3", "--warmup_iters", "60"],
    # embeddings frozen in the SFT stages: trained, the (tied) output layer learns the SFT people's names as
    # likely answers to any question, and people never asked about in SFT get an SFT person's name
    # + a quarter as many rows of the pretraining text as of conversations: SFT moves the model away from what
    # pretraining stored, and the replay keeps it; in the multi-turn stage it cost sums asked after another
    # exchange, so that stage has none (both measured in docs/demo.md)
    sft_single=["--max_steps", "200", "--batch_size", "16", "--learning_rate", "1e-3", "--warmup_iters", "10",
                "--freeze_embeddings", "--ptx_ratio", "0.25"],
    sft_multi=["--max_steps", "120", "--batch_size", "16", "--learning_rate", "5e-4", "--warmup_iters", "5",
               "--freeze_embeddings"],
    # the refusal about a person is an answer the SFT model never gives: plain DPO pushes chosen and rejected down
    # together and greedy output falls apart; the NLL term on the chosen answer (RPO) makes it likely. DPO also
    # disturbs the recall of facts it never asks about: one row of the pretraining text per pair, its next-token
    # loss weighted 1 (PPO-ptx), keeps them (the weights tried: docs/demo.md)
    dpo=["--max_steps", "40", "--batch_size", "32", "--learning_rate", "2e-4", "--warmup_iters", "5",
         "--beta", "0.05", "--nll_weight", "1.0", "--ptx_weight", "1.0"],
    grpo=GRPO_PLAN,
    eval_limit=None,
)
# What the end-to-end test runs: the same world, model and SFT, half the pretraining, DPO at half the rate, 300 eval
# records. Fewer SFT steps left the quick model unable to copy a sum's numbers into its answer, and DPO at the full
# plan's rate took the half-pretrained model's greeting apart (docs/demo.md).
QUICK = {**FULL,
         "pretrain": ["--max_steps", "800", *FULL["pretrain"][2:]],
         "dpo": [*FULL["dpo"][:4], "--learning_rate", "1e-4", *FULL["dpo"][6:]],
         "grpo": ["--max_steps", "80", *FULL["grpo"][2:]],
         "eval_limit": 300}
# The demo world uses ~340 distinct characters: a 1024-token vocabulary holds each as one token and makes the
# output layer 6x cheaper than the default 6400.
VOCAB_SIZE = "1024"
# --lora: rank 4 on every projection trains a few % of this model's parameters; adapters take a 5-20x higher rate
# than full fine-tuning (the rates tried: docs/lora.md)
LORA = dict(flags=["--lora_rank", "4"], learning_rate={"sft_single": "2e-2", "sft_multi": "5e-3", "dpo": "1e-3"})
COMMON = ["--dtype", "auto", "--log_interval", "10", "--save_interval", "100000"]
# Tool calling (docs/tools.md), with --tools: a first SFT stage on the calculator conversations alone (sft_tools),
# then the conversations mixed into both SFT stages (and GRPO's replay); the chat models after them are scored on
# eval_tools.jsonl with the tool loop and without it (the model alone). The first stage is what makes it work: mixed
# in from the start, the calls never learnt to copy the question's numbers and the sums forgot how to; trained alone
# first, the copy into the call forms (late in the stage, all at once) and survives the mix. Off by default: the
# extra stage and evaluation make the demo a few minutes longer (both measured in docs/tools.md)
TOOL_PLAN = ["--max_steps", "300", "--batch_size", "16", "--learning_rate", "1e-3", "--warmup_iters", "10",
             "--freeze_embeddings"]
TOOL_SFT_FILE = "sft_data_tools.jsonl"
TOOL_EVAL_MODELS = ("sft_multi", CHAT_STAGES[-1])  # where SFT taught it, and the final model
TOOL_MAX_NEW_TOKENS = 48  # a call is ~30 tokens of the demo's tokenizer, an answer ~16


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out/demo", help="where checkpoints and report.md go")
    parser.add_argument("--data_dir", default="dataset/demo", help="where the demo corpus is generated")
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer steps (for tests)")
    parser.add_argument("--tools", action="store_true", help="also teach calling the calculator (an SFT stage on "
                        "its conversations, then mixed into both SFT stages) and score it with the tool loop "
                        "(docs/tools.md)")
    parser.add_argument("--lora", action="store_true", help="also run SFT and DPO as LoRA from the same pretrained "
                        "model and compare them with the full runs (trainable share, speed, memory, accuracy)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out, data = args.out_dir, args.data_dir
    if os.path.isdir(out) and os.listdir(out):  # a demo run is one folder: an earlier one is kept, moved aside
        previous = f"{out.rstrip(os.sep)}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(out, previous)
        print(f"moved the earlier demo run in {out} to {previous}")
    os.makedirs(out, exist_ok=True)
    times, peak_rss, started = {}, {}, time.time()

    def step(name, *command):
        print(f"\n==> {name}: {' '.join(command)}", flush=True)
        t0 = time.time()
        process = subprocess.Popen([sys.executable, *command], cwd=os.getcwd())
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory (ru_maxrss)
        returncode = process.returncode = os.waitstatus_to_exitcode(status)
        if returncode != 0:
            sys.exit(f"demo: stage '{name}' failed (exit code {returncode}); see the output above")
        times[name] = time.time() - t0
        peak_rss[name] = usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)  # MiB

    script = lambda name: os.path.join(ROOT, name)  # noqa: E731 - the stage scripts live beside this file
    tokenizer_dir = os.path.join(out, "tokenizer")
    step("corpus", script("data_process.py"), "demo", "--out_dir", data, "--no_pack", *plan["data"])
    step("tokenizer", script("train_tokenizer.py"), "--data_path", os.path.join(data, "tokenizer_train.jsonl"),
         "--out_dir", tokenizer_dir, "--vocab_size", VOCAB_SIZE, "--pretokenizer", "cjk_chars")  # prompts cut anywhere
    step("pack", script("data_process.py"), "pretrain", "--data_path", os.path.join(data, "pretrain_data.jsonl"),
         "--tokenizer_dir", tokenizer_dir)
    runs = {name: os.path.join(out, name) for name in STAGES}  # out/demo/<stage>: the server and 2-eval.py find them
    step("pretrain", script("1-pretrain.py"), "--data_path", os.path.join(data, "pretrain_data.bin"),
         "--tokenizer_dir", tokenizer_dir, "--vocab_size", VOCAB_SIZE, "--out_dir", runs["pretrain"], *plan["model"],
         *plan["pretrain"], *COMMON, "--eval_interval", "200")
    ptx = ["--ptx_data", os.path.join(data, "pretrain_data.bin")]  # the pretraining text, replayed in SFT and DPO
    tools = [os.path.join(data, TOOL_SFT_FILE)] if args.tools else []  # the calculator conversations, both SFTs
    sft_start = runs["pretrain"]
    if args.tools:  # the calls learn to copy the question's numbers alone first (TOOL_PLAN's comment)
        sft_start = os.path.join(out, "sft_tools")
        step("sft_tools", script("3-full_sft.py"), "--data_path", *tools, "--init_from", runs["pretrain"],
             "--out_dir", sft_start, *TOOL_PLAN, *COMMON)
    step("sft_single", script("3-full_sft.py"), "--data_path", os.path.join(data, "sft_data_single.jsonl"), *tools,
         "--init_from", sft_start, "--out_dir", runs["sft_single"], *plan["sft_single"], *ptx, *COMMON)
    # the multi-turn data has no arithmetic: mixing the single-turn file back in keeps it from being forgotten
    step("sft_multi", script("3-full_sft.py"), "--data_path", os.path.join(data, "sft_data_multi.jsonl"),
         os.path.join(data, "sft_data_single.jsonl"), *tools,
         "--init_from", runs["sft_single"], "--out_dir", runs["sft_multi"], *plan["sft_multi"], *COMMON)
    step("dpo", script("4-dpo.py"), "--data_path", os.path.join(data, "dpo_data.jsonl"),
         "--init_from", runs["sft_multi"], "--out_dir", runs["dpo"], *plan["dpo"], *ptx, *COMMON)
    replay = ["--replay_data", *[os.path.join(data, name) for name in ("sft_data_single.jsonl", "sft_data_multi.jsonl",
                                                                       "dpo_data.jsonl")], *tools]
    step("grpo", script("5-grpo.py"), "--data_path", os.path.join(data, "grpo_data.jsonl"),
         "--init_from", runs["dpo"], "--out_dir", runs["grpo"], *plan["grpo"], *replay, *COMMON)
    if args.lora:  # the same three stages, same data and steps, as LoRA from the same pretrained model
        lr = lambda stage: ["--learning_rate", LORA["learning_rate"][stage]]  # noqa: E731 (argparse: last wins)
        runs.update({f"{name}_lora": os.path.join(out, f"{name}_lora") for name in LORA_STAGES})
        step("sft_single_lora", script("3-full_sft.py"), "--data_path", os.path.join(data, "sft_data_single.jsonl"),
             *tools, "--init_from", runs["pretrain"], "--out_dir", runs["sft_single_lora"], *plan["sft_single"], *ptx,
             *COMMON,
             *LORA["flags"], *lr("sft_single"))
        step("sft_multi_lora", script("3-full_sft.py"), "--data_path", os.path.join(data, "sft_data_multi.jsonl"),
             os.path.join(data, "sft_data_single.jsonl"), *tools, "--init_from", runs["sft_single_lora"],
             "--out_dir", runs["sft_multi_lora"], *plan["sft_multi"], *COMMON, *LORA["flags"], *lr("sft_multi"))
        step("dpo_lora", script("4-dpo.py"), "--data_path", os.path.join(data, "dpo_data.jsonl"),
             "--init_from", runs["sft_multi_lora"], "--out_dir", runs["dpo_lora"], *plan["dpo"], *ptx, *COMMON,
             *LORA["flags"], *lr("dpo"))

    t0 = time.time()
    results = evaluate_all(runs, data, plan["eval_limit"])
    results["dpo_heldout_pairs"] = score_preference_pairs(runs, os.path.join(data, "dpo_eval.jsonl"),
                                                          float(plan["dpo"][plan["dpo"].index("--beta") + 1]))
    if args.tools:
        results["tools"] = evaluate_tools(runs, data, plan["eval_limit"])
    results["rl"] = score_rl_task(runs, os.path.join(data, "eval_rl.jsonl"), plan["eval_limit"])
    times["eval"] = time.time() - t0
    with open(os.path.join(out, "scores.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in results.items() if k != "samples"}, f, ensure_ascii=False, indent=1)
    total = time.time() - started
    report = write_report(out, plan, runs, results, times, total, peak_rss)
    print("\n".join(stage_card(results) + tool_card(results)))
    print(f"\ndemo finished in {total / 60:.1f} min; report: {report}")


def evaluate_all(runs, data, limit):
    """Held-out accuracy of every stage's model (greedy), plus a few sample chats from the final model."""
    from model.chat import encode_chat
    from model.evaluate import load_checkpoint, score_eval_file
    from model.generate import generate_batch

    results = {}
    # the pretrained model is also asked the chat questions: the baseline that shows what SFT adds
    chats = [name for name in runs if name != "pretrain"]  # with --lora also the *_lora runs (loaded merged)
    for key, name, mode, file_name in [("pretrain", "pretrain", "completion", "eval_pretrain.jsonl"),
                                       ("pretrain_chat", "pretrain", "chat", "eval_chat.jsonl")] + \
            [(name, name, "chat", "eval_chat.jsonl") for name in chats]:
        model, tokenizer, _ = load_checkpoint(runs[name])
        path = sample_lines(os.path.join(data, file_name), limit, runs[name])
        results[key] = score_eval_file(model, tokenizer, path, mode, max_new_tokens=24,
                                       out_path=os.path.join(runs[name], f"{mode}_answers.jsonl"))
        print(f"{key}: {results[key]['overall']:.1%} of {results[key]['n']} held-out {mode} checks")
    with open(os.path.join(data, "eval_chat.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    samples = [records[i] for i in range(0, len(records), max(1, len(records) // 6))][:6]
    model, tokenizer, _ = load_checkpoint(runs[CHAT_STAGES[-1]])  # the final chat model
    replies = generate_batch(model, tokenizer, [encode_chat(tokenizer, r["messages"]) for r in samples],
                             max_new_tokens=48)
    results["samples"] = [(r["messages"], reply, r["answer"]) for r, reply in zip(samples, replies)]
    return results


# ----------------------------------------------------------------------------------------------------------
# tool calling: the calculator

def evaluate_tools(runs, data, limit):
    """eval_tools.jsonl for each model of TOOL_EVAL_MODELS, with the tool loop and alone (the tools left out):
    {model: {"with": scores, "alone": scores, "samples": [transcripts]}}."""
    from model.evaluate import load_checkpoint, score_eval_file

    results = {}
    for name in TOOL_EVAL_MODELS:
        model, tokenizer, _ = load_checkpoint(runs[name])
        path = sample_lines(os.path.join(data, "eval_tools.jsonl"), limit, runs[name])
        results[name] = {mode: score_eval_file(model, tokenizer, path, "chat", max_new_tokens=TOOL_MAX_NEW_TOKENS,
                                               use_tools=mode == "with",
                                               out_path=os.path.join(runs[name], f"tools_{mode}_answers.jsonl"))
                         for mode in ("with", "alone")}
        for mode in ("with", "alone"):
            print(f"{name} tools ({mode}): {results[name][mode]['overall']:.1%} of {results[name][mode]['n']}")
        with open(results[name]["with"]["out_path"], encoding="utf-8") as f:
            answered = [json.loads(line) for line in f]
        results[name]["samples"] = [next(r for r in answered if r["category"] == category)
                                    for category in ("tool_mul", "tool_div", "direct_people", "direct_arith")
                                    if any(r["category"] == category for r in answered)]
    return results


def tool_rates(scores):
    """From one model's tool scores: {category: (alone, with, share of questions answered with a call)}, and the
    share of replies with a call that were well formed (parsed, declared tool, valid arguments)."""
    alone, with_tools = scores["alone"]["per_category"], scores["with"]["per_category"]
    called = scores["with"]["tools"]["called"]
    rates = {category: (alone[category][2], with_tools[category][2], called[category][0] / called[category][1])
             for category in with_tools}
    tools = scores["with"]["tools"]
    return rates, tools["well_formed"] / max(1, tools["attempts"])


def tool_card(results):
    """The report card's line for tool calling, on the final model (none when tools were not evaluated)."""
    if "tools" not in results:
        return []
    rates, well_formed = tool_rates(results["tools"][CHAT_STAGES[-1]])
    direct = [c for c in rates if c.startswith("direct_")]
    return [f"- **Tools** ({CHAT_STAGES[-1]}, the calculator declared): held-out 3-digit products {rates['tool_mul'][0]:.1%} "
            f"alone → {rates['tool_mul'][1]:.1%} with the tool loop, quotients {rates['tool_div'][0]:.1%} → "
            f"{rates['tool_div'][1]:.1%}; calls well formed {well_formed:.1%}; questions that need no tool: no call "
            + ", ".join(f"{1 - rates[c][2]:.1%}" for c in direct) + " (" + ", ".join(direct) + "), accuracy alone "
            "→ with the tools declared " + ", ".join(f"{rates[c][0]:.1%} → {rates[c][1]:.1%}" for c in direct)]


def tool_report(results):
    """The report's tool section: a row per model and category, and sample transcripts."""
    if "tools" not in results:
        return []
    lines = ["## Tool calling (the calculator)", "",
             "eval_tools.jsonl: products and quotients of two 3-digit numbers that appear in no training file "
             "(tool_mul, tool_div), and questions that need no tool (direct_people: held-out people; direct_arith: "
             "held-out sums), all with the calculator declared. alone = the same questions without the tools "
             "(the model answers alone); with = the tool loop (call → result → answer, up to 3 replies). Correct = "
             "the gold answer in the first line of the final answer.", "",
             "| model | category | alone | with the tool loop | answered with a call |", "|---|---|---|---|---|"]
    for name, scores in results["tools"].items():
        rates, well_formed = tool_rates(scores)
        for category, (alone, with_tools, called) in rates.items():
            lines.append(f"| {name} | {category} | {alone:.1%} | {with_tools:.1%} | {called:.1%} |")
        tools = scores["with"]["tools"]
        lines.append(f"| {name} | replies with a call: well formed | | {well_formed:.1%} ({tools['well_formed']}/"
                     f"{tools['attempts']}, {tools['format_errors']} format errors) | |")
    lines += ["", f"Sample transcripts ({CHAT_STAGES[-1]}, with the tool loop):", ""]
    for record in results["tools"][CHAT_STAGES[-1]]["samples"]:
        turns = [f"user: {record['messages'][-1]['content']}"]
        for message in record["transcript"]:
            if message.get("tool_calls"):
                turns += [f"call: `{json.dumps(c['function'], ensure_ascii=False)}`" for c in message["tool_calls"]]
            else:
                turns.append(f"{'tool' if message['role'] == 'tool' else 'assistant'}: {message['content']}")
        lines.append(f"- {' → '.join(turns)}  (gold: {record['answer']}, {'right' if record['correct'] else 'wrong'})")
    return lines + [""]


def score_preference_pairs(runs, path, beta):
    """DPO's reward accuracy and mean margin on held-out preference pairs, with the log-prob code 4-dpo.py trains
    with: reward = beta * (log pi(answer) - log ref(answer)), pi = the DPO model, ref = its starting model."""
    import torch

    from model.dataset import DPODataset
    from model.dpo import policy_logps
    from model.evaluate import load_checkpoint

    logps = {}
    for name in ("sft_multi", "dpo"):
        model, tokenizer, _ = load_checkpoint(runs[name], device="cpu", dtype="float32")
        dataset = DPODataset(path, tokenizer, model.config.max_seq_len)
        batch = dataset.collate([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            logps[name] = policy_logps(model, batch)
    chosen = beta * (logps["dpo"][0] - logps["sft_multi"][0])
    rejected = beta * (logps["dpo"][1] - logps["sft_multi"][1])
    margin = chosen - rejected
    return {"n": len(margin), "reward_accuracy": (margin > 0).float().mean().item(),
            "reward_margin": margin.mean().item(), "path": path}


def score_rl_task(runs, path, limit):
    """The RL task before (DPO) and after (GRPO): greedy accuracy on the held-out checks, pass@1 and pass@8 of
    samples at temperature 1 (both by eval_chat's rule: the gold, here the worked answer, in the first line), and the
    share of repeated n-grams in the greedy answers to every chat check (it must not grow)."""
    import torch

    from model.chat import encode_chat
    from model.evaluate import first_line, load_checkpoint, read_eval_file, score_eval_file
    from model.grpo import sample_groups, sample_seed
    from model.rewards import repeated_ngram_share

    scores = {}
    for name in ("dpo", "grpo"):
        model, tokenizer, _ = load_checkpoint(runs[name])
        subset = sample_lines(path, limit, runs[name])
        greedy = score_eval_file(model, tokenizer, subset, "chat", max_new_tokens=24,
                                 out_path=os.path.join(runs[name], "rl_answers.jsonl"))
        records, _ = read_eval_file(subset, "chat")
        hits = []
        for start in range(0, len(records), 32):
            batch = records[start:start + 32]
            with torch.no_grad():
                out = sample_groups(model, [encode_chat(tokenizer, r["messages"]) for r in batch], RL_SAMPLES, 24, 1.0,
                                    tokenizer.eos_token_id, tokenizer.pad_token_id or 0,
                                    [sample_seed(0, 0, start + i) for i in range(len(batch))])
            for row, (ids, mask) in enumerate(zip(out["completion_ids"].tolist(), out["completion_mask"].tolist())):
                text = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
                hits.append(float(batch[row // RL_SAMPLES]["answer"] in first_line(text)))
        hits = torch.tensor(hits).view(-1, RL_SAMPLES)
        with open(os.path.join(runs[name], "chat_answers.jsonl"), encoding="utf-8") as f:
            answers = [json.loads(line)["generated"] for line in f]
        scores[name] = {"greedy": greedy["overall"], "pass@1": hits.mean().item(),
                        "pass@8": (hits.max(dim=1).values > 0).float().mean().item(), "n": len(records),
                        "repeated_ngrams": sum(map(repeated_ngram_share, answers)) / max(1, len(answers))}
    return scores


def sample_lines(path, limit, out_dir):
    """The eval file itself, or (for --quick) a copy of `limit` evenly spaced lines, so every category is in it."""
    if not limit:
        return path
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    subset = os.path.join(out_dir, os.path.basename(path))
    with open(subset, "w", encoding="utf-8") as f:
        f.writelines(lines[i * len(lines) // limit] for i in range(min(limit, len(lines))))
    return subset


def final_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return (train[-1] if train else None), (val[-1] if val else None)


def stage_card(results):
    """One line per stage: the held-out number it moved, before (the previous stage's model) -> after."""
    def acc(key, category):
        entry = results[key]["per_category"].get(category)
        return f"{entry[2]:.1%}" if entry else "n/a"  # 200 questions: steps of 0.5

    def moved(category, before, after):
        return f"{category} {acc(before, category)} → {acc(after, category)}"
    pairs = results["dpo_heldout_pairs"]
    return [
        f"- **pretrain**: completes held-out people's facts {acc('pretrain', 'completion_fact')} and held-out sums "
        f"{acc('pretrain', 'arith_completion')} (chance: ~7% / ~0%)",
        f"- **SFT single** (chat format, pretrained → SFT): {moved('people_qa', 'pretrain_chat', 'sft_single')}, "
        f"{moved('arith', 'pretrain_chat', 'sft_single')}",
        f"- **SFT multi** (他/她 follow-ups, a new question later in a conversation): "
        f"{moved('people_qa_followup', 'sft_single', 'sft_multi')}, "
        f"{moved('arith_multiturn', 'sft_single', 'sft_multi')}",
        f"- **DPO**: {moved('unknown_person_refusal', 'sft_multi', 'dpo')}, known people "
        f"{moved('people_qa', 'sft_multi', 'dpo')}; held-out pairs: reward accuracy {pairs['reward_accuracy']:.0%}, "
        f"margin {pairs['reward_margin']:.2f}",
    ] + rl_card(results)


def rl_card(results):
    """GRPO's line: the RL task before -> after, and how far the other categories moved, the largest drop first
    (the 2-point rule is about drops; a gain is no cost)."""
    if "rl" not in results or "grpo" not in results:
        return []
    rl = results["rl"]
    before, after = results["dpo"]["per_category"], results["grpo"]["per_category"]
    moves = {c: after[c][2] - before[c][2] for c in before if c in after}
    worst, best = min(moves, key=moves.get), max(moves, key=moves.get)
    return [f"- **GRPO**: sums in new phrasings (arith_rl) {rl['dpo']['greedy']:.1%} → {rl['grpo']['greedy']:.1%} "
            f"(sampled pass@1 {rl['dpo']['pass@1']:.1%} → {rl['grpo']['pass@1']:.1%}, pass@{RL_SAMPLES} "
            f"{rl['dpo']['pass@8']:.1%} → {rl['grpo']['pass@8']:.1%}); the other categories against DPO: from "
            f"{moves[worst] * 100:+.1f} points ({worst}) to {moves[best] * 100:+.1f} ({best}); repeated n-grams "
            f"{rl['dpo']['repeated_ngrams']:.3f} → {rl['grpo']['repeated_ngrams']:.3f}"]


def lora_comparison(runs, results, times, peak_rss):
    """Full vs LoRA per stage: parameters trained, speed, peak memory (the stage process's ru_maxrss), accuracy."""
    import math
    from safetensors import safe_open
    lines = ["", "## LoRA vs full fine-tuning", "", "Same pretrained model, data and steps; LoRA " +
             " ".join(LORA["flags"]) + " on wq wk wv wo w1 w2 w3. tokens/s: mean training throughput from "
             "metrics.jsonl; peak RSS: the stage process's maximum resident memory.", "",
             "| stage | run | trained params | share of the model | wall time | tokens/s | peak RSS | held-out chat |",
             "|---|---|---|---|---|---|---|---|"]

    def n_params(path):  # from the file header, without loading the tensors
        with safe_open(path, "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    n_base = n_params(os.path.join(runs["pretrain"], "model.safetensors"))
    for stage in LORA_STAGES:
        for name in (stage, f"{stage}_lora"):
            n_train = n_params(os.path.join(runs[name], "adapter_model.safetensors")) if name.endswith("_lora") \
                else n_base
            with open(os.path.join(runs[name], "metrics.jsonl")) as f:
                speeds = [r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r]
            lines.append(f"| {stage} | {'LoRA' if name.endswith('_lora') else 'full'} | {n_train:,} | "
                         f"{n_train / n_base:.1%} | {times[name]:.0f} s | {sum(speeds) / max(1, len(speeds)):.0f} | "
                         f"{peak_rss.get(name, 0):.0f} MiB | {results[name]['overall']:.1%} |")
    return lines


def write_report(out, plan, runs, results, times, total, peak_rss=None):
    lines = ["# nano-LLM demo report", "",
             f"Total wall time: **{total / 60:.1f} min** ({os.cpu_count()} CPU cores visible).", "",
             "## Config", "", "```", "model: " + " ".join(plan["model"])]
    lines += [f"{stage}: " + " ".join(plan[stage]) for stage in STAGES]
    lines += ["```", "", "## Stages", "", "| stage | wall time | final train loss | final val loss |", "|---|---|---|---|"]
    for name, seconds in times.items():
        train, val = final_losses(runs[name]) if name in runs else (None, None)
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {seconds:.0f} s | {fmt(train)} | {fmt(val)} |")
    lines += ["", "## What each stage added", ""] + stage_card(results) + tool_card(results) + [""]
    lines += ["## Held-out accuracy", "",
              "Questions about people whose facts appear only in pretraining text, about people who do not exist "
              "(unknown_person_refusal: correct = the answer refuses, 我不知道…), and arithmetic on number pairs "
              "that appear in no training file. Correct = the gold answer appears in the first line of the greedy "
              "output. `pretrain (chat)` is the pretrained model asked the chat questions.", "",
              "| model | category | correct | accuracy |", "|---|---|---|---|"]
    for key in [k for k in dict.fromkeys(("pretrain", "pretrain_chat", *runs)) if k in results]:  # each model once
        for category, (correct, n, accuracy) in sorted(results[key]["per_category"].items()):
            lines.append(f"| {key.replace('_chat', ' (chat)')} | {category} | {correct}/{n} | {accuracy:.1%} |")
    pairs = results["dpo_heldout_pairs"]
    lines += ["", f"DPO on {pairs['n']} held-out preference pairs ({os.path.basename(pairs['path'])}: names of people "
              "who do not exist, refusal over an invented answer; held-out people, true fact over a refusal), scored "
              f"with 4-dpo.py's log-probs against the sft_multi model: reward accuracy {pairs['reward_accuracy']:.1%}, "
              f"mean reward margin {pairs['reward_margin']:.3f}.", "", "## Loss curves", ""]
    lines += [f"![{name}]({os.path.relpath(os.path.join(runs[name], 'loss.png'), out)})" for name in runs]
    if os.path.exists(os.path.join(runs.get("grpo", ""), "reward.png")):  # RL: reward, length, shares, time
        lines += [f"![grpo rewards]({os.path.relpath(os.path.join(runs['grpo'], 'reward.png'), out)})"]
    lines += [""] + tool_report(results)
    if "dpo_lora" in runs:
        lines += lora_comparison(runs, results, times, peak_rss or {})
    lines += ["", f"## Sample chats ({CHAT_STAGES[-1]} model)", ""]
    for messages, reply, answer in results["samples"]:
        turns = " / ".join(f"{m['role']}: {m['content']}" for m in messages)
        lines.append(f"- {turns}\n  - **assistant:** {reply}  (gold: {answer})")
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


if __name__ == "__main__":
    main()
