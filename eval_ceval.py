"""
Multiple-choice accuracy on C-Eval (or CMMLU, or any folder of such CSVs): the model's choice is whichever of the
tokens "A", "B", "C", "D" it finds most likely right after the (chat-templated) question.

Run as:
    python eval_ceval.py --data_dir dataset/ceval                          # C-Eval val split, zero-shot
    python eval_ceval.py --data_dir dataset/ceval --shots 5                # 5 solved examples from dev/ first
    python eval_ceval.py --data_dir dataset/cmmlu --split test --shots 5   # CMMLU
    python eval_ceval.py --checkpoint out/pretrain_512 --no_chat_template  # a pretrained (not chat) model

Download the data yourself and unpack it under dataset/ (nothing is fetched here):
    C-Eval (https://huggingface.co/datasets/ceval/ceval-exam, ceval-exam.zip)
        dataset/ceval/val/computer_network_val.csv    id,question,A,B,C,D,answer[,explanation]   <- scored
        dataset/ceval/dev/computer_network_dev.csv    same columns, 5 solved examples per subject (--shots)
        dataset/ceval/subject_mapping.json            optional: {"computer_network": ["Computer Network",
                                                      "计算机网络", "STEM"], ...} gives Chinese names and categories
      (C-Eval's test/ split has no answers: score val.)
    CMMLU (https://huggingface.co/datasets/haonan-li/cmmlu)
        dataset/cmmlu/test/agronomy.csv               ,Question,A,B,C,D,Answer                    <- --split test
        dataset/cmmlu/dev/agronomy.csv                same columns
Files are <data_dir>/<split>/<subject>[_<split>].csv (or CSVs directly in --data_dir); the few-shot examples of a
subject are the first rows of <data_dir>/dev/<subject>[_dev].csv. Column names are matched case-insensitively;
other columns (id, explanation) are ignored.

Prompt (C-Eval's wording), one user message; with --shots K the K examples come first as user/assistant turns:
    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n{question}\\nA. …\\nB. …\\nC. …\\nD. …\\n答案：
When a prompt does not fit in the model's context, examples are dropped, then the question is cut from the front
(counted as "truncated"). A row that cannot be used (wrong number of columns, empty question, answer not A-D) is
reported as file:line and counted; it does not stop the run.
Output: per-subject and overall accuracy (micro: all questions; average: mean over subjects), and a results CSV
(default <checkpoint>/<data dir name>_<split>_<K>shot.csv).
"""
import argparse
import csv
import glob
import json
import os
import sys

import torch

from model import evaluate, generate, stages
from model.chat import encode_chat, encode_completion, encode_texts
from model.errors import BadLines, StageError

CHOICES = ("A", "B", "C", "D")
REQUIRED = ("question", "a", "b", "c", "d", "answer")
REPORT_LIMIT = 20


# ----------------------------------------------------------------------------------------------------------
# reading the CSVs

def read_questions(path, bad: BadLines):
    """-> list of {"question", "A".."D", "answer", "line"} from one CSV; bad rows go to `bad`."""
    questions = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                bad.add(path, 1, "empty file")
                return []
            columns = {name.strip().lower(): k for k, name in enumerate(header)}
            missing = [name for name in REQUIRED if name not in columns]
            if missing:
                bad.add(path, 1, f"header {header} lacks column(s) {', '.join(missing)} "
                                 f"(expected id,question,A,B,C,D,answer or ,Question,A,B,C,D,Answer)")
                return []
            line = reader.line_num
            for row in reader:
                start, line = line + 1, reader.line_num  # a quoted field may span several lines
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    bad.add(path, start, f"{len(row)} columns, the header has {len(header)}")
                    continue
                item = {name: row[columns[name]].strip() for name in REQUIRED}
                answer = item.pop("answer").upper()
                if not item["question"]:
                    bad.add(path, start, "empty question")
                elif answer not in CHOICES:
                    bad.add(path, start, f"answer {row[columns['answer']]!r} is not one of A, B, C, D")
                else:
                    questions.append({"question": item["question"], **{c: item[c.lower()] for c in CHOICES},
                                      "answer": answer, "line": start})
    except UnicodeDecodeError:
        bad.add(path, 1, "not UTF-8 text")
        return []
    except csv.Error as err:
        bad.add(path, reader.line_num, f"unreadable CSV ({err})")
    return questions


def find_subjects(data_dir, split):
    """-> sorted list of (subject, path of the scored CSV)."""
    if not os.path.isdir(data_dir):
        raise StageError(f"data folder not found: {data_dir} (download C-Eval or CMMLU and unpack it there; "
                         f"see `python eval_ceval.py --help`)")
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        folder = data_dir
    paths = sorted(glob.glob(os.path.join(folder, "*.csv")))
    if not paths:
        raise StageError(f"no CSV files in {os.path.join(data_dir, split)} or {data_dir} (expected "
                         f"{data_dir}/{split}/<subject>_{split}.csv; see `python eval_ceval.py --help`)")
    subjects = []
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        subjects.append((name[:-len(split) - 1] if name.endswith("_" + split) else name, path))
    return subjects


def dev_path(data_dir, subject):
    for name in (f"{subject}_dev.csv", f"{subject}.csv"):
        path = os.path.join(data_dir, "dev", name)
        if os.path.isfile(path):
            return path
    return None


def subject_names(data_dir):
    """subject -> (Chinese name, category) from C-Eval's subject_mapping.json, when it is there."""
    path = os.path.join(data_dir, "subject_mapping.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
        return {k: (v[1], v[2]) for k, v in mapping.items() if isinstance(v, list) and len(v) >= 3}
    except (ValueError, OSError, AttributeError) as err:
        print(f"{path}: ignored ({err})", file=sys.stderr)
        return {}


# ----------------------------------------------------------------------------------------------------------
# prompts and scoring

def question_block(q):
    return f"{q['question']}\n" + "".join(f"{c}. {q[c]}\n" for c in CHOICES) + "答案："


def encode_prompt(tokenizer, q, shots, subject_name, chat=True):
    header = f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。\n\n"
    if not chat:
        text = header + "".join(question_block(s) + s["answer"] + "\n\n" for s in shots) + question_block(q)
        return encode_completion(tokenizer, text)
    messages = []
    for k, shot in enumerate(shots):
        messages += [{"role": "user", "content": (header if k == 0 else "") + question_block(shot)},
                     {"role": "assistant", "content": shot["answer"]}]
    messages.append({"role": "user", "content": ("" if shots else header) + question_block(q)})
    return encode_chat(tokenizer, messages)


def choice_token_ids(tokenizer):
    ids = []
    for c, encoded in zip(CHOICES, encode_texts(tokenizer, CHOICES)):
        if len(encoded) != 1:
            raise StageError(f"the tokenizer splits {c!r} into {len(encoded)} tokens; choice scoring needs one")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def predict(model, prompts, choice_ids, pad_id, batch_size):
    """Letter with the highest next-token logit after each prompt (token-id lists), batched with left padding."""
    device = next(model.parameters()).device
    picks = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = generate.left_pad([prompts[i] for i in rows], pad_id, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).logits[:, -1]
        best = logits[:, choice_ids].float().argmax(dim=-1).tolist()
        for r, i in enumerate(rows):
            picks[i] = CHOICES[best[r]]
    return picks


def score_folder(model, tokenizer, data_dir, split="val", shots=0, batch_size=8, chat=True, subjects=None):
    """Score every subject of a C-Eval-style folder. Returns {"subjects": {name: {"correct", "total", "accuracy",
    "bad_rows", "truncated", "category"}}, "n", "n_correct", "overall" (micro), "average" (mean over subjects),
    "bad_rows"}."""
    choice_ids = choice_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    names = subject_names(data_dir)
    max_len = model.config.max_seq_len
    found = find_subjects(data_dir, split)
    if subjects:
        unknown = sorted(set(subjects) - {name for name, _ in found})
        if unknown:
            raise StageError(f"no such subject(s) in {data_dir}: {', '.join(unknown)}")
        found = [(name, path) for name, path in found if name in subjects]
    bad = BadLines(REPORT_LIMIT)
    results = {}
    for subject, path in found:
        bad_before = bad.count
        questions = read_questions(path, bad)
        examples = []
        if shots:
            dev = dev_path(data_dir, subject)
            if dev is None:
                print(f"{subject}: no dev/{subject}_dev.csv, zero-shot", file=sys.stderr)
            else:
                examples = read_questions(dev, bad)[:shots]
        subject_name, category = names.get(subject, (subject.replace("_", " "), ""))
        prompts, truncated = [], 0
        for q in questions:
            k = len(examples)
            ids = encode_prompt(tokenizer, q, examples, subject_name, chat)
            while len(ids) > max_len and k > 0:  # drop examples (the last ones first) until the prompt fits
                k -= 1
                ids = encode_prompt(tokenizer, q, examples[:k], subject_name, chat)
            if len(ids) > max_len:
                ids, truncated = ids[-max_len:], truncated + 1
            prompts.append(ids)
        picks = predict(model, prompts, choice_ids, pad_id, batch_size) if prompts else []
        correct = sum(pick == q["answer"] for pick, q in zip(picks, questions))
        results[subject] = {"correct": correct, "total": len(questions),
                            "accuracy": correct / len(questions) if questions else 0.0,
                            "bad_rows": bad.count - bad_before, "truncated": truncated, "category": category}
    if bad.count > REPORT_LIMIT:
        print(f"... {bad.count - REPORT_LIMIT} more bad rows not shown", file=sys.stderr)
    scored = [r for r in results.values() if r["total"]]
    n = sum(r["total"] for r in scored)
    if not n:
        raise StageError(f"no usable questions in {data_dir} ({bad.count} bad rows, listed above)")
    n_correct = sum(r["correct"] for r in scored)
    return {"subjects": results, "n": n, "n_correct": n_correct, "overall": n_correct / n,
            "average": sum(r["accuracy"] for r in scored) / len(scored), "bad_rows": bad.count}


def write_results(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "category", "correct", "total", "accuracy", "bad_rows", "truncated"])
        for subject, r in results["subjects"].items():
            writer.writerow([subject, r["category"], r["correct"], r["total"], f"{r['accuracy']:.4f}",
                             r["bad_rows"], r["truncated"]])
        writer.writerow(["overall", "", results["n_correct"], results["n"], f"{results['overall']:.4f}",
                         results["bad_rows"], sum(r["truncated"] for r in results["subjects"].values())])
        writer.writerow(["average", "", "", "", f"{results['average']:.4f}", "", ""])
    os.replace(path + ".tmp", path)


def format_results(results) -> str:
    width = max(len("overall (micro)"), *(len(s) for s in results["subjects"]))
    lines = [f"{'subject':<{width}}  correct  total  accuracy"]
    for subject, r in results["subjects"].items():
        note = f"  ({r['bad_rows']} bad rows)" if r["bad_rows"] else ""
        lines.append(f"{subject:<{width}}  {r['correct']:>7}  {r['total']:>5}  {r['accuracy']:>8.2%}{note}")
    lines.append(f"{'overall (micro)':<{width}}  {results['n_correct']:>7}  {results['n']:>5}  {results['overall']:>8.2%}")
    lines.append(f"{'average (macro)':<{width}}  {'':>7}  {'':>5}  {results['average']:>8.2%}")
    if results["bad_rows"]:
        lines.append(f"({results['bad_rows']} bad rows skipped, listed above)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="dataset/ceval", help="C-Eval-style folder (layout above)")
    parser.add_argument("--split", default="val", help="subfolder to score (C-Eval: val; CMMLU: test)")
    parser.add_argument("--shots", type=int, default=0, help="solved examples from dev/ before each question")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects to score (default: all)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory (default: the newest of out/dpo_*, out/sft_multi_*, out/sft_single_*, "
                             "also one folder down as in out/demo/dpo; with --no_chat_template the newest pretrain run)")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="tokenizer directory (default: the checkpoint's copy, else model/tokenizer)")
    parser.add_argument("--no_chat_template", action="store_true",
                        help="plain text prompt (<s> + text) instead of the chat template: for pretrained models")
    parser.add_argument("--batch_size", type=int, default=8, help="questions per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), or e.g. cuda:0, cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights precision; auto = bfloat16 on CUDA (float16 without bf16), float32 elsewhere")
    parser.add_argument("--out", default=None,
                        help="results CSV (default: <checkpoint>/<data dir name>_<split>_<shots>shot.csv)")
    args = parser.parse_args()
    if args.shots < 0 or args.batch_size < 1:
        raise StageError("--shots must be >= 0 and --batch_size >= 1")

    search = stages.PRETRAIN_STAGES if args.no_chat_template and not args.checkpoint else stages.CHAT_STAGES
    model, tokenizer, checkpoint = evaluate.load_checkpoint(args.checkpoint, search, args.device, args.dtype,
                                                            args.tokenizer_dir)
    print(f"checkpoint {checkpoint}, {args.data_dir} ({args.split}), {args.shots}-shot", file=sys.stderr)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    results = score_folder(model, tokenizer, args.data_dir, args.split, args.shots, args.batch_size,
                           chat=not args.no_chat_template, subjects=subjects)
    print(format_results(results))
    name = os.path.basename(os.path.normpath(args.data_dir))
    out = args.out or os.path.join(checkpoint, f"{name}_{args.split}_{args.shots}shot.csv")
    write_results(results, out)
    print(f"results: {out}")


if __name__ == "__main__":
    evaluate.run_cli(main)
