"""
Chat with a fine-tuned model (SFT or DPO): a list of questions, or an interactive multi-turn session, answers
streamed as they are generated; or score a chat eval file.

Run as:
    python 2-eval.py                                            # ask the built-in Chinese questions
    python 2-eval.py --interactive                              # multi-turn chat; Ctrl-D or Ctrl-C quits
    python 2-eval.py --interactive --no_history                 # every question on its own
    python 2-eval.py --prompts my_questions.txt                 # one question per line
    python 2-eval.py --eval_file dataset/demo/eval_chat.jsonl   # accuracy per category
    python 2-eval.py --checkpoint out/sft_single_512 --temperature 0.7 --top_p 0.9

The checkpoint defaults to the newest of out/dpo_* > out/sft_multi_* > out/sft_single_* (the latest stage you ran;
also one folder down, e.g. out/demo/dpo after make demo).
Prompts go through the tokenizer's chat template (`<s>{role}\\n{content}</s>\\n` per message, then `<s>assistant\\n`).
Typed text stays text: a `<s>` or `</s>` in a question never becomes a control token (chat.encode_chat).
Questions from the built-in list or --prompts are asked one by one, each on its own. In --interactive mode the
conversation is kept: when it no longer fits in the model's context (max_seq_len minus --max_new_tokens) the
oldest turns are dropped first. Commands: /reset forgets the conversation, /quit leaves.
--eval_file reads JSONL records {"category", "messages": [...], "answer"} (several turns allowed, the last one the
user's): greedy answer, correct iff the gold answer is in its first line; every answer is written to
<checkpoint>/<eval file name>.answers.jsonl (or --answers_out).
"""
import argparse
import sys

from model import chat, evaluate, generate, stages

PROMPTS = [  # minimind-style questions
    "你叫什么名字？",
    "你是谁？",
    "中国有哪些比较好的大学？",
    "全世界最好的大学是什么？",
    "你知道光速是多少吗？",
    "你知道长江吗？",
    "人类的血液主要由哪些成分组成？",
    "第一颗人造卫星是哪个国家发射的？",
    "你知道杭州有什么美食吗？",
    "请问世界上最高的山峰是哪座？",
    "计算37+45。",
]


def reply(model, tokenizer, messages, settings):
    """Stream the assistant's answer to `messages` (already trimmed) and return its text."""
    ids, max_new = chat.fit_context(chat.encode_chat(tokenizer, messages), settings["max_new_tokens"],
                                    model.config.max_seq_len)
    sampling = {k: v for k, v in settings.items() if k != "max_new_tokens"}
    pieces = []
    for piece in generate.stream_reply(model, tokenizer, ids, max_new, **sampling):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces)


def interactive(model, tokenizer, settings, keep_history):
    budget = chat.context_budget(model.config.max_seq_len, settings["max_new_tokens"])
    print("chat with the model; /reset forgets the conversation, Ctrl-D or Ctrl-C quits", file=sys.stderr)
    history = []
    while True:
        question = evaluate.read_input("👶: ")
        if question is None or question.strip() == "/quit":
            return
        question = question.strip()
        if not question:
            continue
        if question == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        messages = chat.trim_history(tokenizer, history + [{"role": "user", "content": question}], budget)
        print("🤖: ", end="", flush=True)
        try:
            answer = reply(model, tokenizer, messages, settings)
        except KeyboardInterrupt:  # stop this answer, keep the session (the unfinished turn is not remembered)
            print("\n(interrupted)")
            continue
        if keep_history:
            history = messages + [{"role": "assistant", "content": answer}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_common_args(parser)
    parser.add_argument("--no_history", action="store_true",
                        help="--interactive: answer every question on its own, without the earlier turns")
    args = parser.parse_args()

    model, tokenizer, checkpoint = evaluate.load_for_cli(args, stages.CHAT_STAGES)

    if args.eval_file:
        settings = evaluate.sampling_kwargs(args, scoring=True)
        scores = evaluate.score_eval_file(model, tokenizer, args.eval_file, "chat", out_path=args.answers_out,
                                          batch_size=args.batch_size, **settings)
        print(evaluate.format_scores(scores))
        print(f"answers: {scores['out_path']}")
        return
    settings = evaluate.sampling_kwargs(args, scoring=False)
    if args.interactive:
        interactive(model, tokenizer, settings, keep_history=not args.no_history)
        return
    for question in evaluate.read_prompts(args.prompts) if args.prompts else PROMPTS:
        print(f"👶: {question}")
        print("🤖: ", end="", flush=True)
        reply(model, tokenizer, [{"role": "user", "content": question}], settings)
        print()


if __name__ == "__main__":
    evaluate.run_cli(main)
