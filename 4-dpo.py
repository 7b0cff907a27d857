"""
Direct Preference Optimisation (native PyTorch, no TRL), starting from the SFT model.

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

The reference model is the starting weights, frozen. Its log-probabilities do not change, so they are computed
once per example before training, kept with the checkpoint, and never recomputed (the policy alone is in memory
while training). With --lora_rank the reference is the same model with its adapters disabled (peft's
disable_adapter()), so there is never a second copy of the weights.

Run as:
    python 4-dpo.py                                    # dataset/dpo_data.jsonl, from the newest out/sft_multi_*
                                                       #   (else out/sft_single_*) -> out/dpo_<dim>
    torchrun --nproc_per_node N 4-dpo.py --beta 0.1
    python 4-dpo.py --lora_rank 16                     # LoRA DPO (from a full or a LoRA SFT run)
    python 4-dpo.py --ptx_data dataset/pretrain_data.bin --ptx_weight 0.3   # + replay of the pretraining text
"""
import argparse
import os

from model import chat, checkpoint, lora, stages, trainer
from model.dataset import DPODataset, open_packed
from model.dpo import WithReference, count_pairs, make_dpo_loss, reference_logps
from model.runtime import init_runtime, training_precision, run_stage
from model.errors import StageError


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="dataset/dpo_data.jsonl", help="preference pairs JSONL "
                        "({\"chosen\": [messages], \"rejected\": [messages]}, from `data_process.py dpo`)")
    parser.add_argument("--init_from", default=None,
                        help="SFT checkpoint (default: newest out/sft_multi_*, else out/sft_single_*)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature: how far the policy may move "
                        "from the reference")
    parser.add_argument("--nll_weight", type=float, default=0.0,
                        help="add this times the chosen answer's per-token NLL to the loss (RPO, Pang et al. 2024). "
                        "DPO alone only widens the chosen-rejected gap; when the chosen answer is one the SFT model "
                        "never says, the gap grows by pushing both down and greedy output degrades (0 = plain DPO)")
    parser.add_argument("--ptx_data", default=None,
                        help="packed pretraining tokens (data_process.py pretrain's .bin): each pair also carries one "
                        "row of it, and --ptx_weight times its next-token loss is added (InstructGPT's PPO-ptx). It "
                        "anchors what pretraining stored and DPO never asks about")
    parser.add_argument("--ptx_weight", type=float, default=1.0, help="weight of the --ptx_data loss")
    parser.add_argument("--ptx_seq_len", type=int, default=64,
                        help="length of a --ptx_data row in tokens (at most the model's max_seq_len)")
    trainer.add_training_args(parser, batch_size=8, learning_rate=5e-6, warmup_iters=10, save_interval=200,
                              eval_interval=0)
    trainer.add_model_args(parser)
    lora.add_lora_args(parser)
    args = parser.parse_args()

    init_dir = args.init_from or stages.find_start("dpo", args.dim, args.use_moe)
    if init_dir is None:
        raise StageError("no out/sft_multi_* or out/sft_single_* checkpoint found: run 3-full_sft.py first "
                         "or pass --init_from DIR")
    runtime = init_runtime(args.device)
    model, tokenizer, tokenizer_dir = checkpoint.start_from_checkpoint(init_dir, args, trainer.model_overrides(args))
    model = lora.maybe_wrap(model, args, init_dir)  # --lora_rank 0: the model itself, trained in full
    if not os.path.isfile(args.data_path):
        raise StageError(f"DPO data not found: {args.data_path} (make it with `python data_process.py dpo`)")
    dataset = DPODataset(args.data_path, tokenizer, model.config.max_seq_len)
    settings = {"data": os.path.abspath(args.data_path), "tokenizer_sha256": chat.tokenizer_sha256(tokenizer_dir),
                "ptx_data": None}
    ptx = None
    if args.ptx_data:  # opened before the reference pass: a wrong file stops the run here, not minutes later
        ptx = open_packed(args.ptx_data, min(args.ptx_seq_len, model.config.max_seq_len),  # rows within the context
                          model.config.vocab_size, settings["tokenizer_sha256"], what="--ptx_data")
        settings.update(ptx_data=os.path.abspath(args.ptx_data), ptx_file_rows=len(ptx), ptx_seq_len=ptx.max_seq_len)

    run_dir = args.out_dir or os.path.join("out", stages.run_name("dpo", model.config))
    # before the reference pass: a run directory that holds another run stops here, not minutes later
    resuming = checkpoint.prepare_run_dir(run_dir, args.resume, args.overwrite, runtime)
    extra_state = {}
    if not resuming:  # on resume the cached reference comes back from the checkpoint
        dtype = training_precision(args.dtype, runtime.device)
        extra_state["reference_logps"] = reference_logps(model, dataset, args, runtime, dtype)
    if runtime.is_master:
        print(f"dpo: {len(dataset)} pairs from {args.data_path}, beta {args.beta}, starting from {init_dir} -> {run_dir}")
        checkpoint.copy_tokenizer(tokenizer_dir, run_dir)

    train_set = WithReference(dataset, extra_state, ptx, args.seed)
    loss_fn = make_dpo_loss(args.beta, args.nll_weight, args.ptx_weight if ptx is not None else 0.0)
    trainer.fit(model, train_set, train_set.collate, loss_fn, args, runtime, run_dir,
                title="dpo", extra_state=extra_state, count_fn=count_pairs, settings=settings, resuming=resuming)


if __name__ == "__main__":
    run_stage(main)
