"""
--compile auto|on|off: whether the training steps run through torch.compile. auto, the stages' default, decides by
measuring, because neither answer is right everywhere: compiling costs tens of seconds on a CPU before the first
compiled step, and then wins per step or loses, by the model's shape and the machine (docs/performance.md). So auto

  1. trains eagerly and times EAGER_STEPS steps (after one warm-up step);
  2. if those say the rest of the run takes at least TRY_IF_SECONDS_LEFT, compiles (one step), then lets the
     compiled and the eager model take TURNS turns each, step by step, so that a machine that speeds up or slows
     down meanwhile (a shared machine's step times swing by tens of percent) slows both alike; a short run never
     pays for a compile;
  3. keeps the compiled model if its steps are faster (the median of the per-turn ratios), else the eager one, and
     says which in one line. A compile that fails (no C++ compiler, an op the compiler cannot handle), then or on a
     later recompile, goes back to eager with the reason instead of ending the run. After keeping it, auto still
     watches: a step that takes SLOW_STEP times the compiled median has recompiled for a new shape (padded batches,
     RL rollouts of every length), and after MAX_RECOMPILES of them auto goes back to eager for good, since each one
     costs as much as the first compile.

on compiles from the first step (and a failing compile ends the run); off never compiles. Every rank decides from
the same step times (the loop's agreed time), so all of them keep the same model. The measured steps are ordinary
training steps (both models share the weights): nothing is run twice.
"""
import statistics

import torch
from tqdm import tqdm

MODES = ("auto", "on", "off")
EAGER_STEPS = 3
TURNS = 8
TRY_IF_SECONDS_LEFT = 600.0
KEEP_IF_FASTER = 0.97  # compiled steps must beat eager ones by 3%: noise should not buy a slower run
SLOW_STEP = 3.0
MAX_RECOMPILES = 3


def compile_model(model):
    return torch.compile(model)


def keeps_compiled(compiled_vs_eager: float) -> bool:
    """auto's rule, on the median over turns of compiled step time / eager step time (bench/train.py applies it too)."""
    return compiled_vs_eager < KEEP_IF_FASTER


class CompileChoice:
    """The model the training steps run through: `.model`, updated by `record(seconds, ...)` after every step.
    model is the (possibly DDP-wrapped) module; the compiled one wraps it, so both share the weights."""

    def __init__(self, mode: str, model, is_master: bool = True, compile_fn=None):
        if mode not in MODES:
            raise ValueError(f"--compile {mode!r}: expected one of {', '.join(MODES)}")
        self.mode, self.eager, self.is_master = mode, model, is_master
        self.compile_fn = compile_fn or (lambda m: compile_model(m))  # looked up when used: tests replace it
        self.compiled = self.compile_fn(model) if mode == "on" else None
        self.phase = {"on": "compiled", "off": "eager", "auto": "timing_eager"}[mode]
        self.eager_times, self.turns = [], []  # turns: [(compiled s, eager s)], filled in that order
        self.recompiles = []  # auto, after keeping the compiled model: the seconds of each step that recompiled
        self.decision = None  # auto's measurement and verdict, for the metrics log
        self.news = None  # the decision, until record() hands it out once

    @property
    def model(self):
        if self.phase == "taking_turns":
            return self.eager if self.turns and len(self.turns[-1]) == 1 else self.compiled
        return self.compiled if self.phase in ("compiled", "compiling") else self.eager

    def record(self, seconds: float, seconds_left=None, steps_left=None):
        """After a step that took `seconds`: time it, and decide when auto has seen enough. seconds_left: what a time
        budget has left (None without one); steps_left: the planned steps still to run. Returns auto's decision
        (a dict for the metrics log) on the step it is made, else None."""
        self.time(seconds, seconds_left, steps_left)
        news, self.news = self.news, None
        return news

    def time(self, seconds, seconds_left, steps_left):
        if self.phase == "timing_eager":
            self.eager_times.append(seconds)
            if len(self.eager_times) < 1 + EAGER_STEPS:
                return
            eager = statistics.median(self.eager_times[1:])
            left = seconds_left if seconds_left is not None else eager * (steps_left or 0)
            if left < TRY_IF_SECONDS_LEFT:
                self.phase = "eager"  # too short to pay for a compile: nothing to say
                return
            self.compiled, self.phase = self.compile_fn(self.eager), "compiling"
        elif self.phase == "compiling":
            self.compile_s, self.phase = seconds, "taking_turns"
        elif self.phase == "taking_turns":
            if self.turns and len(self.turns[-1]) == 1:
                self.turns[-1] = (self.turns[-1][0], seconds)
            else:
                self.turns.append((seconds,))
            if len(self.turns) == TURNS and len(self.turns[-1]) == 2:
                self.decide()
        elif self.phase == "compiled" and self.mode == "auto" and seconds > SLOW_STEP * self.decision["compiled_step_s"]:
            self.recompiles.append(seconds)
            if len(self.recompiles) >= MAX_RECOMPILES:
                self.decision = self.news = {"compile": "dropped", "recompiles": len(self.recompiles),
                                             "recompile_s": round(sum(self.recompiles), 1)}
                self.say(f"--compile auto: {len(self.recompiles)} steps recompiled for new shapes "
                         f"({sum(self.recompiles):.0f} s): back to eager (--compile on forces it)")
                self.compiled, self.phase = None, "eager"

    def decide(self):
        ratio = statistics.median(c / e for c, e in self.turns)
        eager, compiled = statistics.median(e for _, e in self.turns), statistics.median(c for c, _ in self.turns)
        keep = keeps_compiled(ratio)
        self.decision = self.news = {"compile": "kept" if keep else "dropped", "compiled_vs_eager": round(ratio, 3),
                                     "eager_step_s": round(eager, 4), "compiled_step_s": round(compiled, 4),
                                     "compile_s": round(self.compile_s - compiled, 1)}
        self.say(f"--compile auto: compiled steps take {ratio:.2f}x the eager ones ({1000 * compiled:.0f} vs "
                 f"{1000 * eager:.0f} ms, compiling took {self.decision['compile_s']:.0f} s): "
                 + ("training on compiled" if keep else "back to eager (--compile on forces it)"))
        self.phase = "compiled" if keep else "eager"
        if not keep:
            self.compiled = None

    def fall_back(self, error: Exception) -> bool:
        """A step raised. True when auto was running it compiled: auto goes back to eager for good, and the caller
        reruns the step (its gradients zeroed). False: the error is the caller's to raise."""
        if self.mode != "auto" or self.compiled is None or self.model is not self.compiled:
            return False
        root = error  # the compiler's own error, which torch wraps (BackendCompilerFailed: backend='inductor' raised:)
        for _ in range(10):
            inner = root.__cause__ or getattr(root, "inner_exception", None)
            if inner is None:
                break
            root = inner
        lines = [line for line in str(root).splitlines() if line.strip()] or [""]
        reason = f"{type(root).__name__}: {lines[0].strip()[:200]}"
        self.say(f"--compile auto: compiling failed ({reason}); training on eagerly")
        self.decision = self.news = {"compile": "failed", "error": reason}
        self.compiled, self.phase = None, "eager"
        return True

    def say(self, line: str):
        if self.is_master:
            tqdm.write(line)  # between progress-bar redraws, not into the bar's line
