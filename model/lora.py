"""
LoRA fine-tuning through peft: low-rank adapters on the attention and FFN projections, the base frozen.

    python 3-full_sft.py --lora_rank 16                 # SFT trains the adapters only
    python 4-dpo.py --lora_rank 16                      # DPO too; the reference is the base (adapters disabled)

A LoRA run directory holds no base weights. Beside the usual run files it has
    adapter_config.json, adapter_model.safetensors    the adapter in peft's own format (PeftModel.from_pretrained
                                                      loads it onto the base)
    lora_base.json                                    which base: its path (relative to this directory and
                                                      absolute), the sha256 of its weights file, its shape fields
    config.json, tokenizer files                      the base's, so the directory describes itself
and so does every step_N/ (plus training_state.pt). Loading is strict: a base whose shape or weights changed
since the adapter was trained is refused with one line naming the mismatch.

A base may itself be a LoRA run (LoRA DPO on LoRA SFT): its adapter is merged into its own base first, and the
new adapter trains on that merged model. Loading follows the chain (each link checked) and merges it again;
the merge is deterministic, so the rebuilt base is the one the adapter was trained on. Everything that loads a
checkpoint (the stages' --init_from, evaluate.load_checkpoint, export_model.py) goes through
checkpoint.load_init_model, which loads the checked base and merges the adapter (merge_adapter).

peft is imported only when LoRA is used (it takes seconds to import).
"""
import hashlib
import json
import os
import warnings
from contextlib import nullcontext

import torch

from .LMConfig import LMConfig
from .errors import StageError

ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE = "adapter_config.json", "adapter_model.safetensors", "lora_base.json"
ADAPTER_FILES = (BASE_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # link order: the weights last
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# the fields that decide a tensor's shape (checkpoint.SHAPE_FIELDS; repeated to avoid a circular import)
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "use_moe",
                "n_routed_experts", "n_shared_experts")


def add_lora_args(parser):
    a = parser.add_argument
    a("--lora_rank", type=int, default=0, help="LoRA rank: train low-rank adapters on a frozen base (0 = off, "
                                               "full fine-tuning)")
    a("--lora_alpha", type=float, default=None, help="LoRA scale numerator (the update is alpha/rank * BA; "
                                                     "default 2 * rank)")
    a("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input")
    a("--lora_targets", nargs="+", default=list(DEFAULT_TARGETS),
      help="module names that get adapters (attention wq wk wv wo, FFN/experts w1 w2 w3); embeddings and norms "
           "stay frozen")
    a("--freeze_embeddings", action="store_true",
      help="full fine-tuning with the (tied) token embedding / output layer frozen: fine-tuning on a few names then "
           "cannot push their tokens' output scores up for every prompt (LoRA leaves it frozen anyway)")


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def is_adapter_dir(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)) and \
        not os.path.isfile(os.path.join(path, "model.safetensors"))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def identity(checkpoint_dir: str) -> str:
    """sha256 of what a checkpoint directory's weights are: model.safetensors, or for a LoRA run its adapter
    (whose own base is checked, link by link, when it is loaded)."""
    name = ADAPTER_WEIGHTS if is_adapter_dir(checkpoint_dir) else "model.safetensors"
    return file_sha256(os.path.join(checkpoint_dir, name))


# ----------------------------------------------------------------------------------------------------------
# training

def maybe_wrap(model, args, base_dir: str):
    """--lora_rank 0: the model as it is (--freeze_embeddings: its embeddings frozen). Else a peft model whose adapters (only) train; base_dir is where model
    came from (recorded in every checkpoint). Seeds torch with --seed first, as 1-pretrain.py does before it
    builds its model: the adapters' initialisation and the dropout stream of a fresh run follow from --seed."""
    if not getattr(args, "lora_rank", 0):
        if getattr(args, "freeze_embeddings", False):
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):  # tied: one tensor
                layer.weight.requires_grad_(False)
        return model
    from peft import LoraConfig
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank
    config = LoraConfig(r=args.lora_rank, lora_alpha=alpha, lora_dropout=args.lora_dropout,
                        target_modules=list(args.lora_targets), bias="none")
    torch.manual_seed(args.seed)
    peft_model = _inject(model, config)
    peft_model.lora_base = base_reference(base_dir, model.config)
    return peft_model


def _inject(model, config):
    from peft import get_peft_model
    found = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.target_modules if t not in found]
    if missing:
        raise StageError(f"--lora_targets {' '.join(missing)}: no such module in the model (targets: "
                         f"{' '.join(DEFAULT_TARGETS)})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes peft triggers
        return get_peft_model(model, config)


def base_reference(base_dir: str, config) -> dict:
    return {"base_dir": os.path.abspath(base_dir), "base_sha256": identity(base_dir),
            "base_config": {name: getattr(config, name) for name in SHAPE_FIELDS}}


def trainable_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"training {train:,} of {total:,} parameters ({train / max(1, total):.2%})"


def reference_mode(model):
    """The reference policy of DPO: the base with the adapters switched off (no second copy of the model)."""
    return model.disable_adapter() if is_lora(model) else nullcontext()


# ----------------------------------------------------------------------------------------------------------
# saving and loading

def save_adapter(model, directory: str):
    """adapter_config.json + adapter_model.safetensors (peft's format), lora_base.json, the base's config.json."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    model.peft_config["default"].save_pretrained(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    reference = dict(model.lora_base)
    reference["base_dir_relative"] = os.path.relpath(reference["base_dir"], run_dir_of(directory))
    with open(os.path.join(directory, BASE_FILE), "w") as f:
        json.dump(reference, f, indent=1)
    model.get_base_model().config.save_pretrained(directory)


def run_dir_of(directory: str) -> str:
    """The run directory a checkpoint belongs to: a step_N/ (or the .tmp_step_N/ it is written as) shares its
    run's lora_base.json (the top-level file is a hard link), so relative base paths start from the run."""
    directory = os.path.abspath(directory)
    name = os.path.basename(directory.rstrip(os.sep))
    return os.path.dirname(directory) if name.startswith(("step_", ".tmp_step_")) else directory


def read_reference(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, BASE_FILE)
    if not os.path.isfile(path):
        raise StageError(f"{adapter_dir} holds an adapter but no {BASE_FILE}: cannot tell which base it belongs to")
    with open(path) as f:
        return json.load(f)


def resolve_base(adapter_dir: str, reference: dict) -> str:
    """The base directory: relative to the adapter first (a moved out/ tree still works), else the absolute path."""
    candidates = [reference["base_dir"]]
    if reference.get("base_dir_relative"):
        candidates.insert(0, os.path.join(run_dir_of(adapter_dir), reference["base_dir_relative"]))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "model.safetensors")) or is_adapter_dir(candidate):
            return os.path.normpath(candidate)
    raise StageError(f"the base of adapter {adapter_dir} is gone: {reference['base_dir']} holds no weights")


def check_base(adapter_dir: str, reference: dict, base_dir: str):
    """One line naming the first mismatch between the base on disk and the one the adapter was trained on."""
    config = LMConfig.from_pretrained(base_dir)
    for name, value in reference["base_config"].items():
        if getattr(config, name) != value:
            raise StageError(f"adapter {adapter_dir} was trained on a base with {name}={value}, but its base "
                             f"{base_dir} has {name}={getattr(config, name)}: not the same model")
    sha = identity(base_dir)
    if sha != reference["base_sha256"]:
        raise StageError(f"base {base_dir} changed since adapter {adapter_dir} was trained on it (weights sha256 "
                         f"{sha[:12]}, recorded {reference['base_sha256'][:12]}): restore that base or retrain")


def load_adapter_weights(model, adapter_dir: str):
    """Strictly: every adapter tensor of the model, each of the saved shape, nothing else."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    saved = load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    expected = get_peft_model_state_dict(model)
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k} has shape {tuple(saved[k].shape)}, the model {tuple(v.shape)}"
                 for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    if problems:
        raise StageError(f"adapter {adapter_dir} does not fit the model: {'; '.join(problems[:3])}"
                         f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}")
    set_peft_model_state_dict(model, saved)


def checked_base(adapter_dir: str) -> str:
    """The base directory an adapter was trained on, after checking it is still that base (shape, weights)."""
    reference = read_reference(adapter_dir)
    base_dir = resolve_base(adapter_dir, reference)
    check_base(adapter_dir, reference, base_dir)
    return base_dir


def merge_adapter(base, adapter_dir: str):
    """A plain Transformer: `base` (loaded by checkpoint.load_init_model from checked_base(adapter_dir), itself
    merged if it was a LoRA run) with the adapter of adapter_dir merged in."""
    from peft import LoraConfig
    config = LoraConfig.from_pretrained(adapter_dir)
    with torch.random.fork_rng(devices=[]):  # the fresh adapters' random init is overwritten anyway
        model = _inject(base, config)
    load_adapter_weights(model, adapter_dir)
    merged = model.merge_and_unload().requires_grad_(True)  # peft froze the base; a loaded model trains in full
    merged.lora_chain = [adapter_dir] + getattr(base, "lora_chain", [])
    return merged


def restore_adapter(model, step_dir: str):
    """Resume: the adapter of a step checkpoint into this run's peft model, after checking that it is the same
    kind of run, with the same LoRA settings, on the same base."""
    if not is_lora(model):
        raise StageError(f"{step_dir} holds a LoRA adapter but this run is a full fine-tune: resume with the "
                         f"same --lora_rank/--lora_alpha/--lora_targets")
    if not is_adapter_dir(step_dir):
        raise StageError(f"{step_dir} holds full weights but this run is LoRA: resume without --lora_rank")
    with open(os.path.join(step_dir, ADAPTER_CONFIG)) as f:
        saved = json.load(f)
    current = model.peft_config["default"].to_dict()
    changed = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in ("r", "lora_alpha", "lora_dropout")
               if saved.get(k) != current.get(k)]
    if sorted(saved.get("target_modules") or []) != sorted(current.get("target_modules") or []):
        changed.append(f"target_modules {sorted(saved['target_modules'])} -> {sorted(current['target_modules'])}")
    if changed:
        raise StageError(f"cannot resume {step_dir}: LoRA settings changed ({'; '.join(changed)})")
    reference = read_reference(step_dir)
    if reference["base_sha256"] != model.lora_base["base_sha256"]:
        raise StageError(f"cannot resume {step_dir}: it was trained on base {reference['base_dir']} (sha256 "
                         f"{reference['base_sha256'][:12]}), this run starts from {model.lora_base['base_dir']} "
                         f"(sha256 {model.lora_base['base_sha256'][:12]})")
    load_adapter_weights(model, step_dir)

