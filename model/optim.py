"""
Optimizers and learning-rate schedules for the trainer: AdamW with decay groups (or Muon for the hidden
matrices), cosine or warmup-stable-decay, and the step count a wall-clock budget allows (--max_minutes).
"""
import math

import torch


def build_optimizer(model, learning_rate, weight_decay, device: torch.device, kind: str = "adamw"):
    """AdamW with decay groups (Transformer.configure_optimizer), betas (0.9, 0.95) as in nanoGPT/Llama.
    kind="muon": Muon for the 2-D matrices inside the blocks, AdamW (no decay) for embeddings and 1-D params."""
    if kind == "adamw":
        return model.configure_optimizer(weight_decay, learning_rate, betas=(0.9, 0.95), device_type=device.type)
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() == 2 and id(p) not in embeddings]
    others = [p for p in params if not (p.dim() == 2 and id(p) not in embeddings)]
    # match_rms_adamw scales each update to AdamW's RMS, so one --learning_rate serves both optimizers
    return ChainedOptimizer([
        torch.optim.Muon(matrices, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(others, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0,
                          fused=device.type in ("cuda", "cpu") or None)])


class ChainedOptimizer:
    """Several optimizers stepped as one (param_groups, step, zero_grad, state_dict): what fit needs."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


def lr_at(step: int, total_steps: float, warmup: int, peak: float, min_ratio: float, schedule: str = "cosine",
          decay_frac: float = 0.2) -> float:
    """Linear warm-up to peak, then down to peak * min_ratio at total_steps: cosine, or (wsd) flat at peak
    until the last decay_frac of the steps and linear from there."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":
        decay_start = total_steps * (1 - decay_frac)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1e-9, total_steps - decay_start))
        return peak * (1 - (1 - min_ratio) * progress)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def budget_steps(step: int, elapsed: float, budget: float) -> float:
    """With a time budget (seconds): the steps that fit at the pace so far (before the first step: unknown)."""
    return step * budget / elapsed if step and elapsed > 0 else float("inf")


class TimeBudget:
    """--max_minutes: a wall-clock budget for the training steps (validation and saves do not count). The schedule
    is fitted to the steps that fit at the pace so far, and training stops at the step boundary nearest the
    budget. Falsy when there is no budget; the elapsed step time is kept either way."""

    def __init__(self, minutes=None):
        self.seconds = (minutes or 0) * 60
        self.elapsed, self.n_steps = 0.0, 0  # seconds of training steps and their count, in this run

    def __bool__(self):
        return self.seconds > 0

    def plan(self, step, total_steps, warmup):
        """(steps the schedule plans for, warm-up steps) at `step`: the budget's estimate, capped by total_steps."""
        if not self:
            return total_steps, warmup
        planned = min(total_steps, budget_steps(step, self.elapsed, self.seconds))
        if planned != float("inf"):  # a warm-up longer than a tenth of the run would eat the budget
            warmup = max(1, min(warmup, int(0.1 * planned)))
        return planned, warmup

    def add(self, seconds):
        self.elapsed += seconds
        self.n_steps += 1

    @property
    def time_up(self):
        """Over or short of the budget by half a step at most."""
        return bool(self) and self.n_steps > 0 and self.elapsed + 0.5 * self.elapsed / self.n_steps >= self.seconds
