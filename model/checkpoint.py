"""
Checkpoints and run directories: load the previous stage's run strictly (model/stages.py finds it), save training checkpoints
atomically, list and prune them, restore the training state for an exact resume.

Run directory layout (out/<stage>_<dim>[_moe]/):
    config.json, model.safetensors, tokenizer files   the newest weights: a save_pretrained directory that the
                                                      next stage, eval and export load
    step_000100/                                      one complete checkpoint per save (--keep_last N kept):
        config.json, model.safetensors, training_state.pt   (optimizer, scaler, step, data position, RNG)
    metrics.jsonl, loss.png                           one JSON line per log interval; the curve at the end
A LoRA run (--lora_rank) holds its adapter instead of model.safetensors, top level and per step (model/lora.py).
Every checkpoint is written under a temporary name and renamed when complete, so a crash mid-save leaves the
previous one loadable. training_state.pt holds only tensors and plain types: it loads with weights_only=True.
"""
import os
import random
import shutil
import time

import numpy as np
import torch

from . import lora
from .LMConfig import LMConfig
from .model import Transformer
from .chat import DEFAULT_TOKENIZER_DIR, TOKENIZER_FILES, load_tokenizer, tokenizer_sha256
from .errors import StageError

# Fields that change a tensor's shape: a checkpoint must agree on all of them to be loaded.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "use_moe",
                "n_routed_experts", "n_shared_experts")


def load_init_model(init_dir: str, overrides: dict) -> Transformer:
    """Load the previous stage's weights strictly. A requested shape that differs from them is an error; the
    other fields given (dropout, aux_loss_alpha, max_seq_len, ...) go into the config BEFORE the modules are
    built, so the run trains with the values its config.json records. A LoRA run is merged into its base."""
    if lora.is_adapter_dir(init_dir):
        # a LoRA run: its checked base (merged too if it was a LoRA run), then this adapter merged in
        return lora.merge_adapter(load_init_model(lora.checked_base(init_dir), overrides), init_dir)
    if not init_dir or not os.path.isfile(os.path.join(init_dir, "model.safetensors")):
        raise StageError(f"no checkpoint to initialise from at {init_dir!r}: run the previous stage first or "
                         f"pass --init_from DIR")
    config = LMConfig.from_pretrained(init_dir)
    for name, value in overrides.items():
        if name in SHAPE_FIELDS and getattr(config, name) != value:
            raise StageError(f"--{name} {value} does not match the checkpoint {init_dir} ({name}={getattr(config, name)}); "
                             f"drop the flag or pick a checkpoint of that shape")
        setattr(config, name, value)
    try:
        return Transformer.from_pretrained(init_dir, config=config)
    except ValueError as err:
        raise StageError(str(err)) from None


def tokenizer_dir_for(args, checkpoint_dir=None) -> str:
    """--tokenizer_dir, else the checkpoint's own copy, else the shipped model/tokenizer/."""
    if args.tokenizer_dir:
        return args.tokenizer_dir
    if checkpoint_dir and os.path.isfile(os.path.join(checkpoint_dir, "tokenizer.json")):
        return checkpoint_dir
    return DEFAULT_TOKENIZER_DIR


def start_from_checkpoint(init_dir: str, args, overrides: dict):
    """The previous stage's model (strictly loaded) and its tokenizer: (model, tokenizer, tokenizer_dir).
    A --tokenizer_dir that is not the tokenizer the checkpoint was trained with is refused, even when both
    have the same size: the ids would silently mean other text."""
    model = load_init_model(init_dir, overrides)
    tokenizer_dir = tokenizer_dir_for(args, init_dir)
    trained_with = os.path.join(init_dir, "tokenizer.json")
    if os.path.isfile(trained_with) and tokenizer_sha256(tokenizer_dir) != tokenizer_sha256(init_dir):
        raise StageError(f"tokenizer {tokenizer_dir} (sha256 {tokenizer_sha256(tokenizer_dir)[:12]}) is not the one "
                         f"{init_dir} was trained with (sha256 {tokenizer_sha256(init_dir)[:12]}): drop "
                         f"--tokenizer_dir to use the checkpoint's own")
    return model, load_tokenizer(tokenizer_dir, model.config.vocab_size), tokenizer_dir


# ----------------------------------------------------------------------------------------------------------
# the run directory

def list_checkpoints(run_dir: str):
    """Complete step checkpoints, oldest first (by step number: names stop sorting as strings past 999,999)."""
    if not os.path.isdir(run_dir):
        return []
    steps = sorted(int(n[5:]) for n in os.listdir(run_dir) if n.startswith("step_") and n[5:].isdigit())
    paths = [os.path.join(run_dir, f"step_{step:06d}") for step in steps]
    return [p for p in paths if os.path.isfile(os.path.join(p, "training_state.pt"))]


def holds_a_run(run_dir: str) -> bool:
    return bool(list_checkpoints(run_dir)) or os.path.isfile(os.path.join(run_dir, "model.safetensors")) or \
        lora.is_adapter_dir(run_dir)


def prepare_run_dir(run_dir: str, resume, overwrite: bool, runtime) -> bool:
    """Decide whether this start resumes, and make the run directory ready. Returns True when resuming.

    resume: None (a fresh run), "yes" (--resume: must resume) or "auto" (resume when the directory holds
    checkpoints, else start fresh: what `torchrun --max_restarts` needs). A fresh run never mixes with an old
    one: a directory that already holds a run is an error unless --overwrite, which moves the old run aside
    (<run_dir>.replaced-<time>) rather than deleting it. Every rank reaches the same decision before rank 0
    touches anything.
    """
    has_run, checkpoints = holds_a_run(run_dir), list_checkpoints(run_dir)
    resuming = resume == "yes" or (resume == "auto" and bool(checkpoints))
    if resume == "yes" and not checkpoints:
        raise StageError(f"--resume: no checkpoint in {run_dir} (step_*/training_state.pt); start without --resume")
    if not resuming and has_run and not overwrite:
        raise StageError(f"{run_dir} already holds a run: continue it with --resume, or start over with --overwrite "
                         f"(moves the old run aside), or pick another --out_dir")
    runtime.barrier()
    if runtime.is_master:
        if not resuming and has_run:
            aside = f"{run_dir.rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(run_dir, aside)
            print(f"moved the old run in {run_dir} to {aside}")
        os.makedirs(run_dir, exist_ok=True)
        clean_interrupted_save(run_dir)
    runtime.barrier()
    return resuming


def clean_interrupted_save(run_dir: str):
    """Undo what a kill in the middle of save_checkpoint left: a partial .tmp_step_N (removed), and a
    step_N.old that was being replaced (put back if its replacement never arrived, else removed)."""
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(".tmp_step_"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith("step_") and name.endswith(".old"):
            if os.path.exists(path[:-4]):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, path[:-4])


# ----------------------------------------------------------------------------------------------------------
# saving

def _atomic_link(src: str, dst: str):
    """Make dst a hard link to (or copy of) src, replacing any old dst in one rename."""
    tmp = f"{dst}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_rest": [int(v) if i < 2 else float(v) for i, v in enumerate(np.random.get_state()[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["numpy_rest"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, model, training_state: dict, keep_last: int):
    """Write run_dir/step_N/ completely under a temporary name, rename it, then point the run directory's
    top-level weights at it. Any crash before the rename leaves the previous checkpoint as it was."""
    step = training_state["step"]
    final = os.path.join(run_dir, f"step_{step:06d}")
    tmp = os.path.join(run_dir, f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.is_lora(model):  # the adapter and a reference to its base, never the base's weights
        lora.save_adapter(model, tmp)
    else:
        model.save_pretrained(tmp)
    torch.save(training_state, os.path.join(tmp, "training_state.pt"))
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(final):  # re-saving a step after a resume: move the old one aside first
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.rename(final, final + ".old")
    os.rename(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", *lora.ADAPTER_FILES):
        if os.path.exists(os.path.join(final, name)):
            _atomic_link(os.path.join(final, name), os.path.join(run_dir, name))
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------------
# resuming

# Settings a resumed run must share with the run it continues: each decides which example a step sees, what it
# holds, or what an id means. total_steps may change (a longer --max_steps): the schedule is then re-fitted from
# there on. ptx_*: the pretraining replay (None: no replay) and its file's length in rows, which the rows drawn
# depend on; doc_mask: whether packed documents see each other.
MUST_MATCH = ("batch_size", "accumulation_steps", "world_size", "seed", "data", "n_examples", "tokenizer_sha256",
              "doc_mask", "ptx_data", "ptx_file_rows", "ptx_rows", "ptx_seq_len")


def check_settings(saved: dict, current: dict, where: str):
    changed = [f"{k} {saved[k]!r} -> {current.get(k)!r}" for k in MUST_MATCH
               if k in saved and saved[k] != current.get(k)]
    if changed:
        raise StageError(f"cannot resume {where}: {'; '.join(changed)} changed since it was saved (they decide which "
                         f"examples each step sees); resume with the old values, or start a new run")
    if saved.get("total_steps") not in (None, current.get("total_steps")):
        print(f"note: total steps {saved['total_steps']} -> {current['total_steps']}: the learning-rate schedule "
              f"is re-fitted to the new length from the resumed step on")


def restore(run_dir: str, model, optimizer, scaler, settings: dict, runtime) -> dict:
    """Load the newest checkpoint of run_dir into model / optimizer / scaler and this rank's RNG; returns the
    training state (step, extra, ...). Refuses a checkpoint of another shape or with incompatible settings."""
    latest = list_checkpoints(run_dir)[-1]
    state = torch.load(os.path.join(latest, "training_state.pt"), map_location="cpu", weights_only=True)
    check_settings(state.get("settings", {}), settings, latest)
    if lora.is_lora(model) or lora.is_adapter_dir(latest):
        lora.restore_adapter(model, latest)  # checks the kind of run, the LoRA settings and the base
    else:
        saved = Transformer.from_pretrained(latest)
        for name in SHAPE_FIELDS:
            if getattr(saved.config, name) != getattr(model.config, name):
                raise StageError(f"checkpoint {latest} has {name}={getattr(saved.config, name)} but this run's "
                                 f"model has {getattr(model.config, name)}; resume with the same settings")
        model.load_state_dict(saved.state_dict(), strict=True)
    trained, training = state.get("settings", {}).get("trainable_params"), settings.get("trainable_params")
    if trained not in (None, training):  # same shape, other parameters in the optimizer (--freeze_embeddings)
        raise StageError(f"cannot resume {latest}: it trained {trained:,} parameters (trainable_params), this run "
                         f"trains {training:,}; resume with the same --freeze_embeddings, or start a new run")
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][runtime.rank])
    if runtime.is_master:
        print(f"resumed from {latest} at step {state['step']}")
    return state


def copy_tokenizer(tokenizer_dir: str, run_dir: str):
    """Put the tokenizer beside the weights, so the run directory is self-contained for the next stage."""
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src) and os.path.abspath(tokenizer_dir) != os.path.abspath(run_dir):
            shutil.copy2(src, os.path.join(run_dir, name + ".tmp"))
            os.replace(os.path.join(run_dir, name + ".tmp"), os.path.join(run_dir, name))


