"""
The one training loop every stage shares (pretraining, SFT, DPO), its flags, the data order and the schedule.

A stage script (1-pretrain.py, 3-full_sft.py, 4-dpo.py) builds its model and dataset, then calls

    fit(model, train_set, collate_fn, loss_fn, args, runtime, run_dir, val_set=..., count_fn=..., settings=...)

loss_fn(model, batch) -> (loss summed over the batch's targets, {metric name: value summed over them})
count_fn(batch) -> number of targets in the batch (default: labelled tokens; DPO: preference pairs)

The stages differ only in those. Every optimizer step divides the summed loss by the targets of the WHOLE step
(all micro-batches, all processes), so a short answer weighs as much as one token of a long one however the
global batch is split (the gradient-accumulation pitfall transformers fixed in 2024). Checkpoints, resume and
the run directory are model/checkpoint.py's job; device, DDP and precision model/runtime.py's.
"""
import argparse
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from . import checkpoint, lora
from .chat import IGNORE_INDEX
from .compile_choice import MODES as COMPILE_MODES, CompileChoice
from .metrics import StepLog
from .optim import TimeBudget, build_optimizer, lr_at
from .runtime import Runtime, StopSignals, all_reduce_sum, autocast, training_precision
from .errors import StageError

transformers_logging.disable_progress_bar()  # a bar per checkpoint write would bury the training bar


# ----------------------------------------------------------------------------------------------------------
# flags

def add_training_args(parser: argparse.ArgumentParser, **defaults):
    """The flags every stage has (seed names). Stage scripts pass their own defaults."""
    d = dict(batch_size=32, learning_rate=5e-4, epochs=1, accumulation_steps=1, warmup_iters=100,
             log_interval=10, save_interval=500, eval_interval=500, max_seq_len=None)
    d.update(defaults)
    a = parser.add_argument
    a("--out_dir", default=None, help="run directory (default: out/<stage>_<dim>[_moe])")
    a("--epochs", type=int, default=d["epochs"], help="passes over the training data (ignored with --max_steps)")
    a("--max_steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--batch_size", type=int, default=d["batch_size"], help="sequences per micro-batch on each process")
    a("--accumulation_steps", type=int, default=d["accumulation_steps"],
      help="micro-batches per optimizer step (global batch = batch_size * accumulation_steps * processes)")
    a("--learning_rate", type=float, default=d["learning_rate"], help="peak learning rate")
    a("--min_lr_ratio", type=float, default=0.1, help="the schedule ends at learning_rate * this")
    a("--warmup_iters", type=int, default=d["warmup_iters"], help="linear warm-up steps")
    a("--lr_schedule", default="cosine", choices=["cosine", "wsd"],
      help="after warm-up: cosine decay, or warmup-stable-decay (peak until the last --decay_frac, then linear)")
    a("--decay_frac", type=float, default=0.2, help="wsd: share of the run spent decaying")
    a("--max_minutes", type=float, default=None,
      help="stop after this many minutes of training steps, with the schedule fitted to the time, not cut by it "
           "(progress = elapsed / budget; warm-up capped at 10%% of the steps that fit)")
    a("--optimizer", default="adamw", choices=["adamw", "muon"],
      help="muon: torch.optim.Muon (RMS matched to AdamW, same --learning_rate) for the hidden 2-D matrices, "
           "AdamW for embeddings, norms and the rest")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay (not applied to norms/embeddings)")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="autocast precision; auto = bfloat16 on CUDA (float16 on GPUs without bf16) and on CPUs with "
           "native bf16 (AVX512-BF16/AMX), float32 elsewhere")
    a("--device", default="auto", help="auto (cuda > mps > cpu), or e.g. cuda:0, cpu")
    a("--compile", nargs="?", const="on", default="auto", choices=COMPILE_MODES,
      help="torch.compile the training steps. auto: only in a run long enough to pay for compiling (10+ minutes "
           "by the first steps' pace), and only if the compiled steps then measure faster; on (or bare --compile): "
           "from the first step; off: never")
    a("--num_workers", type=int, default=0, help="DataLoader worker processes (0 = load in the main process)")
    a("--seed", type=int, default=1337, help="seed for initialisation and data order")
    a("--log_interval", type=int, default=d["log_interval"], help="log metrics every N steps")
    a("--save_interval", type=int, default=d["save_interval"], help="checkpoint every N steps (and at the end)")
    a("--eval_interval", type=int, default=d["eval_interval"], help="validation loss every N steps (0 = off)")
    a("--eval_batches", type=int, default=20, help="batches per validation pass (per process)")
    a("--keep_last", type=int, default=2, help="keep this many step checkpoints (the newest weights always stay)")
    a("--resume", nargs="?", const="yes", choices=["yes", "auto"], default=None,
      help="continue the run in --out_dir from its newest checkpoint; `--resume auto` resumes when there is one "
           "and starts fresh otherwise (for `torchrun --max_restarts N`)")
    a("--overwrite", action="store_true",
      help="start over in an --out_dir that already holds a run (the old run is moved aside, not deleted)")
    a("--max_bad_steps", type=int, default=20,
      help="stop after this many consecutive steps with a NaN/Inf loss or gradient (such steps are skipped)")
    a("--use_wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    a("--wandb_project", default="nano-LLM", help="wandb project name")
    a("--tokenizer_dir", default=None, help="tokenizer directory (default: the init checkpoint's, else model/tokenizer)")


def add_model_args(parser: argparse.ArgumentParser):
    """Model overrides; None = keep LMConfig.py's default (or, when initialising from a checkpoint, its config)."""
    a = parser.add_argument
    for name, kind, text in [
        ("dim", int, "model width"), ("n_layers", int, "Transformer blocks"), ("n_heads", int, "attention heads"),
        ("n_kv_heads", int, "key/value heads (GQA)"), ("vocab_size", int, "vocabulary size (must match the tokenizer)"),
        ("hidden_dim", int, "FFN width (default: SwiGLU rule)"), ("max_seq_len", int, "training sequence length"),
        ("dropout", float, "dropout"), ("rope_theta", float, "RoPE base"),
        ("n_routed_experts", int, "MoE routed experts"), ("num_experts_per_tok", int, "MoE experts per token"),
        ("n_shared_experts", int, "MoE shared experts"), ("aux_loss_alpha", float, "MoE balance loss weight"),
    ]:
        a(f"--{name}", type=kind, default=None, help=f"{text} (default: LMConfig.py / the init checkpoint)")
    a("--use_moe", action=argparse.BooleanOptionalAction, default=None, help="mixture-of-experts FFN")
    a("--flash_attn", action=argparse.BooleanOptionalAction, default=None,
      help="fused attention kernels (SDPA/flex); --no-flash_attn: softmax(QK^T)V written out, which trains faster "
           "on CPU at short sequences (speedrun.py's recipe)")


def model_overrides(args) -> dict:
    names = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len", "dropout",
             "rope_theta", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "aux_loss_alpha", "use_moe",
             "flash_attn"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ----------------------------------------------------------------------------------------------------------
# data order

class ResumableBatchSampler:
    """Batches of dataset indices in a (seed, epoch)-determined order, sharded over DDP ranks, that can start
    at any batch (exact resume).

    Global batch b of an epoch is perm[b*G : (b+1)*G] with G = batch_size * world_size; rank r takes its r-th
    slice. So N processes with batch_size B see exactly the examples one process sees with batch_size N*B.
    The incomplete last global batch is dropped, so every rank runs the same number of steps.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n_examples, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0
        if len(self) == 0:
            raise StageError(f"only {n_examples} training examples: fewer than one global batch "
                             f"({batch_size} x {world_size} processes); lower --batch_size")

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start = epoch, start_batch

    def __len__(self):
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=generator)
        G = self.batch_size * self.world_size
        for b in range(self.start, len(self)):
            first = b * G + self.rank * self.batch_size
            yield perm[first:first + self.batch_size].tolist()


# ----------------------------------------------------------------------------------------------------------
# loss

def count_labelled_tokens(batch) -> int:
    """Targets of a language-modelling batch: shift_labels (already shifted) or labels (shifted in the model)."""
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != IGNORE_INDEX).sum())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def lm_loss(model, batch):
    """Next-token loss summed over the labelled tokens (the model's mean times their count; with MoE the
    balance loss rides along, weighted by the batch's share of the step's tokens)."""
    out = model(**batch)
    n_targets = count_labelled_tokens(batch)
    # a batch without targets still joins the graph (DDP expects every parameter's gradient), with weight 0
    return (out.loss * n_targets if n_targets else out.logits.sum() * 0.0), {}


# ----------------------------------------------------------------------------------------------------------
# one step, validation

def step_batches(train_set, collate_fn, sampler, steps_per_epoch, first_step, args, runtime, repeats=1):
    """Each optimizer step's micro-batches, from first_step on, epoch after epoch; each batch `repeats` steps in a
    row (RL's several updates on one batch of rollouts). The data position is a function of the step alone, which
    is what makes a resume exact."""
    data_step, repeat = divmod(first_step, repeats)
    epoch, step_in_epoch = divmod(data_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, step_in_epoch * args.accumulation_steps)
        # Own generator: creating the iterator draws a seed, which must not come from the global RNG (a resumed
        # run creates its iterator mid-epoch, so dropout would see a shifted random stream).
        loader = iter(DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                 num_workers=args.num_workers, pin_memory=runtime.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(args.seed + epoch)))
        for _ in range(step_in_epoch, steps_per_epoch):
            micro_batches = [next(loader) for _ in range(args.accumulation_steps)]
            for _ in range(repeat, repeats):
                yield epoch, micro_batches
            repeat = 0
        epoch, step_in_epoch = epoch + 1, 0


def train_step(train_model, batches, loss_fn, count_fn, runtime, dtype, scaler):
    """Forward and backward over one step's micro-batches. Returns, as ONE tensor still on the device (no host
    sync here), [loss sum, metric sums..., targets, tokens] of this process; gradients hold sum / step targets."""
    n_targets = sum(count_fn(batch) for batch in batches)
    step_targets = max(1.0, all_reduce_sum(float(n_targets), runtime))
    totals = None
    for i, batch in enumerate(batches):
        batch = {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}
        sync = not runtime.ddp or i == len(batches) - 1  # DDP all-reduces gradients on the last one only
        with (nullcontext() if sync else train_model.no_sync()), autocast(runtime.device, dtype):
            loss_sum, metric_sums = loss_fn(train_model, batch)
        # DDP averages gradients over processes: scale by world_size so the result is sum / step_targets
        scaler.scale(loss_sum * (runtime.world_size / step_targets)).backward()
        values = torch.stack([loss_sum.detach().float()] + [torch.as_tensor(v, dtype=torch.float32, device=loss_sum.device)
                                                            for v in metric_sums.values()])
        totals = values if totals is None else totals + values
    tokens = sum(v.numel() for batch in batches for k, v in batch.items() if k.endswith("input_ids"))
    return torch.cat([totals, torch.tensor([n_targets, tokens], dtype=torch.float32, device=totals.device)]), \
        list(metric_sums)


@torch.no_grad()
def validation_loss(model, val_set, collate_fn, loss_fn, count_fn, args, runtime, dtype) -> float:
    """Mean loss per target over the first eval_batches batches of each rank's shard of the validation set."""
    model.eval()
    # Fixed order, every example counted once, a short last batch allowed: a small val split still works.
    shard = list(range(runtime.rank, len(val_set), runtime.world_size))
    batches = [shard[i:i + args.batch_size] for i in range(0, len(shard), args.batch_size)][:args.eval_batches]
    loader = DataLoader(val_set, batch_sampler=batches, collate_fn=collate_fn, num_workers=args.num_workers,
                        generator=torch.Generator())
    total, targets = 0.0, 0
    for batch in tqdm(loader, desc="validation", leave=False, disable=not runtime.is_master or len(batches) < 20):
        targets += count_fn(batch)
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with autocast(runtime.device, dtype):
            total += float(loss_fn(model, batch)[0])
    model.train()
    return all_reduce_sum(total, runtime) / max(1.0, all_reduce_sum(float(targets), runtime))


# ----------------------------------------------------------------------------------------------------------
# the pieces the loop is made of

def start_training(model, args, runtime, run_dir, resuming, settings, dtype, extra_state, title):
    """Model on the device, optimizer, loss scaler, the step to start from (restored on resume), and what picks
    the model the steps run through (DDP-wrapped; compiled or not). -> (optimizer, scaler, step, CompileChoice)"""
    model.to(runtime.device)
    kind = getattr(args, "optimizer", "adamw")
    if kind != "adamw" and dtype == "float16":
        raise StageError(f"--optimizer {kind} does not run with float16 loss scaling; use --dtype bfloat16/float32")
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, runtime.device, kind)
    if runtime.is_master:  # with LoRA only the adapters train (and only they are in the optimizer)
        print(f"{title}: {lora.trainable_summary(model)}")
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=dtype == "float16")
    step = 0
    if resuming:
        state = checkpoint.restore(run_dir, model, optimizer, scaler, settings, runtime)
        step = state["step"]
        if extra_state is not None:
            extra_state.update(state.get("extra", {}))
    train_model = DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None) \
        if runtime.ddp else model
    # compiled after DDP wrapping, as PyTorch recommends (DDP's buckets then match the compiled graphs)
    return optimizer, scaler, step, CompileChoice(args.compile, train_model, runtime.is_master)


def save_training(run_dir, model, optimizer, scaler, step, epoch, extra_state, settings, args, runtime):
    """A complete checkpoint (rank 0 writes it); every rank's RNG travels in the file, so each resumes its own
    stream."""
    rng = [checkpoint.rng_state()]
    if runtime.ddp:
        rng = [None] * runtime.world_size
        torch.distributed.all_gather_object(rng, checkpoint.rng_state())
    if runtime.is_master:
        checkpoint.save_checkpoint(run_dir, model, {
            "step": step, "epoch": epoch, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng, "extra": extra_state or {}, "settings": settings}, args.keep_last)
    runtime.barrier()


def set_learning_rate(optimizer, step, budget, total_steps, args) -> float:
    """The schedule's rate for this step (fitted to the time budget when there is one), set on every group."""
    planned, warmup = budget.plan(step, total_steps, args.warmup_iters)
    lr = lr_at(step, planned, warmup, args.learning_rate, args.min_lr_ratio,
               getattr(args, "lr_schedule", "cosine"), getattr(args, "decay_frac", 0.2))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def agree_on_step(sums, grad_norm, stop_received: bool, seconds: float, runtime):
    """ONE all-reduce and ONE host sync per step answer everything: the step's sums over all processes, whether
    the loss or the gradient was non-finite anywhere, whether any rank got a stop signal, and the step's time
    (every rank then follows one clock: the same lr, the same last step). -> (sums, finite, stop, seconds)"""
    flags = torch.stack([(~torch.isfinite(sums[0]) | ~torch.isfinite(grad_norm)).float(),
                         torch.tensor(float(stop_received), device=sums.device)])
    reduced = all_reduce_sum(torch.cat([sums, flags, torch.tensor([seconds], device=sums.device)]), runtime).tolist()
    return reduced[:-3], reduced[-3] == 0, reduced[-2] > 0, reduced[-1] / runtime.world_size


# ----------------------------------------------------------------------------------------------------------
# the loop

def fit(model, train_set, collate_fn, loss_fn, args, runtime: Runtime, run_dir: str, val_set=None,
        title="training", extra_state=None, count_fn=count_labelled_tokens, settings=None, resuming=None,
        make_batches=None, batch_repeats=1):
    """Train, checkpoint, resume, log; returns the trained (unwrapped) model.

    extra_state: a dict of tensors saved with every checkpoint and restored on resume (e.g. DPO's cached
    reference log-probs). settings: what else a resumed run must share with the saved one (data, tokenizer).
    resuming: what checkpoint.prepare_run_dir returned when the stage called it early (before writing anything
    into the run directory); None = prepare it here. make_batches(epoch, micro_batches, step) -> micro_batches:
    the hook for batches the model itself produces (an RL stage turns a step's prompts into scored rollouts of
    the model being trained); it must depend only on the step, the batches and the weights, so a resume is exact.
    batch_repeats: each batch of train_set is trained on this many steps in a row (an epoch takes that many times
    the steps): GRPO's --num_iterations, several updates on one batch of rollouts, each its own optimizer step.
    """
    dtype = training_precision(args.dtype, runtime.device)
    torch.manual_seed(args.seed)  # dropout's stream: two fresh runs with one --seed train alike (resume restores it)
    sampler = ResumableBatchSampler(len(train_set), args.batch_size, args.seed, runtime.rank, runtime.world_size)
    steps_per_epoch = len(sampler) // args.accumulation_steps
    if steps_per_epoch == 0:
        raise StageError(f"{len(sampler)} batches per epoch is fewer than --accumulation_steps {args.accumulation_steps}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch * batch_repeats
    settings = {**(settings or {}), "batch_size": args.batch_size, "accumulation_steps": args.accumulation_steps,
                "batch_repeats": batch_repeats,
                "world_size": runtime.world_size, "seed": args.seed, "n_examples": len(train_set),
                "total_steps": total_steps, "trainable_params": sum(p.numel() for p in model.parameters()
                                                                    if p.requires_grad)}
    if resuming is None:
        resuming = checkpoint.prepare_run_dir(run_dir, args.resume, args.overwrite, runtime)
    optimizer, scaler, step, compiling = start_training(model, args, runtime, run_dir, resuming, settings, dtype,
                                                        extra_state, title)
    budget = TimeBudget(getattr(args, "max_minutes", None))
    if budget:  # the budget decides how many steps; --max_steps, if given, caps them
        total_steps = args.max_steps or float("inf")
    signals, log = StopSignals(), StepLog(run_dir, args, step, None if budget else total_steps, title, runtime)
    save = lambda: save_training(run_dir, model, optimizer, scaler, step, epoch, extra_state, settings, args, runtime)  # noqa: E731
    model.train()
    bad_steps, last_saved, stop, carry = 0, step if resuming else -1, None, 0.0
    batches = step_batches(train_set, collate_fn, sampler, steps_per_epoch, step, args, runtime, batch_repeats)
    while step < total_steps and not stop and not budget.time_up:
        t_step = time.perf_counter()
        lr = set_learning_rate(optimizer, step, budget, total_steps, args)
        epoch, micro_batches = next(batches)
        if make_batches is not None:
            micro_batches = make_batches(epoch, micro_batches, step)
        try:
            sums, metric_names = train_step(compiling.model, micro_batches, loss_fn, count_fn, runtime, dtype, scaler)
        except Exception as error:  # noqa: BLE001 - only a compiled step under --compile auto is retried (eagerly)
            if not compiling.fall_back(error):
                raise
            optimizer.zero_grad(set_to_none=True)
            sums, metric_names = train_step(compiling.model, micro_batches, loss_fn, count_fn, runtime, dtype, scaler)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        t_reduce = time.perf_counter()  # carry: the previous step's update and logging, timed after its reduce
        sums, finite, stop, seconds = agree_on_step(sums, grad_norm, signals.received is not None,
                                                    t_reduce - t_step + carry, runtime)
        budget.add(seconds)
        stop = signals.agreed(stop)
        step += 1
        decided = compiling.record(seconds, budget.seconds - budget.elapsed if budget else None, total_steps - step)
        if decided:
            log.metrics.log({"step": step, **decided})
        if finite:
            scaler.step(optimizer)
            bad_steps = 0
        else:  # skip the update; the weights stay those of the last good step
            bad_steps += 1
            log.skipped(step, bad_steps, args.max_bad_steps, sums[0], float(grad_norm))
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if bad_steps >= args.max_bad_steps:
            log.close()
            raise StageError(f"{bad_steps} steps in a row had a NaN/Inf loss or gradient (last at step {step}); "
                             f"stopping. The last good checkpoint is in {run_dir}. Try a lower --learning_rate, "
                             f"--dtype bfloat16/float32, or check the data")
        log.step(step, epoch, lr, float(grad_norm), sums, metric_names, finite, seconds)
        carry = time.perf_counter() - t_reduce
        if val_set is not None and args.eval_interval and (step % args.eval_interval == 0 or step == total_steps
                                                           or budget.time_up):
            log.validation(step, validation_loss(model, val_set, collate_fn, loss_fn, count_fn, args, runtime, dtype))
        if step % args.save_interval == 0 or stop:
            save()
            last_saved = step
    log.close()
    if budget:  # what the time went to, for speedrun.py's tokens/s
        log.metrics.log({"step": step, "train_seconds": round(budget.elapsed, 3), "steps_this_run": budget.n_steps})
    if last_saved != step:
        save()
    signals.restore()
    log.finish(step, stop)
    return model
