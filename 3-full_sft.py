"""
Supervised fine-tuning on conversations: the loss counts the assistant's tokens only, on every assistant turn.

The seed's flow, with no code edits — run it twice:
    python 3-full_sft.py                                          # single-turn: dataset/sft_data_single.jsonl,
                                                                  #   from out/pretrain_<dim> -> out/sft_single_<dim>
    python 3-full_sft.py --data_path dataset/sft_data_multi.jsonl # multi-turn: from out/sft_single_<dim>
                                                                  #   (several files: --data_path a.jsonl b.jsonl)
                                                                  #   -> out/sft_multi_<dim>
    torchrun --nproc_per_node N 3-full_sft.py [...]               # N GPUs / processes

A data file whose name contains "multi" is the multi-turn stage. --init_from / --out_dir override the defaults;
the model's shape always comes from the checkpoint it starts from.
"""
import argparse
import os

from torch.utils.data import ConcatDataset

from model.dataset import SFTDataset
from model import checkpoint, trainer
from model.runtime import StageError, autocast, init_runtime, resolve_dtype, run_stage


def sft_loss(model, batch):
    out = model(**batch)
    # labels are aligned with input_ids; the first position is never a target
    return out.loss, {}, int((batch["labels"][:, 1:] != -100).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", nargs="+", default=["dataset/sft_data_single.jsonl"],
                        help="conversations JSONL file(s) (data_process.py sft writes sft_data_single/multi.jsonl); mixing in "
                             "some single-turn data keeps the multi-turn stage from forgetting it")
    parser.add_argument("--init_from", default=None,
                        help="checkpoint to fine-tune (default: newest out/pretrain_* for single-turn data, "
                             "newest out/sft_single_* for multi-turn data)")
    parser.add_argument("--val_path", default=None, help="optional held-out conversations for validation loss")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                        help="pack several conversations into each row (positions restart per conversation, so "
                             "they cannot see each other): ~95%% real tokens per batch instead of ~75%% with padding")
    trainer.add_training_args(parser, batch_size=16, learning_rate=1e-4, warmup_iters=20, save_interval=200,
                              eval_interval=200)
    trainer.add_model_args(parser)
    args = parser.parse_args()

    multi_turn = "multi" in os.path.basename(args.data_path[0])
    stage, previous = ("sft_multi", "sft_single") if multi_turn else ("sft_single", "pretrain")
    init_dir = args.init_from or checkpoint.find_run(previous, args.dim, args.use_moe)
    if init_dir is None:
        raise StageError(f"no out/{previous}_* checkpoint found to start {stage} from: run the previous "
                                 f"stage first or pass --init_from DIR")
    runtime = init_runtime(args.device)
    model, tokenizer, tokenizer_dir = checkpoint.start_from_checkpoint(init_dir, args, trainer.model_overrides(args))

    for path in args.data_path:
        if not os.path.isfile(path):
            raise StageError(f"SFT data not found: {path} (make it with `python data_process.py sft`)")
    seq_len = args.max_seq_len or model.config.max_seq_len
    parts = [SFTDataset(path, tokenizer, seq_len, pack=args.pack) for path in args.data_path]
    train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    val_set = SFTDataset(args.val_path, tokenizer, seq_len, pack=args.pack) if args.val_path else None

    run_dir = args.out_dir or os.path.join("out", checkpoint.run_name(stage, model.config))
    if runtime.is_master:
        print(f"{stage}: {sum(len(p.offsets) for p in parts)} conversations ({len(train_set)} rows) from "
              f"{', '.join(args.data_path)}, starting from {init_dir} -> {run_dir}")
        os.makedirs(run_dir, exist_ok=True)
        checkpoint.copy_tokenizer(tokenizer_dir, run_dir)
    trainer.fit(model, train_set, parts[0].collate, sft_loss, args, runtime, run_dir, val_set=val_set, title=stage)


if __name__ == "__main__":
    run_stage(main)
