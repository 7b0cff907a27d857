"""
What the evaluation scripts share (0-eval_pretrain.py, 2-eval.py, eval_ceval.py, demo.py): loading a checkpoint
with its tokenizer, encoding prompts, batched greedy generation, scoring an eval JSONL, trimming chat history,
perplexity on the packed validation split.

Public API (stable; demo.py imports it):

    load_checkpoint(checkpoint=None, stages=CHAT_STAGES, device="auto", dtype="auto", tokenizer_dir=None,
                    root="out") -> (model, tokenizer, checkpoint_dir)
        checkpoint None = the newest run of the first stage in `stages` that has one (model.stages.find_newest:
        out/<stage>_<dim>, or out/*/<stage> as make demo writes); stages: model.stages.CHAT_STAGES / PRETRAIN_STAGES.
        A LoRA run directory (adapter + lora_base.json) loads as its checked base with the adapter merged in.
        Tokenizer: tokenizer_dir, else the checkpoint's own copy, else model/tokenizer/ (checked against
        vocab_size). Model in eval mode on `device` (auto: cuda > mps > cpu) in `dtype` (auto: bfloat16 on CUDA
        when supported, else float32). Every problem a user can cause raises model.errors.StageError.
    resolve_checkpoint(checkpoint=None, stages=CHAT_STAGES, root="out") -> checkpoint_dir   (same rule, no loading)

    score_eval_file(model, tokenizer, path, mode, max_new_tokens=64, out_path=None, batch_size=64,
                    temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, use_tools=True,
                    max_rounds=3) -> dict
        mode "chat":       record {"category", "messages": [{"role", "content"}, ...] (last one the user's), "answer"}
                           rendered with tokenizer.apply_chat_template(add_generation_prompt=True)
                           + optional "tools": [function descriptions]: the record goes through the tool loop
                           (model/tools.py: call -> result -> answer, the registry's tools run); the answer
                           scored is the final reply. use_tools=False asks without them (the model alone).
        mode "completion": record {"category", "prompt", "answer"}, encoded as <s> + prompt
        Greedy by default. Correct iff `answer` is a substring of the first line of the generated text (for a
        completion: of its first sentence, up to the first "。")
        (generation of a row stops at </s> or at its first newline). Returns
            {"overall": accuracy, "per_category": {category: (correct, total, accuracy)}, "n": scored records,
             "n_correct": int, "n_bad": unusable lines (reported on stderr as file:line: reason), "out_path": str,
             "tools": None, or for records run with tools {"called": {category: (replies with a call, total)},
                      "attempts": replies with <tool_call>, "well_formed": those that parsed with every call
                      naming a declared tool with valid arguments, "format_errors": those that did not parse}}
        and writes one JSON line per record to out_path: the record + "line", "generated", "first_line", "correct"
        (+ "transcript", "tool_calls", "tool_results", "format_errors", "invalid_calls", "tool_attempts",
        "tool_well_formed" with tools).
        Default out_path: <checkpoint dir>/<eval file stem>.answers.jsonl (beside the eval file for a model that
        was not loaded from a directory).
    format_scores(scores) -> str                          the per-category table score_eval_file's result prints as

    perplexity(model, data_path, max_seq_len=None, batch_size=8, max_batches=None, doc_mask=False) -> dict
        {"ppl", "loss", "n_tokens", "path"} over the packed validation split (PretrainDataset.val_path(data_path)).
    add_common_args(parser) / sampling_kwargs(args, scoring) / read_prompts(path) / read_input(prompt) / run_cli(main)
        the command-line pieces 0-eval_pretrain.py and 2-eval.py share

Prompts are encoded by model/chat.py (the chat format's one home); generation is model/generate.py's. Scoring
runs in batches of 64 by default: on a CPU per-step overhead dominates small models, and greedy results are the
same either way (tests/test_eval.py checks it; docs/performance.md has the timings).
"""
import json
import math
import os
import sys

import torch

from . import fast_decode, lora
from .chat import DEFAULT_TOKENIZER_DIR, encode_chat, encode_completion, fit_context, load_tokenizer
from .checkpoint import load_init_model
from .errors import BadLines, StageError
from .generate import check_sampling, generate_batch
from .runtime import pick_device, inference_dtype, run_stage
from .stages import CHAT_STAGES, find_newest, searched

MODES = ("chat", "completion")
REPORT_LIMIT = 20  # bad lines printed per file; all are counted


# ----------------------------------------------------------------------------------------------------------
# loading

def load_for_cli(args, stages):
    """load_checkpoint from the eval scripts' shared flags, say what was loaded (stderr), seed the sampling."""
    fast_decode.set_mode(args.fast_decode)
    model, tokenizer, checkpoint = load_checkpoint(args.checkpoint, stages, args.device, args.dtype,
                                                   args.tokenizer_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint {checkpoint}: {n_params / 1e6:.2f}M parameters, context {model.config.max_seq_len} tokens",
          file=sys.stderr)
    torch.manual_seed(args.seed)
    return model, tokenizer, checkpoint


def resolve_checkpoint(checkpoint=None, stages=CHAT_STAGES, root="out") -> str:
    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise StageError(f"checkpoint directory not found: {checkpoint}")
        if not os.path.isfile(os.path.join(checkpoint, "model.safetensors")) and not lora.is_adapter_dir(checkpoint):
            raise StageError(f"no model.safetensors in {checkpoint}: not a checkpoint directory "
                             f"(pass a run directory such as out/pretrain_512)")
        return checkpoint
    found = find_newest(stages, root)
    if found is None:
        raise StageError(f"no checkpoint found ({searched(stages, root)}): train one first or pass --checkpoint DIR")
    return found


def load_checkpoint(checkpoint=None, stages=CHAT_STAGES, device="auto", dtype="auto", tokenizer_dir=None,
                    root="out"):
    """-> (model, tokenizer, checkpoint_dir); see the module docstring."""
    from .model import Transformer

    path = resolve_checkpoint(checkpoint, stages, root)
    try:
        model = load_init_model(path, {}) if lora.is_adapter_dir(path) else Transformer.from_pretrained(path)
    except (OSError, ValueError) as err:  # missing/invalid config.json, tensors that do not fit the config
        raise StageError(f"cannot load checkpoint {path}: {err}") from None
    if tokenizer_dir is None:
        tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else DEFAULT_TOKENIZER_DIR
    tokenizer = load_tokenizer(tokenizer_dir, model.config.vocab_size)
    try:
        device = pick_device(device)
        model = model.to(device=device, dtype=inference_dtype(dtype, device)).eval()
    except (RuntimeError, AssertionError) as err:  # e.g. --device cuda on a machine without CUDA
        raise StageError(f"cannot put the model on device {device}: {err}") from None
    model.checkpoint_dir = path
    return model, tokenizer, path


# ----------------------------------------------------------------------------------------------------------
# eval files

def first_line(text: str, mode: str = "chat") -> str:
    """What is scored: the first line; for a completion only up to its first "。", because a pretrained model
    runs on into the next sentence of a biography, which could name the right value by chance."""
    line = text.split("\n", 1)[0]
    if mode == "completion" and "。" in line:
        line = line[:line.index("。") + 1]
    return line


def _check_record(record, mode):
    """The reason a parsed line cannot be scored, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "'tools' is not a list of function descriptions"
    if not isinstance(record.get("answer"), str) or not record["answer"]:
        return "missing or empty string field 'answer'"
    if not isinstance(record.get("category", ""), str):
        return "'category' is not a string"
    if mode == "completion":
        if not isinstance(record.get("prompt"), str) or not record["prompt"]:
            return "missing or empty string field 'prompt'"
        return None
    messages = record.get("messages")
    if messages is None and isinstance(record.get("prompt"), str):
        return None  # a bare question is one user turn
    if not isinstance(messages, list) or not messages:
        return "missing field 'messages' (a non-empty list of {role, content}), or 'prompt'"
    for k, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return f"messages[{k}] is not a {{\"role\": str, \"content\": str}} object"
    if messages[-1]["role"] != "user":
        return f"the last message is the {messages[-1]['role']}'s; it must be the user's question"
    return None


def read_eval_file(path, mode):
    """-> (records, n_bad). Each record gets its 1-based "line"; bad lines are reported on stderr and counted."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not os.path.isfile(path):
        raise StageError(f"eval file not found: {path}")
    records, bad = [], BadLines(REPORT_LIMIT)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                reason = _check_record(record, mode)
            except UnicodeDecodeError:
                reason = "invalid UTF-8"
            except json.JSONDecodeError as err:
                reason = f"invalid JSON ({err.msg} at column {err.colno})"
            bad.total += 1
            if reason:
                bad.add(path, line_no, reason)
                continue
            records.append({**record, "line": line_no})
    n_bad = bad.count
    if n_bad > REPORT_LIMIT:
        print(f"{path}: ... {n_bad - REPORT_LIMIT} more bad lines not shown", file=sys.stderr)
    if not records:
        raise StageError(f"{path}: no usable {mode} records ({n_bad} bad lines): expected JSONL with "
                         + ("'prompt' and 'answer'" if mode == "completion" else "'messages' and 'answer'"))
    return records, n_bad


def default_answers_path(model, eval_path):
    stem = os.path.splitext(os.path.basename(eval_path))[0]
    directory = getattr(model, "checkpoint_dir", None) or getattr(model, "name_or_path", None)
    if not directory or not os.path.isdir(directory):
        directory = os.path.dirname(os.path.abspath(eval_path))
    return os.path.join(directory, f"{stem}.answers.jsonl")


def score_eval_file(model, tokenizer, path, mode, max_new_tokens=64, out_path=None, batch_size=64,
                    temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, use_tools=True, max_rounds=3):
    """Generate an answer for every record of an eval JSONL and score it; see the module docstring."""
    records, n_bad = read_eval_file(path, mode)
    sampling = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, top_k=top_k,
                    top_p=top_p, repetition_penalty=repetition_penalty)
    messages = lambda r: r.get("messages") or [{"role": "user", "content": r["prompt"]}]  # noqa: E731
    looped = [k for k, r in enumerate(records) if mode == "chat" and use_tools and r.get("tools")]
    alone = sorted(set(range(len(records))) - set(looped))
    texts, extra = [None] * len(records), [{} for _ in records]
    if mode == "completion":
        prompts = [encode_completion(tokenizer, records[k]["prompt"]) for k in alone]
    else:
        prompts = [encode_chat(tokenizer, messages(records[k])) for k in alone]
    for k, text in zip(alone, generate_batch(model, tokenizer, prompts, **sampling)):
        texts[k] = text
    if looped:
        from .tools import run_tool_loop
        runs = run_tool_loop(tokenizer, tool_generator(model, tokenizer, **sampling),
                             [messages(records[k]) for k in looped], [records[k]["tools"] for k in looped],
                             max_rounds=max_rounds)
        for k, run in zip(looped, runs):
            texts[k] = run.answer
            extra[k] = {"transcript": run.messages[len(messages(records[k])):], "tool_calls": run.calls,
                        "tool_results": [result.content for result in run.results],
                        "format_errors": run.format_errors, "invalid_calls": run.invalid,
                        "tool_attempts": run.attempts, "tool_well_formed": run.well_formed}
    out_path = out_path or default_answers_path(model, path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    per_category, called = {}, {}
    tools = {"attempts": 0, "well_formed": 0, "format_errors": 0} if looped else None
    with open(out_path + ".tmp", "w", encoding="utf-8") as f:
        for k, (record, text) in enumerate(zip(records, texts)):
            line = first_line(text, mode)
            correct = record["answer"] in line
            category = record.get("category") or "all"
            counts = per_category.setdefault(category, [0, 0])
            counts[0] += correct
            counts[1] += 1
            if extra[k]:
                made = called.setdefault(category, [0, 0])
                made[0] += extra[k]["tool_attempts"] > 0
                made[1] += 1
                for key in ("attempts", "well_formed"):
                    tools[key] += extra[k][f"tool_{key}"]
                tools["format_errors"] += len(extra[k]["format_errors"])
            f.write(json.dumps({**record, "generated": text, "first_line": line, "correct": correct, **extra[k]},
                               ensure_ascii=False) + "\n")
    os.replace(out_path + ".tmp", out_path)
    n_correct = sum(c for c, _ in per_category.values())
    if tools is not None:
        tools["called"] = {k: tuple(v) for k, v in called.items()}
    return {"overall": n_correct / len(records),
            "per_category": {k: (c, t, c / t) for k, (c, t) in per_category.items()},
            "n": len(records), "n_correct": n_correct, "n_bad": n_bad, "out_path": out_path, "tools": tools}


def tool_generator(model, tokenizer, max_new_tokens=64, batch_size=64, **sampling):
    """generate() for the tool loop: batched replies up to </s> (a call spans lines), each prompt cut from the
    front to leave room for max_new_tokens inside the model's context (chat.fit_context)."""
    def generate(prompts):
        fitted = [fit_context(ids, max_new_tokens, model.config.max_seq_len) for ids in prompts]
        return generate_batch(model, tokenizer, [ids for ids, _ in fitted],
                              max_new_tokens=min(n for _, n in fitted), batch_size=batch_size, stop_at_newline=False,
                              **sampling)
    return generate


def format_scores(scores) -> str:
    width = max(len("overall"), *(len(k) for k in scores["per_category"]))
    lines = [f"{'category':<{width}}  correct  total  accuracy"]
    for category, (correct, total, accuracy) in scores["per_category"].items():
        lines.append(f"{category:<{width}}  {correct:>7}  {total:>5}  {accuracy:>8.2%}")
    lines.append(f"{'overall':<{width}}  {scores['n_correct']:>7}  {scores['n']:>5}  {scores['overall']:>8.2%}")
    tools = scores.get("tools")
    if tools:
        lines.append("tool calls: " + ", ".join(f"{category} {made}/{total}" for category, (made, total)
                                               in tools["called"].items()) + " questions answered with a call")
        lines.append(f"replies with a call: {tools['attempts']}, well formed (parsed, declared tool, valid "
                     f"arguments) {tools['well_formed']}, format errors {tools['format_errors']}")
    if scores.get("n_bad"):
        lines.append(f"({scores['n_bad']} unusable lines skipped, listed above)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# perplexity

@torch.no_grad()
def perplexity(model, data_path, max_seq_len=None, batch_size=8, max_batches=None, doc_mask=False):
    """exp(mean next-token loss) over the validation split of a packed token file; see the module docstring."""
    from .dataset import PretrainDataset

    val_path = PretrainDataset.val_path(data_path)
    if not os.path.isfile(val_path):
        raise StageError(f"no validation split {val_path} (written by `python data_process.py pretrain "
                         f"--data_path <file.jsonl>` unless --val_ratio 0); pass --data_path <packed .bin>")
    seq_len = max_seq_len or model.config.max_seq_len
    try:
        dataset = PretrainDataset(val_path, seq_len, doc_mask=doc_mask)
    except (OSError, ValueError) as err:
        raise StageError(str(err)) from None
    if dataset.vocab_size > model.config.vocab_size:
        raise StageError(f"{val_path} was tokenized with a {dataset.vocab_size}-token vocabulary but the model "
                         f"has vocab_size {model.config.vocab_size}")
    device = next(model.parameters()).device
    total, n_tokens = 0.0, 0
    n_rows = len(dataset) if not max_batches else min(len(dataset), max_batches * batch_size)
    for start in range(0, n_rows, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n_rows))]
        batch = {k: torch.stack([item[k] for item in items]).to(device) for k in items[0]}
        count = int((batch["shift_labels"] != -100).sum())
        total += model(**batch).loss.float().item() * count
        n_tokens += count
    loss = total / max(1, n_tokens)
    return {"ppl": math.exp(loss), "loss": loss, "n_tokens": n_tokens, "path": val_path}


# ----------------------------------------------------------------------------------------------------------
# command line pieces shared by 0-eval_pretrain.py and 2-eval.py

GENERATION_DEFAULTS = dict(temperature=0.85, top_p=0.85, max_new_tokens=256)
SCORING_DEFAULTS = dict(temperature=0.0, top_p=None, max_new_tokens=64)


def add_common_args(parser):
    a = parser.add_argument
    a("--checkpoint", default=None, help="checkpoint directory (default: the newest, see above)")
    a("--tokenizer_dir", default=None, help="tokenizer directory (default: the checkpoint's copy, else model/tokenizer)")
    a("--device", default="auto", help="auto (cuda > mps > cpu), or e.g. cuda:0, cpu")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="weights precision; auto = bfloat16 on CUDA (float16 without bf16), float32 elsewhere")
    a("--prompts", default=None, help="text file, one prompt per line (default: the built-in list)")
    a("--interactive", action="store_true", help="read prompts from the terminal; Ctrl-D or Ctrl-C quits")
    a("--max_new_tokens", type=int, default=None,
      help=f"tokens to generate per answer (default: {GENERATION_DEFAULTS['max_new_tokens']}, "
           f"{SCORING_DEFAULTS['max_new_tokens']} with --eval_file); capped by the model's context length")
    a("--temperature", type=float, default=None,
      help=f"sampling temperature, 0 = greedy (default: {GENERATION_DEFAULTS['temperature']}, 0 with --eval_file)")
    a("--top_k", type=int, default=None, help="sample only among the k most likely tokens (default: off)")
    a("--top_p", type=float, default=None,
      help=f"nucleus sampling threshold (default: {GENERATION_DEFAULTS['top_p']}, off with --eval_file)")
    a("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating tokens (1 = off)")
    a("--seed", type=int, default=1337, help="random seed for sampling")
    a("--eval_file", default=None,
      help="score this JSONL of questions with gold answers instead of free generation (accuracy per category)")
    a("--answers_out", default=None,
      help="where --eval_file writes every answer (default: <checkpoint>/<eval file name>.answers.jsonl)")
    a("--batch_size", type=int, default=64,
      help="rows per batch for --eval_file (and --ppl in 0-eval_pretrain.py) (default: 64)")
    fast_decode.add_arg(parser)


def sampling_kwargs(args, scoring: bool) -> dict:
    """Generation settings from the flags; unset flags take the free-generation or the scoring default."""
    defaults = SCORING_DEFAULTS if scoring else GENERATION_DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    if pick("max_new_tokens") < 1:
        raise StageError(f"--max_new_tokens must be >= 1, not {args.max_new_tokens}")
    settings = dict(temperature=pick("temperature"), top_k=args.top_k, top_p=pick("top_p"),
                    repetition_penalty=args.repetition_penalty)
    try:
        check_sampling(**settings)
    except ValueError as err:
        raise StageError(f"--{err}") from None
    return dict(settings, max_new_tokens=pick("max_new_tokens"))


def read_prompts(path) -> list:
    """Non-empty lines of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise StageError(f"prompts file not found: {path}") from None
    except (UnicodeDecodeError, OSError) as err:
        raise StageError(f"cannot read prompts file {path}: {err}") from None
    if not prompts:
        raise StageError(f"{path}: no prompts (one per line)")
    return prompts


def read_input(prompt: str):
    """One line from the terminal, or None when the user quits (Ctrl-D / end of input, Ctrl-C)."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def run_cli(main):
    """model.runtime.run_stage (StageError -> one line, exit 1), and also: Ctrl-C outside the interactive prompt
    stops quietly (exit 130); a closed pipe (`... | head`) ends the output without a traceback."""
    try:
        run_stage(main)
    except KeyboardInterrupt:
        print()
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(0)
