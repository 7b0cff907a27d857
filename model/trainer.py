"""
What every training stage shares: device/DDP setup, flags, the data order, AdamW + cosine schedule, the one
training loop, validation, atomic checkpoints with exact resume, logging (tqdm, metrics.jsonl, loss.png, wandb).

A stage script (1-pretrain.py, 3-full_sft.py, 4-dpo.py) builds its model and dataset, then calls

    fit(model, train_set, collate_fn, loss_fn, args, runtime, run_dir, val_set=...)

where loss_fn(model, batch) -> (loss, metrics dict, number of target tokens). The stages differ only in that.

Run directory layout (out/<stage>_<dim>[_moe]/):
    config.json, model.safetensors, tokenizer files   the newest weights: a save_pretrained directory that the
                                                      next stage, eval and export load
    step_000100/                                      one complete checkpoint per save (--keep_last N kept):
        config.json, model.safetensors, training_state.pt   (optimizer, scaler, step, data position, RNG)
    metrics.jsonl, loss.png                           one JSON line per log interval; the curve at the end
Every checkpoint is written under a temporary name and renamed when complete, so a crash mid-save leaves the
previous one loadable. training_state.pt holds only tensors and plain types: it loads with weights_only=True.
"""
import argparse
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from transformers.utils import logging as transformers_logging

from .checkpoint import SHAPE_FIELDS, _set_rng_state, _rng_state, list_checkpoints, save_checkpoint
from .model import Transformer
from .runtime import Runtime, StageError, autocast, resolve_dtype

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
    a("--min_lr_ratio", type=float, default=0.1, help="cosine schedule ends at learning_rate * this")
    a("--warmup_iters", type=int, default=d["warmup_iters"], help="linear warm-up steps")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay (not applied to norms/embeddings)")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="autocast precision; auto = bfloat16 on CUDA (float16 on GPUs without bf16) and on CPUs with "
           "native bf16 (AVX512-BF16/AMX), float32 elsewhere")
    a("--device", default="auto", help="auto (cuda > mps > cpu), or e.g. cuda:0, cpu")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--num_workers", type=int, default=0, help="DataLoader worker processes (0 = load in the main process)")
    a("--seed", type=int, default=1337, help="seed for initialisation and data order")
    a("--log_interval", type=int, default=d["log_interval"], help="log metrics every N steps")
    a("--save_interval", type=int, default=d["save_interval"], help="checkpoint every N steps (and at the end)")
    a("--eval_interval", type=int, default=d["eval_interval"], help="validation loss every N steps (0 = off)")
    a("--eval_batches", type=int, default=20, help="batches per validation pass (per process)")
    a("--keep_last", type=int, default=2, help="keep this many step checkpoints (the newest weights always stay)")
    a("--resume", action="store_true", help="continue the run in --out_dir from its newest checkpoint")
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


def model_overrides(args) -> dict:
    names = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len", "dropout",
             "rope_theta", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "aux_loss_alpha", "use_moe"]
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
# optimizer and schedule

def build_optimizer(model, learning_rate, weight_decay, device: torch.device):
    """AdamW with decay groups (Transformer.configure_optimizer), betas (0.9, 0.95) as in nanoGPT/Llama."""
    return model.configure_optimizer(weight_decay, learning_rate, betas=(0.9, 0.95), device_type=device.type)


def lr_at(step: int, total_steps: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to peak, then cosine decay to peak * min_ratio at total_steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------
# logging

class MetricsLog:
    """metrics.jsonl in the run directory (rank 0), optional wandb, and loss.png at the end."""

    def __init__(self, run_dir, args, resume_step: int, enabled: bool):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        rows = []
        if resume_step and os.path.exists(self.path):  # drop what the interrupted run logged after its checkpoint
            with open(self.path) as f:
                rows = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(self.path + ".tmp", self.path)
        if args.use_wandb:
            try:
                import wandb
            except ImportError:
                raise StageError("--use_wandb needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb_project, name=os.path.basename(run_dir), config=vars(args))

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def plot(self, title: str):
        if not self.enabled or not os.path.exists(self.path):
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        with open(self.path) as f:
            rows = [json.loads(line) for line in f]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, label=key, markersize=3)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(self.path), "loss.png"), dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# the loop

def _all_reduce(value: float, runtime: Runtime) -> float:
    """Sum a number over all processes."""
    if not runtime.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return t.item()


@torch.no_grad()
def evaluate(model, val_set, collate_fn, loss_fn, args, runtime, dtype) -> float:
    """Token-weighted mean loss over the first eval_batches batches of each rank's shard."""
    model.eval()
    # Fixed order, every example counted once, a short last batch allowed: a small val split still works.
    shard = list(range(runtime.rank, len(val_set), runtime.world_size))
    batches = [shard[i:i + args.batch_size] for i in range(0, len(shard), args.batch_size)]
    total, tokens = 0.0, 0
    loader = DataLoader(val_set, batch_sampler=batches, collate_fn=collate_fn, num_workers=args.num_workers,
                        generator=torch.Generator())
    for i, batch in enumerate(loader):
        if i >= args.eval_batches:
            break
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with autocast(runtime.device, dtype):
            loss, _, n_tokens = loss_fn(model, batch)
        total += loss.item() * n_tokens
        tokens += n_tokens
    model.train()
    return _all_reduce(total, runtime) / max(1.0, _all_reduce(tokens, runtime))


def fit(model, train_set, collate_fn, loss_fn, args, runtime: Runtime, run_dir: str, val_set=None,
        title="training", extra_state=None):
    """The training loop all stages share. Returns the trained (unwrapped) model.

    extra_state: a dict of tensors saved with every checkpoint (e.g. DPO's cached reference log-probs).
    """
    from tqdm import tqdm

    dtype = resolve_dtype(args.dtype, runtime.device)
    torch.manual_seed(args.seed)
    if runtime.is_master:
        os.makedirs(run_dir, exist_ok=True)
        for stale in os.listdir(run_dir):  # temporaries of a save that crashed
            if stale.startswith(".tmp_step_"):
                shutil.rmtree(os.path.join(run_dir, stale), ignore_errors=True)

    sampler = ResumableBatchSampler(len(train_set), args.batch_size, args.seed, runtime.rank, runtime.world_size)
    steps_per_epoch = len(sampler) // args.accumulation_steps
    if steps_per_epoch == 0:
        raise StageError(f"{len(sampler)} batches per epoch is fewer than --accumulation_steps {args.accumulation_steps}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    model.to(runtime.device)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=dtype == "float16")
    step, epoch, batch_in_epoch = 0, 0, 0

    checkpoints = list_checkpoints(run_dir) if args.resume else []
    if args.resume and not checkpoints:
        raise StageError(f"--resume: no checkpoint in {run_dir} (step_*/training_state.pt); start without --resume")
    if checkpoints:
        latest = checkpoints[-1]
        state = torch.load(os.path.join(latest, "training_state.pt"), map_location="cpu", weights_only=True)
        resumed = Transformer.from_pretrained(latest)
        for name in SHAPE_FIELDS:
            if getattr(resumed.config, name) != getattr(model.config, name):
                raise StageError(f"checkpoint {latest} has {name}={getattr(resumed.config, name)} but this run's model "
                                 f"has {getattr(model.config, name)}; resume with the same settings")
        model.load_state_dict(resumed.state_dict(), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if extra_state is not None:
            extra_state.update(state.get("extra", {}))
        _set_rng_state(state["rng"][runtime.rank] if runtime.rank < len(state["rng"]) else state["rng"][0])
        if runtime.is_master:
            print(f"resumed from {latest} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    train_model = model
    if args.compile:
        train_model = torch.compile(train_model)
    if runtime.ddp:
        train_model = DDP(train_model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)

    metrics = MetricsLog(run_dir, args, step, runtime.is_master)
    stop_signal = {"received": None}

    def request_stop(signum, frame):
        stop_signal["received"] = signal.Signals(signum).name
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint():
        # every rank's RNG travels in the file, so each resumes its own stream
        rng = [_rng_state()]
        if runtime.ddp:
            gathered = [None] * runtime.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if runtime.is_master:
            save_checkpoint(run_dir, model, {
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": total_steps,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                "extra": extra_state or {}}, args.keep_last)
        if runtime.ddp:
            dist.barrier()

    bar = tqdm(total=total_steps, initial=step, desc=title, disable=not runtime.is_master, dynamic_ncols=True)
    model.train()
    bad_steps, tokens_since_log, time_since_log = 0, 0, time.time()
    last_saved = step if checkpoints else -1
    log_loss, log_count = 0.0, 0
    while step < total_steps and stop_signal["received"] is None:
        sampler.set_epoch(epoch, batch_in_epoch)
        # Own generator: creating a DataLoader iterator draws a seed, which must not come from the global RNG
        # (a resumed run creates its iterator mid-epoch, so dropout would see a shifted random stream).
        batches = iter(DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                  num_workers=args.num_workers, pin_memory=runtime.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(args.seed + epoch)))
        while step < total_steps and batch_in_epoch + args.accumulation_steps <= len(sampler):
            lr = lr_at(step, total_steps, args.warmup_iters, args.learning_rate, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_metrics, step_tokens = 0.0, {}, 0
            for micro in range(args.accumulation_steps):
                batch = {k: v.to(runtime.device, non_blocking=True) for k, v in next(batches).items()}
                sync = not runtime.ddp or micro == args.accumulation_steps - 1
                with (nullcontext() if sync else train_model.no_sync()), autocast(runtime.device, dtype):
                    loss, batch_metrics, n_tokens = loss_fn(train_model, batch)
                scaler.scale(loss / args.accumulation_steps).backward()
                step_loss += loss.item() / args.accumulation_steps
                step_tokens += n_tokens
                for k, v in batch_metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / args.accumulation_steps
            batch_in_epoch += args.accumulation_steps
            step += 1

            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            # one all-reduce per step answers both: did any rank see a non-finite value, did any get a signal
            flags = torch.tensor([float(not (math.isfinite(step_loss) and bool(torch.isfinite(grad_norm)))),
                                  float(stop_signal["received"] is not None)], device=runtime.device)
            if runtime.ddp:
                dist.all_reduce(flags)
            finite = flags[0].item() == 0
            if flags[1].item() > 0 and stop_signal["received"] is None:
                stop_signal["received"] = "a signal on another process"
            if finite:
                scaler.step(optimizer)
                bad_steps = 0
            else:  # skip the update; the weights stay those of the last good step
                bad_steps += 1
                metrics.log({"step": step, "skipped_update": "non-finite loss or gradient"})
                if runtime.is_master:
                    tqdm.write(f"step {step}: non-finite loss ({step_loss}) or gradient norm ({float(grad_norm)}); "
                               f"update skipped ({bad_steps}/{args.max_bad_steps} in a row)")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if bad_steps >= args.max_bad_steps:
                bar.close()
                raise StageError(f"{bad_steps} steps in a row had a NaN/Inf loss or gradient (last at step {step}); "
                                 f"stopping. The last good checkpoint is in {run_dir}. Try a lower --learning_rate, "
                                 f"--dtype bfloat16/float32, or check the data")

            tokens_since_log += step_tokens
            if finite:
                log_loss, log_count = log_loss + step_loss, log_count + 1
            bar.update(1)
            if step % args.log_interval == 0 or step == total_steps:
                elapsed = time.time() - time_since_log
                tokens_per_s = _all_reduce(tokens_since_log, runtime) / max(elapsed, 1e-9)
                mean_loss = _all_reduce(log_loss / max(1, log_count), runtime) / runtime.world_size
                row = {"step": step, "epoch": epoch, "loss": round(mean_loss, 5), "lr": lr,
                       "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tokens_per_s, 1)}
                row.update({k: round(_all_reduce(v, runtime) / runtime.world_size, 5) for k, v in step_metrics.items()})
                metrics.log(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
                tokens_since_log, time_since_log, log_loss, log_count = 0, time.time(), 0.0, 0
            if val_set is not None and args.eval_interval and (step % args.eval_interval == 0 or step == total_steps):
                val_loss = evaluate(model, val_set, collate_fn, loss_fn, args, runtime, dtype)
                metrics.log({"step": step, "val_loss": round(val_loss, 5)})
                if runtime.is_master:
                    tqdm.write(f"step {step}: val_loss {val_loss:.4f}")
            if step % args.save_interval == 0 or stop_signal["received"]:
                checkpoint()
                last_saved = step
            if stop_signal["received"]:
                break
        if batch_in_epoch + args.accumulation_steps > len(sampler):
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if last_saved != step:
        checkpoint()
    for s, handler in previous_handlers.items():
        signal.signal(s, handler)
    metrics.plot(title)
    if runtime.is_master:
        if stop_signal["received"]:
            print(f"stopped by {stop_signal['received']} at step {step}; checkpoint saved in {run_dir} "
                  f"(continue with --resume)")
        else:
            print(f"done: {step} steps, weights in {run_dir}")
    return model
