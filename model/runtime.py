"""
The runtime every script shares: user-facing errors, the device / DDP / precision rules for training and for
inference side by side, and the one reporter of bad input lines.

    run_stage(main)            a script's main(); a StageError becomes one line on stderr and exit code 1
    init_runtime(device)       pick cuda > mps > cpu, join the process group when launched by torchrun; on CPU,
                               keep freed memory for reuse (keep_freed_memory)
    training_precision / autocast  training precision (bf16 where it is fast, fp32 elsewhere)
    pick_device / inference_dtype  inference device and weight dtype (fp32 on CPUs: scores do not depend on the CPU)
"""
import ctypes
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import StageError


def run_stage(main):
    """Run a script's main(); errors the user can fix become one line on stderr and exit code 1."""
    # Status lines must reach a log file as they are printed (`nohup python 1-pretrain.py > log`): a killed
    # run would otherwise lose the block-buffered tail, which is exactly the part that says what happened.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# training: device, DDP, precision

@dataclass
class Runtime:
    device: torch.device
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_master(self):
        return self.rank == 0

    def barrier(self):
        if self.ddp:
            dist.barrier()


def init_runtime(device_arg="auto") -> Runtime:
    """Pick the device (cuda > mps > cpu) and join the process group when launched by torchrun."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_arg == "auto":
        if torch.cuda.is_available():
            device_arg = f"cuda:{local_rank}"
        elif torch.backends.mps.is_available() and not ddp:
            device_arg = "mps"
        else:
            device_arg = "cpu"
    device = torch.device(device_arg)
    if device.type == "cpu":
        keep_freed_memory()
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt:
            # After `torchrun --max_restarts` restarted the group, the launcher's store still holds the dead
            # workers' addresses under the same keys; a fresh prefix per attempt keeps the new group from
            # connecting to them (gloo: "connectFullMesh ... Connection refused").
            store, rank, world_size = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"nano-llm/attempt_{attempt}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend)
    return Runtime(device, ddp, rank, local_rank, world_size)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default a block over 32 MiB is its own mmap and freed memory at the heap's top is trimmed, so a training
    step's large CPU tensors (the logits: batch x seq x vocab floats, their gradient, autocast's copies) come back
    as fresh pages every step, which the kernel faults in and zeroes one by one: a fifth to a third of a small
    model's step (docs/performance.md). With fixed thresholds every block comes from the heap and is reused; the
    process keeps its peak memory rather than shrinking between steps. -> whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): its malloc has its own policy
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only with native support (AVX512-BF16 / AMX); on an AVX2-only CPU they are
    emulated and ~10x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(dtype: str, device: torch.device) -> str:
    """Training precision: bf16 on CUDA (fp16 without bf16) and on CPUs with native bf16, fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def all_reduce_sum(value, runtime: Runtime):
    """Sum a number or a tensor over all processes (a float comes back as a float)."""
    if not runtime.ddp:
        return value
    t = value.detach().clone() if torch.is_tensor(value) else torch.tensor([float(value)], dtype=torch.float64)
    t = t.to(runtime.device)
    dist.all_reduce(t)
    return t if torch.is_tensor(value) else t.item()


# ----------------------------------------------------------------------------------------------------------
# stopping cleanly

class StopSignals:
    """SIGINT/SIGTERM request a clean stop: checkpoint, then exit. A signal is only noted here; whether the run
    stops is decided from the all-reduced flag, so every process stops at the same step (a rank acting on its
    own flag would enter the checkpoint's collectives while the others start the next step: a hang)."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)}

    def note(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, any_rank_received: bool):
        return (self.received or "a signal on another process") if any_rank_received else None

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------------
# inference: device and weight dtype

def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    # CPUs: float32 even where bf16 is fast, so scores do not depend on the machine's instruction set.
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)
