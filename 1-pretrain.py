"""
Pretraining: next-token prediction on the packed token file that `data_process.py pretrain` writes.

Run as:
    python 1-pretrain.py                                  # one process (GPU, Mac or CPU)
    torchrun --nproc_per_node N 1-pretrain.py             # N GPUs (or N CPU processes with gloo)
    python 1-pretrain.py --dim 768 --n_layers 16 --use_moe --max_steps 2000
    python 1-pretrain.py --resume                         # continue out/pretrain_<dim>[_moe] exactly
    torchrun --nproc_per_node N --max_restarts 3 1-pretrain.py --resume auto   # restart by itself after a crash

The model's shape comes from model/LMConfig.py, overridden by the flags; it is saved with the weights in
out/pretrain_<dim>[_moe]/, where 3-full_sft.py finds it.
"""
import argparse
import os

import torch

from model import chat, checkpoint, stages, trainer
from model.LMConfig import LMConfig
from model.model import Transformer
from model.dataset import PretrainDataset, open_packed
from model.runtime import init_runtime, run_stage
from model.errors import StageError


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="dataset/pretrain_data.bin",
                        help="packed token file from `data_process.py pretrain` (its .val part is the validation set)")
    parser.add_argument("--init_from", default=None, help="continue pretraining from this checkpoint directory")
    parser.add_argument("--doc_mask", action="store_true",
                        help="documents packed in one row do not attend to each other (positions restart per document)")
    trainer.add_training_args(parser, batch_size=32, learning_rate=5e-4, warmup_iters=100)
    trainer.add_model_args(parser)
    args = parser.parse_args()

    runtime = init_runtime(args.device)
    if args.init_from:
        model, _, tokenizer_dir = checkpoint.start_from_checkpoint(args.init_from, args, trainer.model_overrides(args))
    else:
        try:
            config = LMConfig(**trainer.model_overrides(args))
        except ValueError as err:
            raise StageError(str(err)) from None
        tokenizer_dir = checkpoint.tokenizer_dir_for(args)
        chat.load_tokenizer(tokenizer_dir, config.vocab_size)
        torch.manual_seed(args.seed)  # the same seed gives the same initial weights
        model = Transformer(config)
    config = model.config

    seq_len = config.max_seq_len  # --max_seq_len is in the config (and so in the checkpoint)
    tokenizer_sha256 = chat.tokenizer_sha256(tokenizer_dir)  # a file packed with another tokenizer is refused
    train_set = open_packed(args.data_path, seq_len, config.vocab_size, tokenizer_sha256, args.doc_mask)
    val_path = PretrainDataset.val_path(args.data_path)
    val_set = open_packed(val_path, seq_len, config.vocab_size, tokenizer_sha256, args.doc_mask,
                          what="validation data") if os.path.isfile(val_path) else None

    run_dir = args.out_dir or os.path.join("out", stages.run_name("pretrain", config))
    resuming = checkpoint.prepare_run_dir(run_dir, args.resume, args.overwrite, runtime)
    if runtime.is_master:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pretraining {n_params / 1e6:.2f}M parameters on {len(train_set)} rows of {seq_len} tokens "
              f"-> {run_dir}")
        checkpoint.copy_tokenizer(tokenizer_dir, run_dir)
    settings = {"data": os.path.abspath(args.data_path), "tokenizer_sha256": tokenizer_sha256,
                "doc_mask": args.doc_mask}
    trainer.fit(model, train_set, None, trainer.lm_loss, args, runtime, run_dir, val_set=val_set, title="pretrain",
                settings=settings, resuming=resuming)


if __name__ == "__main__":
    run_stage(main)
