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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import checkpoint, lora, trainer
from model.dataset import DPODataset, open_packed
from model.runtime import StageError, autocast, init_runtime, resolve_dtype, run_stage


def sequence_logps(model, input_ids, labels, attention_mask):
    """Sum of log p(token) over the labelled (response) tokens of each row, and the pass's MoE balance loss
    (None without MoE, 0 outside training)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (token_logps * (targets != -100)).sum(dim=1), out.aux_loss


def policy_logps(model, batch, max_padding=0.25):
    """Chosen and rejected log-probs of every pair. The 2n rows run as a few forward passes of rows of similar
    length (longest first; a pass takes the next row while padding stays under max_padding of its tokens), not
    as one pass padded to the longest row: the demo's batches, one long conversation among short questions, were
    3.7x padding. Rows are right-padded and padding is masked, so the log-probs are those of one padded pass
    (up to float rounding). -> (chosen, rejected, balance): balance is the MoE balance loss of the passes, each
    weighted by its pairs (rows / 2), so it adds to a loss summed over pairs like the rest; 0 without MoE."""
    n = batch["chosen_input_ids"].shape[0]
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def stacked(key, pad):
        rows = [F.pad(batch[f"{side}_{key}"], (0, width - batch[f"{side}_{key}"].shape[1]), value=pad)
                for side in ("chosen", "rejected")]
        return torch.cat(rows, dim=0)
    input_ids, labels, attention_mask = stacked("input_ids", 0), stacked("labels", -100), stacked("attention_mask", 0)
    lengths = attention_mask.sum(dim=1)
    order = lengths.argsort(descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    pieces, balance, start = [], 0.0, 0
    while start < len(sorted_lengths):
        cut, end, tokens = sorted_lengths[start], start + 1, sorted_lengths[start]  # cut: this pass's width
        while end < len(sorted_lengths) and cut * (end - start + 1) <= (1 + max_padding) * (tokens + sorted_lengths[end]):
            tokens, end = tokens + sorted_lengths[end], end + 1
        rows = order[start:end]
        logps, aux = sequence_logps(model, input_ids[rows, :cut], labels[rows, :cut], attention_mask[rows, :cut])
        pieces.append(logps)
        if aux is not None:
            balance = balance + aux * len(rows) / 2
        start = end
    logps = torch.cat(pieces)[order.argsort()]  # back to the batch's order
    return logps[:n], logps[n:], balance


class WithReference(torch.utils.data.Dataset):
    """A DPO dataset whose items also carry the cached reference log-probs, read from the run's saved state
    (filled before training, or by the trainer from the checkpoint on --resume), and, with --ptx_data, one row of
    pretraining text each (pair i always gets the same row, so a resumed run sees the same rows)."""

    def __init__(self, dataset, state: dict, ptx=None, seed=0):
        self.dataset, self.state, self.ptx = dataset, state, ptx
        if ptx is not None:
            generator = torch.Generator().manual_seed(seed)
            self.ptx_rows = torch.randint(len(ptx), (len(dataset),), generator=generator).tolist()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        ptx = self.ptx[self.ptx_rows[i]] if self.ptx is not None else None
        return self.dataset[i], self.state["reference_logps"][i], ptx

    def collate(self, items):
        batch = self.dataset.collate([item for item, _, _ in items])
        reference = torch.stack([ref for _, ref, _ in items])
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference[:, 0], reference[:, 1]
        if self.ptx is not None:
            batch["ptx_input_ids"] = torch.stack([ptx["input_ids"] for _, _, ptx in items])
            batch["ptx_labels"] = torch.stack([ptx["shift_labels"] for _, _, ptx in items])
        return batch


@torch.no_grad()
def reference_logps(model, dataset, args, runtime, dtype):
    """(N, 2) log-probs of chosen/rejected under the frozen starting model (with LoRA: the base, adapters
    disabled); each process does its share."""
    model.to(runtime.device).eval()
    reference = torch.zeros(len(dataset), 2, dtype=torch.float64)
    indices = list(range(runtime.rank, len(dataset), runtime.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=args.batch_size,
                        collate_fn=dataset.collate)
    done = 0
    for batch in tqdm(loader, desc="reference log-probs", disable=not runtime.is_master):
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with autocast(runtime.device, dtype), lora.reference_mode(model):
            chosen, rejected, _ = policy_logps(model, batch)
        rows = indices[done:done + len(chosen)]
        # float32 on the device, float64 only on the CPU: MPS has no float64
        reference[rows] = torch.stack([chosen, rejected], dim=1).float().cpu().double()
        done += len(chosen)
    if runtime.ddp:
        reference = reference.to(runtime.device)
        dist.all_reduce(reference)
    model.train()
    return reference.float().cpu()


def make_dpo_loss(beta, nll_weight=0.0, ptx_weight=0.0):
    def dpo_loss(model, batch):
        """Summed over the batch's pairs (the trainer divides by the pairs of the whole step)."""
        chosen, rejected, balance = policy_logps(model, batch)  # balance: MoE's, 0 without it
        chosen_reward = beta * (chosen - batch["ref_chosen_logps"])
        rejected_reward = beta * (rejected - batch["ref_rejected_logps"])
        loss = -F.logsigmoid(chosen_reward - rejected_reward).sum() + balance
        if nll_weight:  # + the chosen answer's mean per-token NLL (RPO): see --nll_weight
            n_tokens = (batch["chosen_labels"][:, 1:] != -100).sum(dim=1).clamp(min=1)
            loss = loss + nll_weight * (-chosen / n_tokens).sum()
        metrics = {}
        if ptx_weight:  # + the next-token loss on one pretraining row per pair: see --ptx_data
            # the model's own loss (MoE balance loss included): the mean over equal-length rows, so x rows = the
            # sum of the rows' means, weighted per pair like the rest of the loss
            ptx = model(input_ids=batch["ptx_input_ids"], shift_labels=batch["ptx_labels"]).loss
            ptx = ptx * batch["ptx_input_ids"].shape[0]
            loss = loss + ptx_weight * ptx
            metrics["ptx_loss"] = ptx.detach()
        margin = (chosen_reward - rejected_reward).detach()
        return loss, {"reward_accuracy": (margin > 0).float().sum(), "reward_margin": margin.sum(), **metrics}
    return dpo_loss


def count_pairs(batch) -> int:
    return batch["chosen_input_ids"].shape[0]


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

    init_dir = args.init_from or checkpoint.find_run("sft_multi", args.dim, args.use_moe) or \
        checkpoint.find_run("sft_single", args.dim, args.use_moe)
    if init_dir is None:
        raise StageError("no out/sft_multi_* or out/sft_single_* checkpoint found: run 3-full_sft.py first "
                                 "or pass --init_from DIR")
    runtime = init_runtime(args.device)
    model, tokenizer, tokenizer_dir = checkpoint.start_from_checkpoint(init_dir, args, trainer.model_overrides(args))
    model = lora.maybe_wrap(model, args, init_dir)  # --lora_rank 0: the model itself, trained in full
    if not os.path.isfile(args.data_path):
        raise StageError(f"DPO data not found: {args.data_path} (make it with `python data_process.py dpo`)")
    dataset = DPODataset(args.data_path, tokenizer, model.config.max_seq_len)
    settings = {"data": os.path.abspath(args.data_path), "tokenizer_sha256": checkpoint.tokenizer_sha256(tokenizer_dir)}
    ptx = None
    if args.ptx_data:  # opened before the reference pass: a wrong file stops the run here, not minutes later
        ptx = open_packed(args.ptx_data, min(args.ptx_seq_len, model.config.max_seq_len),  # rows within the context
                          model.config.vocab_size, settings["tokenizer_sha256"], what="--ptx_data")
        settings["ptx_data"] = os.path.abspath(args.ptx_data)

    run_dir = args.out_dir or os.path.join("out", checkpoint.run_name("dpo", model.config))
    # before the reference pass: a run directory that holds another run stops here, not minutes later
    resuming = checkpoint.prepare_run_dir(run_dir, args.resume, args.overwrite, runtime)
    extra_state = {}
    if not resuming:  # on resume the cached reference comes back from the checkpoint
        dtype = resolve_dtype(args.dtype, runtime.device)
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
