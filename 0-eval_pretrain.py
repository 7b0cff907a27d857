"""
Check a pretrained model: continue text prompts (streaming), perplexity on the validation split, accuracy on a
completion eval file.

Run as:
    python 0-eval_pretrain.py                                   # continue the built-in Chinese prompts
    python 0-eval_pretrain.py --interactive                     # type the start of a text, the model continues it
    python 0-eval_pretrain.py --prompts my_prompts.txt          # one prompt per line
    python 0-eval_pretrain.py --ppl                             # perplexity on dataset/pretrain_data.val.bin
    python 0-eval_pretrain.py --eval_file dataset/demo/eval_pretrain.jsonl   # accuracy per category
    python 0-eval_pretrain.py --checkpoint out/pretrain_768 --temperature 0.7 --top_k 50

The checkpoint defaults to the newest out/pretrain_*; its config and tokenizer come with it. Prompts are encoded
as <s> + text, the way every pretraining document starts. --eval_file reads JSONL records
{"category", "prompt", "answer"}: greedy continuation, correct iff the answer is in its first line; every answer is
written to <checkpoint>/<eval file name>.answers.jsonl (or --answers_out).
"""
import argparse
import sys

from model import chat, evaluate, generate, stages

PROMPTS = [  # minimind-style completions: general knowledge a pretrained Chinese model should continue sensibly
    "马克思主义基本原理",
    "人类大脑的主要功能",
    "万有引力定律是",
    "世界上最高的山峰是",
    "二氧化碳在空气中",
    "地球上最大的动物是",
    "杭州市的美食有",
    "中国的四大发明是",
    "太阳系中最大的行星是",
    "长江是中国",
]


def continue_text(model, tokenizer, prompt, settings):
    ids, max_new = chat.fit_context(chat.encode_completion(tokenizer, prompt), settings["max_new_tokens"],
                                    model.config.max_seq_len)
    sampling = {k: v for k, v in settings.items() if k != "max_new_tokens"}
    print(prompt, end="", flush=True)
    for piece in generate.stream_reply(model, tokenizer, ids, max_new, **sampling):
        print(piece, end="", flush=True)
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_common_args(parser)
    parser.add_argument("--ppl", action="store_true", help="report perplexity on the validation split of --data_path")
    parser.add_argument("--data_path", default="dataset/pretrain_data.bin",
                        help="packed token file from `data_process.py pretrain`; --ppl reads its .val.bin part")
    parser.add_argument("--ppl_batches", type=int, default=0, help="--ppl: at most this many batches (0 = all)")
    parser.add_argument("--ppl_seq_len", type=int, default=None,
                        help="--ppl: tokens per row (default: the model's max_seq_len)")
    parser.add_argument("--doc_mask", action="store_true",
                        help="--ppl: documents packed in one row do not attend to each other (as 1-pretrain.py --doc_mask)")
    args = parser.parse_args()

    model, tokenizer, checkpoint = evaluate.load_for_cli(args, stages.PRETRAIN_STAGES)

    if args.ppl:
        result = evaluate.perplexity(model, args.data_path, args.ppl_seq_len, batch_size=args.batch_size,
                                     max_batches=args.ppl_batches or None, doc_mask=args.doc_mask)
        print(f"perplexity {result['ppl']:.3f} (loss {result['loss']:.4f}) on {result['n_tokens']} tokens of "
              f"{result['path']}")
    if args.eval_file:
        settings = evaluate.sampling_kwargs(args, scoring=True)
        scores = evaluate.score_eval_file(model, tokenizer, args.eval_file, "completion", out_path=args.answers_out,
                                          batch_size=args.batch_size, **settings)
        print(evaluate.format_scores(scores))
        print(f"answers: {scores['out_path']}")
    if args.ppl or args.eval_file:
        return

    settings = evaluate.sampling_kwargs(args, scoring=False)
    if not args.interactive:
        for prompt in evaluate.read_prompts(args.prompts) if args.prompts else PROMPTS:
            continue_text(model, tokenizer, prompt, settings)
            print()
        return
    print("type the start of a text; the model continues it (Ctrl-D or Ctrl-C quits)", file=sys.stderr)
    while True:
        prompt = evaluate.read_input("> ")
        if prompt is None:
            return
        if not prompt.strip():
            continue
        try:
            continue_text(model, tokenizer, prompt.strip(), settings)
        except KeyboardInterrupt:  # stop this continuation, keep the session
            print("\n(interrupted)")


if __name__ == "__main__":
    evaluate.run_cli(main)
