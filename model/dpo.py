"""
Direct Preference Optimisation: the math 4-dpo.py trains with (Rafailov et al. 2023).

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

    sequence_logps(model, input_ids, labels, attention_mask)  summed log p of each row's labelled tokens
    policy_logps(model, batch)            chosen / rejected log-probs of a DPODataset batch, in passes of similar length
    reference_logps(model, dataset, ...)  the frozen start model's log-probs of every pair, computed once
    WithReference(dataset, state, ptx)    a DPODataset whose items carry those cached log-probs (+ a replay row)
    make_dpo_loss(beta, nll_weight, ptx_weight) -> loss_fn for model.trainer.fit (summed over pairs)
    count_pairs(batch)                    the targets fit divides by: preference pairs

The reference log-probs never change, so they are computed once before training and kept with the checkpoint;
with LoRA the reference is the same model with its adapters disabled (model.lora.reference_mode).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import lora
from .chat import IGNORE_INDEX
from .runtime import autocast


def sequence_logps(model, input_ids, labels, attention_mask):
    """Sum of log p(token) over the labelled (response) tokens of each row, and the pass's MoE balance loss
    (None without MoE, 0 outside training)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (token_logps * (targets != IGNORE_INDEX)).sum(dim=1), out.aux_loss


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
    input_ids, labels, attention_mask = stacked("input_ids", 0), stacked("labels", IGNORE_INDEX), stacked("attention_mask", 0)
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
            n_tokens = (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
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
