"""
The stage registry: which script trains each stage, which stage's run it starts from, where it writes, and which
runs count as "the newest chat model". Every script that looks for a run reads this table, so adding a stage is
one script plus one row (docs/architecture.md has the checklist).

    STAGES                        name -> Stage(script, starts_from, chat)
    CHAT_STAGES, PRETRAIN_STAGES  the chat models newest stage first (2-eval.py, the server, eval_ceval.py), and
                                  the base model (0-eval_pretrain.py)
    run_name(stage, config)       out/<stage>_<dim>[_moe]: where a stage writes by default
    find_run(stage, dim, use_moe) the newest run of one stage
    find_start(stage, dim, use_moe)  the run a stage starts from: the newest run of its first starts_from stage
                                  that has one
    find_newest(stages)           the newest run of the first stage in `stages` that has one, looking in out/
                                  and one level below it (make demo writes out/demo/<stage>)
"""
import os
import re
from dataclasses import dataclass



@dataclass(frozen=True)
class Stage:
    script: str             # the stage script that trains it
    starts_from: tuple = ()  # stages whose newest run it starts from by default, in order of preference
    chat: bool = True       # its models answer in the chat format


STAGES = {
    "pretrain": Stage("1-pretrain.py", chat=False),
    "sft_single": Stage("3-full_sft.py", ("pretrain",)),
    "sft_multi": Stage("3-full_sft.py", ("sft_single",)),
    "dpo": Stage("4-dpo.py", ("sft_multi", "sft_single")),
}
CHAT_STAGES = tuple(reversed([name for name, stage in STAGES.items() if stage.chat]))  # the newest stage first
PRETRAIN_STAGES = tuple(name for name, stage in STAGES.items() if not stage.chat)


def run_name(stage: str, config) -> str:
    return f"{stage}_{config.dim}{'_moe' if config.use_moe else ''}"


def _weights(run_dir):
    from .lora import ADAPTER_WEIGHTS, is_adapter_dir  # here, not at the top: the table is read without torch
    return os.path.join(run_dir, ADAPTER_WEIGHTS if is_adapter_dir(run_dir) else "model.safetensors")


def find_run(stage: str, dim=None, use_moe=None, root="out"):
    """Newest root/<stage>_<dim>[_moe] directory holding weights (or a LoRA adapter), narrowed by dim/use_moe."""
    pattern = re.compile(rf"^{re.escape(stage)}_(\d+)(_moe)?$")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match, run_dir = pattern.match(name), os.path.join(root, name)
        if not match or not os.path.isfile(_weights(run_dir)):
            continue
        if (dim is not None and int(match.group(1)) != dim) or (use_moe is not None and bool(match.group(2)) != use_moe):
            continue
        found.append((os.path.getmtime(_weights(run_dir)), run_dir))
    return max(found)[1] if found else None


def find_start(stage: str, dim=None, use_moe=None, root="out"):
    """The run `stage` starts from by default: the newest run of its first starts_from stage that has one."""
    for previous in STAGES[stage].starts_from:
        found = find_run(previous, dim, use_moe, root)
        if found:
            return found
    return None


def find_newest(stages, root="out"):
    """The newest run of the first stage in `stages` that has one: root/<stage>_<dim>[_moe], or a folder of runs one
    level below root named after the stage (out/demo/dpo, as make demo writes). None when there is none."""
    for stage in stages:
        candidates = [find_run(stage, root=root)]
        for sub in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            nested = os.path.join(root, sub)
            if os.path.isdir(nested) and not os.path.isfile(_weights(nested)):
                candidates += [find_run(stage, root=nested), os.path.join(nested, stage)]
        found = [(os.path.getmtime(_weights(c)), c) for c in candidates if c and os.path.isfile(_weights(c))]
        if found:
            return max(found)[1]
    return None


def searched(stages, root="out") -> str:
    """Where find_newest looked, for an error message."""
    return ", ".join(f"{root}/{stage}_*, {root}/*/{stage}" for stage in stages)
