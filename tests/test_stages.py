"""The stage scripts as users run them (subprocesses): learning, torchrun DDP, SIGKILL/SIGTERM + --resume."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64"]
FAST = ["--dtype", "float32", "--device", "cpu", "--log_interval", "1", "--eval_interval", "0", "--warmup_iters", "5"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small demo corpus (packed with the shipped tokenizer) in a fresh working directory."""
    work = tmp_path_factory.mktemp("stages")
    subprocess.run([PY, os.path.join(ROOT, "data_process.py"), "demo", "--out_dir", str(work / "dataset"),
                    "--n_people", "60", "--tokenizer_dir", os.path.join(ROOT, "model", "tokenizer")], check=True, capture_output=True, cwd=work)
    return work


def stage(workdir, script, *args, torchrun=0, check=True, **popen):
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)] if torchrun else [PY]
    command = launcher + [os.path.join(ROOT, script)] + list(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if popen:
        return subprocess.Popen(command, cwd=workdir, env=env, **popen)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def pretrain(workdir, out, *extra, torchrun=0, **popen):
    return stage(workdir, "1-pretrain.py", "--data_path", "dataset/pretrain_data.bin", "--out_dir", out,
                 *TINY, *FAST, *extra, torchrun=torchrun, **popen)


@pytest.mark.slow
def test_every_stage_learns_and_finds_the_previous_one(workdir):
    pretrain(workdir, "out/pretrain_32", "--max_steps", "40", "--batch_size", "16", "--learning_rate", "3e-3",
             "--eval_interval", "20")
    rows = metrics(workdir / "out/pretrain_32")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert [r["val_loss"] for r in rows if "val_loss" in r][-1] < losses[0]
    assert (workdir / "out/pretrain_32/loss.png").exists()

    # SFT finds out/pretrain_32 by itself; the multi-turn data finds the single-turn output
    stage(workdir, "3-full_sft.py", "--data_path", "dataset/sft_data_single.jsonl", "--max_steps", "30",
          "--batch_size", "16", "--learning_rate", "3e-3", *FAST)
    losses = [r["loss"] for r in metrics(workdir / "out/sft_single_32") if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    result = stage(workdir, "3-full_sft.py", "--data_path", "dataset/sft_data_multi.jsonl", "--max_steps", "10",
                   "--batch_size", "8", *FAST)
    assert "starting from out/sft_single_32" in result.stdout

    result = stage(workdir, "4-dpo.py", "--data_path", "dataset/dpo_data.jsonl", "--max_steps", "30",
                   "--batch_size", "16", "--learning_rate", "1e-3", "--beta", "0.5", *FAST,
                   "--ptx_data", "dataset/pretrain_data.bin", "--ptx_weight", "0.3")
    assert "starting from out/sft_multi_32" in result.stdout
    rows = [r for r in metrics(workdir / "out/dpo_32") if "reward_accuracy" in r]
    assert abs(rows[0]["reward_margin"]) < 1e-3  # policy == reference at the start: rewards are ~0
    assert sum(r["reward_accuracy"] for r in rows[-5:]) / 5 > 0.5
    assert sum(r["reward_margin"] for r in rows[-5:]) > 0
    assert all(0 < r["ptx_loss"] < 10 for r in rows)  # the pretraining rows' loss is in the step and logged
    state = torch.load(workdir / "out/dpo_32/step_000030/training_state.pt", weights_only=True)
    assert state["extra"]["reference_logps"].shape[1] == 2  # the cached reference travels with the checkpoint


def test_sft_stage_refuses_a_checkpoint_of_another_shape(workdir):
    pretrain(workdir, "out/shape_base", "--max_steps", "2", "--batch_size", "4")
    result = stage(workdir, "3-full_sft.py", "--data_path", "dataset/sft_data_single.jsonl", "--init_from",
                   "out/shape_base", "--dim", "64", "--max_steps", "1", *FAST, check=False)
    assert result.returncode == 1
    assert "--dim 64 does not match the checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_pretrain_with_mismatched_vocab_is_one_clear_line(workdir):
    result = stage(workdir, "1-pretrain.py", "--data_path", "dataset/pretrain_data.bin", "--vocab_size", "5000",
                   *TINY[:-2], "--max_steps", "1", *FAST, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "6400 tokens but the model's vocab_size is 5000" in result.stderr


def wait_for_step(run_dir, step, process, timeout=300):
    """Block until metrics.jsonl reports `step` (the run is then inside its next step)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(line).get("step", 0) >= step for line in f if line.strip()):
                    return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def test_sigkill_then_resume_is_bitwise_equal_to_uninterrupted(workdir):
    args = ["--max_steps", "100", "--batch_size", "4", "--save_interval", "10", "--dropout", "0.1"]
    pretrain(workdir, "out/full", *args)
    with open(workdir / "killed.log", "w") as log:  # `nohup python 1-pretrain.py > log` as a user runs it
        run = pretrain(workdir, "out/killed", *args, stdout=log, stderr=subprocess.DEVNULL)
        wait_for_step(workdir / "out/killed", 27, run)
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert run.returncode == -signal.SIGKILL
    # status lines reach the file as they are printed, not when a buffer fills (a kill loses nothing said)
    assert "pretraining" in (workdir / "killed.log").read_text()
    result = pretrain(workdir, "out/killed", *args, "--resume")
    assert "resumed from out/killed/step_0000" in result.stdout
    assert sha256(workdir / "out/full/model.safetensors") == sha256(workdir / "out/killed/model.safetensors")


def test_sigterm_saves_a_checkpoint_that_resumes(workdir):
    args = ["--max_steps", "100000", "--batch_size", "4", "--save_interval", "1000"]
    run = pretrain(workdir, "out/term", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(workdir / "out/term", 5, run)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    saved = sorted(p for p in os.listdir(workdir / "out/term") if p.startswith("step_"))
    assert len(saved) == 1 and int(saved[0][5:]) >= 5
    result = pretrain(workdir, "out/term", "--max_steps", str(int(saved[0][5:]) + 3), "--batch_size", "4",
                      "--resume")
    assert f"resumed from out/term/{saved[0]}" in result.stdout


@pytest.mark.slow
def test_torchrun_two_processes_track_one_process_and_resume(workdir):
    args = ["--max_steps", "24", "--save_interval", "6", "--learning_rate", "3e-3"]
    pretrain(workdir, "out/one", *args, "--batch_size", "8")
    pretrain(workdir, "out/two", *args, "--batch_size", "4", torchrun=2)
    one, two = load_file(workdir / "out/one/model.safetensors"), load_file(workdir / "out/two/model.safetensors")
    # Same global batch, same examples per step: only the order of float additions differs.
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    loss_one = [r["loss"] for r in metrics(workdir / "out/one") if "loss" in r]
    loss_two = [r["loss"] for r in metrics(workdir / "out/two") if "loss" in r]
    assert loss_one == pytest.approx(loss_two, abs=1e-4)

    # SIGKILL the whole 2-process job after its step-6 checkpoint, resume under torchrun
    run = pretrain(workdir, "out/two_killed", *args, "--batch_size", "4", torchrun=2, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_step(workdir / "out/two_killed", 9, run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    result = pretrain(workdir, "out/two_killed", *args, "--batch_size", "4", "--resume", torchrun=2)
    assert "resumed from out/two_killed/step_0000" in result.stdout
    killed = load_file(workdir / "out/two_killed/model.safetensors")
    # stated tolerance for 2-process gloo: 1e-6 (observed: bitwise equal)
    assert max((two[k] - killed[k]).abs().max().item() for k in two) <= 1e-6


COMPILE_AUTO_RANKS = """
import hashlib, runpy, sys, time, torch
sys.argv = [{script!r}] + sys.argv[1:]
from model import compile_choice, trainer
compile_choice.TRY_IF_SECONDS_LEFT = 0.0  # any run is long enough to try
compile_choice.compile_model = lambda m: torch.compile(m, backend="eager")  # dynamo for real, no C++ compile
Choice = compile_choice.CompileChoice
real_model, real_decide, real_fit = Choice.model.fget, Choice.decide, trainer.fit
real_clip, ran_compiled = torch.nn.utils.clip_grad_norm_, [False]

def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

def model(self):
    used = real_model(self)
    ran_compiled[0] = used is not None and used is self.compiled
    return used

def clip(*args, **kwargs):
    # Rank 1's compiled steps take 0.3 s more, after the step's last gradient all-reduce: rank 1's own clock says
    # compiled is slower, rank 0's says eager is (it waits for rank 1 in the next step's first collective). Only
    # the time the ranks agree on gives both of them the same answer.
    if rank() == 1 and ran_compiled[0]:
        time.sleep(0.3)
    return real_clip(*args, **kwargs)

def decide(self):  # every rank writes what it decided, and its weights after the run
    real_decide(self)
    open(f"rank{{rank()}}.compile", "w").write(self.decision["compile"])

def fit(model, *args, **kwargs):
    model = real_fit(model, *args, **kwargs)
    open(f"rank{{rank()}}.sha", "w").write(
        hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
    return model

Choice.model, Choice.decide, trainer.fit, torch.nn.utils.clip_grad_norm_ = property(model), decide, fit, clip
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_compile_auto_under_torchrun_every_rank_keeps_the_same_model(workdir):
    """Auto's trial under DDP: the compiled model wraps the DDP one (gradients still averaged: identical weights on
    both ranks), and every rank decides from the step time they all agree on, so none trains compiled while another
    trains eagerly, even when their own clocks disagree."""
    script = workdir / "compile_auto_ranks.py"
    script.write_text(COMPILE_AUTO_RANKS.format(script=os.path.join(ROOT, "1-pretrain.py")))
    stage(workdir, str(script), "--data_path", "dataset/pretrain_data.bin", "--out_dir", "out/compile_auto", *TINY,
          *FAST, "--max_steps", "24", "--batch_size", "4", torchrun=2)
    assert (workdir / "rank0.compile").read_text() == (workdir / "rank1.compile").read_text()
    assert (workdir / "rank0.sha").read_text() == (workdir / "rank1.sha").read_text()
    decisions = [r for r in metrics(workdir / "out/compile_auto") if "compile" in r]
    assert len(decisions) == 1 and decisions[0]["compile"] in ("kept", "dropped")


def test_a_fresh_run_into_a_used_run_directory_is_one_line_with_the_ways_out(workdir):
    pretrain(workdir, "out/used", "--max_steps", "2", "--batch_size", "4")
    result = pretrain(workdir, "out/used", "--max_steps", "2", "--batch_size", "4", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr and "--resume" in result.stderr and "--overwrite" in result.stderr


@pytest.fixture(scope="module")
def base_checkpoint(workdir):
    """A tiny pretrained checkpoint the SFT tests start from (explicitly, with --init_from)."""
    pretrain(workdir, "out/base_32", "--max_steps", "3", "--batch_size", "4")
    return "out/base_32"


def test_sft_stage_comes_from_the_turns_not_the_file_name(workdir, base_checkpoint, tmp_path):
    os.symlink(workdir / "dataset", tmp_path / "dataset")
    os.makedirs(tmp_path / "out")
    os.symlink(workdir / base_checkpoint, tmp_path / base_checkpoint)
    # single-turn conversations in a file whose name contains "multi"
    (tmp_path / "multilingual.jsonl").write_bytes((workdir / "dataset/sft_data_single.jsonl").read_bytes())
    result = stage(tmp_path, "3-full_sft.py", "--data_path", "multilingual.jsonl", "--init_from", base_checkpoint,
                   "--max_steps", "1", "--batch_size", "4", *FAST)
    assert "stage sft_single: 0 of" in result.stdout and "-> out/sft_single_32" in result.stdout
    result = stage(tmp_path, "3-full_sft.py", "--data_path", "dataset/sft_data_single.jsonl",
                   "dataset/sft_data_multi.jsonl", "--max_steps", "1", "--batch_size", "4", *FAST)
    assert "stage sft_multi" in result.stdout and "starting from out/sft_single_32 -> out/sft_multi_32" in result.stdout
    import json as _json
    assert _json.load(open(tmp_path / "out/sft_multi_32/config.json"))["max_seq_len"] == 64


def test_sft_max_seq_len_is_saved_in_the_checkpoint(workdir, base_checkpoint):
    stage(workdir, "3-full_sft.py", "--data_path", "dataset/sft_data_single.jsonl", "--init_from", base_checkpoint,
          "--out_dir", "out/long_sft", "--max_seq_len", "96", "--max_steps", "1", "--batch_size", "4", *FAST)
    assert json.load(open(workdir / "out/long_sft/config.json"))["max_seq_len"] == 96


@pytest.mark.slow
def test_sft_two_processes_weigh_answers_like_one_process(workdir, base_checkpoint):
    # conversations of very different answer lengths: per-process means would weigh them differently
    common = ["--data_path", "dataset/sft_data_single.jsonl", "dataset/sft_data_multi.jsonl", "--init_from",
              base_checkpoint, "--max_steps", "4", "--learning_rate", "3e-3", "--no-pack", *FAST]
    stage(workdir, "3-full_sft.py", *common, "--out_dir", "out/sft_one", "--batch_size", "8")
    stage(workdir, "3-full_sft.py", *common, "--out_dir", "out/sft_two", "--batch_size", "4", torchrun=2)
    stage(workdir, "3-full_sft.py", *common, "--out_dir", "out/sft_accum", "--batch_size", "2",
          "--accumulation_steps", "4")
    one = load_file(workdir / "out/sft_one/model.safetensors")
    for other in ("out/sft_two", "out/sft_accum"):
        weights = load_file(workdir / other / "model.safetensors")
        assert max((one[k] - weights[k]).abs().max().item() for k in one) < 1e-5, other


@pytest.mark.slow
def test_dpo_two_processes_train_like_one_process(workdir, base_checkpoint):
    # each step runs several forward passes per process (rows grouped by length, then the pretraining replay)
    # before one backward: DDP must still average the same gradient as one process with the whole batch
    common = ["--data_path", "dataset/dpo_data.jsonl", "--init_from", base_checkpoint, "--max_steps", "3",
              "--learning_rate", "1e-3", "--ptx_data", "dataset/pretrain_data.bin", "--ptx_weight", "0.3", *FAST]
    stage(workdir, "4-dpo.py", *common, "--out_dir", "out/dpo_one", "--batch_size", "8")
    stage(workdir, "4-dpo.py", *common, "--out_dir", "out/dpo_two", "--batch_size", "4", torchrun=2)
    one = load_file(workdir / "out/dpo_one/model.safetensors")
    two = load_file(workdir / "out/dpo_two/model.safetensors")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max((one[k] - load_file(workdir / base_checkpoint / "model.safetensors")[k]).abs().max().item() for k in one) > 1e-4


RACE_SCRIPT = """
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
from model import trainer
from model.LMConfig import LMConfig
from model.model import Transformer
from model.runtime import init_runtime, run_stage

class Counting(torch.utils.data.Dataset):
    def __len__(self):
        return 512
    def __getitem__(self, i):
        row = (torch.arange(17) + i) % 60 + 3
        return {{"input_ids": row[:-1], "shift_labels": row[1:]}}

def main():
    parser = __import__("argparse").ArgumentParser()
    trainer.add_training_args(parser)
    args = parser.parse_args(["--batch_size", "4", "--max_steps", "1000", "--save_interval", "1000", "--dtype",
                              "float32", "--device", "cpu", "--out_dir", {out!r}, "--warmup_iters", "1"])
    runtime = init_runtime("cpu")
    real_reduce, calls = trainer.all_reduce_sum, {{"n": 0}}

    def reduce_then_signal(value, runtime):
        # A signal that lands on rank 1 right AFTER the step's flags were all-reduced: the worst moment.
        reduced = real_reduce(value, runtime)
        if torch.is_tensor(value) and runtime.rank == 1:
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return reduced
    trainer.all_reduce_sum = reduce_then_signal
    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16))
    trainer.fit(model, Counting(), None, trainer.lm_loss, args, runtime, {out!r})

run_stage(main)
"""


def test_ddp_stop_signal_after_the_all_reduce_stops_every_rank_at_the_same_step(tmp_path):
    out = str(tmp_path / "race")
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT.format(root=ROOT, out=out))
    command = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    race = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:  # a hang (the bug) must fail the test and leave no process behind
        stdout, stderr = race.communicate(timeout=240)
    finally:
        if race.poll() is None:
            os.killpg(race.pid, signal.SIGKILL)
            race.wait()
    result = subprocess.CompletedProcess(command, race.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 1 noted the signal in step 3; both ranks agreed on it in step 4 and saved exactly there
    assert "stopped by a signal on another process at step 4" in result.stdout
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_000004"]


def worker_pids(launcher_pid):
    """PIDs of torchrun's worker processes (children of the launcher), by their LOCAL_RANK."""
    workers = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if b"LOCAL_RANK" in env:
            workers[int(env[b"LOCAL_RANK"])] = int(pid)
    return workers


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resume_auto_finishes_the_same_run(workdir):
    args = ["--max_steps", "30", "--save_interval", "5", "--learning_rate", "3e-3", "--batch_size", "4"]
    pretrain(workdir, "out/restart_ref", *args, torchrun=2)
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "1"]
    command = launcher + [os.path.join(ROOT, "1-pretrain.py"), "--data_path", "dataset/pretrain_data.bin",
                          "--out_dir", "out/restarted", *TINY, *FAST, *args, "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    run = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        wait_for_step(workdir / "out/restarted", 12, run)  # past the step-10 checkpoint
        os.kill(worker_pids(run.pid)[1], signal.SIGKILL)
        out, _ = run.communicate(timeout=300)
    finally:  # never leave a launcher and its workers behind, whatever failed
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 0, out[-3000:]
    assert "resumed from out/restarted/step_0000" in out
    ref, restarted = (load_file(workdir / d / "model.safetensors") for d in ("out/restart_ref", "out/restarted"))
    assert max((ref[k] - restarted[k]).abs().max().item() for k in ref) <= 1e-6


@pytest.mark.slow
def test_two_torchrun_launchers_on_one_host_train_like_one_two_process_job(workdir):
    args = ["--max_steps", "8", "--save_interval", "4", "--learning_rate", "3e-3", "--batch_size", "4"]
    pretrain(workdir, "out/nodes_ref", *args, torchrun=2)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    nodes = []
    for node_rank in (0, 1):
        command = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                   os.path.join(ROOT, "1-pretrain.py"), "--data_path", "dataset/pretrain_data.bin",
                   "--out_dir", "out/nodes", *TINY, *FAST, *args]
        nodes.append(subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ref, two_nodes = (load_file(workdir / d / "model.safetensors") for d in ("out/nodes_ref", "out/nodes"))
    assert max((ref[k] - two_nodes[k]).abs().max().item() for k in ref) <= 1e-6


def test_pretraining_data_packed_with_another_tokenizer_is_refused(workdir, tmp_path):
    other = tmp_path / "other_tokenizer"
    import shutil
    shutil.copytree(os.path.join(ROOT, "model", "tokenizer"), other)
    spec = json.load(open(other / "tokenizer.json", encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same size, two ids swapped: the packed ids mean other text
    json.dump(spec, open(other / "tokenizer.json", "w", encoding="utf-8"), ensure_ascii=False)
    result = pretrain(workdir, "out/stale", "--max_steps", "1", "--tokenizer_dir", str(other), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tokenizer" in result.stderr.splitlines()[-1] and "data_process.py pretrain" in result.stderr


def test_a_torn_packed_file_is_one_line_naming_it(workdir):
    # a .bin cut short (an interrupted copy) no longer matches its meta: train or validation file alike, the
    # stage stops with one line before the run directory is made, not with a traceback from the dataset
    import shutil
    dataset = workdir / "dataset"
    for name in ("torn", "torn_val"):
        for suffix in (".bin", ".meta.json", ".val.bin", ".val.meta.json"):
            shutil.copy(dataset / f"pretrain_data{suffix}", dataset / f"{name}{suffix}")
    for path, what in (("dataset/torn.bin", "pretraining data"), ("dataset/torn_val.val.bin", "validation data")):
        with open(workdir / path, "r+b") as f:
            f.truncate(os.path.getsize(workdir / path) - 2)  # one uint16 token short
        data = path.replace(".val.bin", ".bin")
        result = pretrain(workdir, "out/torn", "--data_path", data, "--max_steps", "1", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {what}: {path}: holds "), result.stderr
        assert not (workdir / "out/torn").exists()


@pytest.mark.parametrize("script, data", [("4-dpo.py", "dpo_data.jsonl"), ("3-full_sft.py", "sft_data_single.jsonl")])
def test_a_bad_ptx_file_is_one_line_before_any_work(workdir, base_checkpoint, script, data):
    # the file is checked before DPO's reference pass and before the run directory is made
    for ptx, message in (("dataset/missing.bin", "--ptx_data not found: dataset/missing.bin"),
                         ("dataset/pretrain_data.jsonl", "--ptx_data: dataset/pretrain_data.jsonl: packed token file")):
        result = stage(workdir, script, "--data_path", f"dataset/{data}", "--init_from", base_checkpoint,
                       "--out_dir", "out/bad_ptx", "--ptx_data", ptx, "--max_steps", "1", *FAST, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: " + message), result.stderr
        assert not (workdir / "out/bad_ptx").exists()


@pytest.mark.parametrize("pack", ["--pack", "--no-pack"])
def test_sft_mixes_in_rows_of_the_pretraining_text(workdir, base_checkpoint, pack):
    out = f"out/sft_ptx{pack}"
    plain = stage(workdir, "3-full_sft.py", "--data_path", "dataset/sft_data_single.jsonl", "--init_from",
                  base_checkpoint, "--out_dir", out + "_plain", "--max_steps", "1", pack, *FAST)
    result = stage(workdir, "3-full_sft.py", "--data_path", "dataset/sft_data_single.jsonl", "--init_from",
                   base_checkpoint, "--out_dir", out, "--max_steps", "3", "--batch_size", "8", pack,
                   "--ptx_data", "dataset/pretrain_data.bin", "--ptx_ratio", "0.5", *FAST)
    sft_rows = int(plain.stdout.split(" rows) from")[0].rsplit("(", 1)[1])
    assert f"({sft_rows + round(sft_rows / 2)} rows) from dataset/sft_data_single.jsonl + {round(sft_rows / 2)} " \
           f"rows of dataset/pretrain_data.bin" in result.stdout, result.stdout
    # a third of the rows are pretraining text: batches of 8 mix both kinds, which one collate must take
    assert [r["step"] for r in metrics(workdir / out) if "loss" in r] == [1, 2, 3]
