"""
What a run logs: the progress bar, metrics.jsonl in the run directory (one JSON row per log interval /
validation pass, written by rank 0), optionally Weights & Biases, and loss.png at the end of the stage.
"""
import json
import os
import time

from tqdm import tqdm

from .errors import StageError


def read_rows(path: str, up_to_step=None) -> list:
    """The rows of a metrics.jsonl, stopping at a torn last line (a kill in the middle of a write)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if up_to_step is None or row.get("step", 0) <= up_to_step:
                rows.append(row)
    return rows


class MetricsLog:
    """metrics.jsonl in the run directory (rank 0), optional wandb, and loss.png at the end."""

    def __init__(self, run_dir, args, resume_step: int, enabled: bool):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        # On resume, keep what was logged up to the checkpoint (the steps after it are re-run and re-logged).
        rows = read_rows(self.path, up_to_step=resume_step) if resume_step else []
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def plot(self, title: str):
        if not self.enabled or not os.path.exists(self.path):
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = read_rows(self.path)
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, label=key, markersize=3)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(self.path), "loss.png"), dpi=100)
        plt.close(fig)


class StepLog:
    """The progress bar, metrics.jsonl rows every log_interval steps, and the closing lines (rank 0)."""

    def __init__(self, run_dir, args, step, total_steps, title, runtime):
        self.run_dir, self.args, self.title, self.runtime = run_dir, args, title, runtime
        self.metrics = MetricsLog(run_dir, args, step, runtime.is_master)
        self.bar = tqdm(total=total_steps, initial=step, desc=title, disable=not runtime.is_master, dynamic_ncols=True)
        self.total_steps = total_steps
        self.reset()

    def reset(self):
        self.since, self.time = [], time.time()  # sums over the steps since the last row

    def step(self, step, epoch, lr, grad_norm, sums, metric_names, finite):
        """sums: [loss, metric..., targets, tokens] over all processes for this step."""
        self.bar.update(1)
        if finite:
            self.since = sums if not self.since else [a + b for a, b in zip(self.since, sums)]
        if step % self.args.log_interval and step != self.total_steps or not self.since:
            return
        *values, targets, tokens = self.since
        tokens_per_s = tokens / max(time.time() - self.time, 1e-9)
        row = {"step": step, "epoch": epoch, "loss": round(values[0] / max(targets, 1), 5), "lr": lr,
               "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens_per_s, 1)}
        row.update({name: round(v / max(targets, 1), 5) for name, v in zip(metric_names, values[1:])})
        self.metrics.log(row)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        self.reset()

    def skipped(self, step, bad_steps, max_bad_steps, loss, grad_norm):
        self.metrics.log({"step": step, "skipped_update": "non-finite loss or gradient"})
        if self.runtime.is_master:
            tqdm.write(f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped "
                       f"({bad_steps}/{max_bad_steps} in a row)")

    def validation(self, step, val_loss):
        self.metrics.log({"step": step, "val_loss": round(val_loss, 5)})
        if self.runtime.is_master:
            tqdm.write(f"step {step}: val_loss {val_loss:.4f}")

    def close(self):
        self.bar.close()

    def finish(self, step, stop):
        self.metrics.plot(self.title)
        if not self.runtime.is_master:
            return
        if stop:
            print(f"stopped by {stop} at step {step}; checkpoint saved in {self.run_dir} (continue with --resume)")
        else:
            print(f"done: {step} steps, weights in {self.run_dir}")
