"""
Supervised fine-tuning on conversations: the loss counts the assistant's tokens only, on every assistant turn.

The seed's flow, with no code edits — run it twice:
    python 3-full_sft.py                                          # single-turn: dataset/sft_data_single.jsonl,
                                                                  #   from out/pretrain_<dim> -> out/sft_single_<dim>
    python 3-full_sft.py --data_path dataset/sft_data_multi.jsonl # multi-turn: from out/sft_single_<dim>
                                                                  #   (several files: --data_path a.jsonl b.jsonl)
                                                                  #   -> out/sft_multi_<dim>
    torchrun --nproc_per_node N 3-full_sft.py [...]               # N GPUs / processes
    python 3-full_sft.py --lora_rank 16 [...]                     # LoRA: train adapters on a frozen base
    python 3-full_sft.py --ptx_data dataset/pretrain_data.bin     # + rows of the pretraining text mixed in

The stage (sft_single or sft_multi) decides where the run starts from and where it goes. It comes from the data:
sft_multi when any conversation has more than one user turn, else sft_single; it is printed, and --stage
overrides it. --init_from / --out_dir override the defaults; the model's shape always comes from the checkpoint.
"""
import argparse
import json
import os

from torch.utils.data import ConcatDataset

from model import chat, checkpoint, lora, stages, trainer
from model.dataset import PretrainReplay, SFTDataset, open_packed
from model.runtime import init_runtime, run_stage
from model.errors import StageError

SFT_STAGES = ("sft_single", "sft_multi")


def count_multi_turn(paths) -> tuple:
    """(conversations with more than one user turn, all conversations) over the JSONL files."""
    multi = total = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line).get("conversations", [])
                except (json.JSONDecodeError, AttributeError):
                    continue  # the dataset reports bad lines with their file and line number
                total += 1
                multi += sum(isinstance(m, dict) and m.get("role") == "user" for m in messages) > 1
    return multi, total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", nargs="+", default=["dataset/sft_data_single.jsonl"],
                        help="conversations JSONL file(s) (data_process.py sft writes sft_data_single/multi.jsonl); mixing in "
                             "some single-turn data keeps the multi-turn stage from forgetting it")
    parser.add_argument("--stage", choices=SFT_STAGES, default=None,
                        help="sft_single (starts from out/pretrain_*) or sft_multi (starts from out/sft_single_*); "
                             "default: sft_multi when the data has multi-turn conversations")
    parser.add_argument("--init_from", default=None,
                        help="checkpoint to fine-tune (default: newest run of the previous stage, see --stage)")
    parser.add_argument("--val_path", default=None, help="optional held-out conversations for validation loss")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                        help="pack several conversations into each row (positions restart per conversation, so "
                             "they cannot see each other): ~95%% real tokens per batch instead of ~75%% with padding")
    parser.add_argument("--ptx_data", default=None,
                        help="packed pretraining tokens (data_process.py pretrain's .bin): rows of it are mixed into "
                        "the SFT rows, every token a target. SFT moves the model away from what pretraining stored; "
                        "the replay keeps it (measured in docs/demo.md)")
    parser.add_argument("--ptx_ratio", type=float, default=0.25,
                        help="with --ptx_data: replayed pretraining rows per SFT row")
    trainer.add_training_args(parser, batch_size=16, learning_rate=1e-4, warmup_iters=20, save_interval=200,
                              eval_interval=200)
    trainer.add_model_args(parser)
    lora.add_lora_args(parser)
    args = parser.parse_args()

    runtime = init_runtime(args.device)
    for path in args.data_path:
        if not os.path.isfile(path):
            raise StageError(f"SFT data not found: {path} (make it with `python data_process.py sft`)")
    stage = args.stage
    if stage is None:
        multi, total = count_multi_turn(args.data_path)
        stage = "sft_multi" if multi else "sft_single"
        if runtime.is_master:
            print(f"stage {stage}: {multi} of {total} conversations have several user turns (--stage overrides)")
    init_dir = args.init_from or stages.find_start(stage, args.dim, args.use_moe)
    if init_dir is None:
        previous = stages.STAGES[stage].starts_from[0]
        raise StageError(f"no out/{previous}_* checkpoint found to start {stage} from: run the previous "
                         f"stage first or pass --init_from DIR")
    model, tokenizer, tokenizer_dir = checkpoint.start_from_checkpoint(init_dir, args, trainer.model_overrides(args))
    model = lora.maybe_wrap(model, args, init_dir)  # --lora_rank 0: the model itself, trained in full

    seq_len = model.config.max_seq_len  # --max_seq_len is in the config (and so in the checkpoint)
    if args.pack and runtime.is_master:  # tokenize once, on one process, into memory-mapped files
        for path in args.data_path + ([args.val_path] if args.val_path else []):
            SFTDataset.prepare(path, tokenizer, seq_len)
    runtime.barrier()
    parts = [SFTDataset(path, tokenizer, seq_len, pack=args.pack) for path in args.data_path]
    n_conversations = sum(len(p.offsets) for p in parts)
    settings = {"data": [os.path.abspath(p) for p in args.data_path],
                "tokenizer_sha256": chat.tokenizer_sha256(tokenizer_dir), "ptx_data": None}
    if args.ptx_data:
        if args.ptx_ratio <= 0:
            raise StageError(f"--ptx_ratio must be positive with --ptx_data (got {args.ptx_ratio})")
        packed = open_packed(args.ptx_data, seq_len, model.config.vocab_size, settings["tokenizer_sha256"],
                             what="--ptx_data")
        n_rows = max(1, round(args.ptx_ratio * sum(len(p) for p in parts)))
        parts.append(PretrainReplay(packed, n_rows, args.seed, with_positions=args.pack))
        settings.update(ptx_data=os.path.abspath(args.ptx_data), ptx_file_rows=len(packed), ptx_rows=n_rows)
    train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    val_set = SFTDataset(args.val_path, tokenizer, seq_len, pack=args.pack) if args.val_path else None

    run_dir = args.out_dir or os.path.join("out", stages.run_name(stage, model.config))
    resuming = checkpoint.prepare_run_dir(run_dir, args.resume, args.overwrite, runtime)
    if runtime.is_master:
        replay = f" + {len(parts[-1])} rows of {args.ptx_data}" if args.ptx_data else ""
        print(f"{stage}: {n_conversations} conversations ({len(train_set)} rows) from "
              f"{', '.join(args.data_path)}{replay}, starting from {init_dir} -> {run_dir}")
        checkpoint.copy_tokenizer(tokenizer_dir, run_dir)
    trainer.fit(model, train_set, parts[0].collate, trainer.lm_loss, args, runtime, run_dir, val_set=val_set,
                title=stage, settings=settings, resuming=resuming)


if __name__ == "__main__":
    run_stage(main)
