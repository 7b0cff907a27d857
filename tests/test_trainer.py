"""The shared training loop, in-process on a toy task: learning, exact resume, atomic saves, NaN guard, data order."""
import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from model import compile_choice, optim, trainer
from model.model import Transformer
from model.checkpoint import list_checkpoints
from model.runtime import Runtime
from model.errors import StageError

V = 64


class ToyCountingTask(torch.utils.data.Dataset):
    """Rows that count upwards from a random start (next token = this token + 1): easy to learn, so the loss
    must fall fast."""

    def __init__(self, n=256, length=17, seed=0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, V - 3, (n, 1), generator=g)
        self.rows = (starts + torch.arange(length)) % (V - 3) + 3

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i, :-1], "shift_labels": self.rows[i, 1:]}


lm_loss = trainer.lm_loss


def make_args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    trainer.add_training_args(parser)
    trainer.add_model_args(parser)
    return parser.parse_args(["--batch_size", "8", "--learning_rate", "3e-3", "--warmup_iters", "3",
                              "--log_interval", "5", "--save_interval", "5", "--eval_interval", "0",
                              "--dtype", "float32", "--device", "cpu", "--out_dir", str(tmp_path)] + list(extra))


def tiny_model(seed=0, dropout=0.0):
    return make_tiny_model(seed, vocab_size=V, dropout=dropout)


RUNTIME = Runtime(torch.device("cpu"), False, 0, 0, 1)


def run(tmp_path, *extra, loss_fn=lm_loss, model=None, data=None):
    args = make_args(tmp_path, *extra)
    model = model or tiny_model()
    return trainer.fit(model, data or ToyCountingTask(), None, loss_fn, args, RUNTIME, str(tmp_path))


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_loss_falls_and_run_dir_is_complete(tmp_path):
    run(tmp_path, "--max_steps", "60", "--learning_rate", "1e-2")
    rows = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert Transformer.from_pretrained(tmp_path).config.dim == 32
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_000055", "step_000060"]
    state = torch.load(tmp_path / "step_000060" / "training_state.pt", weights_only=True)
    assert state["step"] == 60 and "optimizer" in state and state["rng"]


class Crash(Exception):
    pass


def crash_at(step_to_crash):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step_to_crash:
            raise Crash()
        return lm_loss(model, batch)
    return loss_fn


def test_resume_after_crash_is_bitwise_equal_to_uninterrupted(tmp_path):
    # 2 micro-batches per step and several epochs (256 rows / 8 = 32 batches = 16 steps per epoch)
    # dropout makes the RNG state part of what must be restored
    common = ["--max_steps", "40", "--accumulation_steps", "2"]
    run(tmp_path / "a", *common, model=tiny_model(dropout=0.1))
    with pytest.raises(Crash):  # dies in step 24, after the step-20 save
        run(tmp_path / "b", *common, loss_fn=crash_at(2 * 23 + 1), model=tiny_model(dropout=0.1))
    assert os.path.basename(list_checkpoints(str(tmp_path / "b"))[-1]) == "step_000020"
    run(tmp_path / "b", *common, "--resume", model=tiny_model(seed=99, dropout=0.1))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics of the resumed run continue the old ones without the lost steps' rows
    steps = [__import__("json").loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_crash_while_saving_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run(tmp_path, "--max_steps", "5")
    before = weights(tmp_path)
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        with open(path, "r+b") as f:  # leave a truncated file behind, then die
            f.truncate(10)
        raise Crash()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(Crash):
        run(tmp_path, "--max_steps", "10", "--resume")
    monkeypatch.setattr(torch, "save", real_save)
    # the top-level weights and the step-5 checkpoint are still the complete step-5 ones
    after = weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_000005"]
    Transformer.from_pretrained(tmp_path)
    run(tmp_path, "--max_steps", "10", "--resume")  # and the run can go on from it
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))


def nan_from(first_bad, last_bad):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, metrics = lm_loss(model, batch)
        if first_bad <= calls["n"] <= last_bad:
            loss = loss * float("nan")
        return loss, metrics
    return loss_fn


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, capsys):
    # a single bad step is skipped: the weights after it equal the weights before it
    run(tmp_path / "one", "--max_steps", "3", "--save_interval", "1", "--keep_last", "5",
        loss_fn=nan_from(3, 3))
    w2, w3 = weights(tmp_path / "one" / "step_000002"), weights(tmp_path / "one" / "step_000003")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert all(torch.isfinite(t).all() for t in w3.values())
    printed = capsys.readouterr()
    assert "update skipped" in printed.out + printed.err
    assert '"skipped_update"' in (tmp_path / "one" / "metrics.jsonl").read_text()
    # max_bad_steps in a row: a clear stop, the last good checkpoint intact
    with pytest.raises(StageError, match="3 steps in a row"):
        run(tmp_path / "many", "--max_steps", "20", "--max_bad_steps", "3", loss_fn=nan_from(7, 100))
    assert os.path.basename(list_checkpoints(str(tmp_path / "many"))[-1]) == "step_000005"
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "many").values())


def test_sampler_shards_are_the_single_process_batches():
    single = trainer.ResumableBatchSampler(50, 8, seed=3)
    ranks = [trainer.ResumableBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in [single] + ranks:
        s.set_epoch(1)
    for batch, part0, part1 in zip(single, *ranks):
        assert batch == part0 + part1
    assert len(single) == len(ranks[0]) == 6
    # a different epoch is a different order; a start offset skips exactly that many batches
    epoch1 = list(single)
    single.set_epoch(2)
    assert list(single) != epoch1
    single.set_epoch(1, start_batch=4)
    assert list(single) == epoch1[4:]


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [optim.lr_at(s, 100, 10, 1e-3, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)


def test_no_decay_on_norms_and_embeddings():
    model = tiny_model()
    optimizer = optim.build_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2 and "tok_embeddings" not in name), name


def test_validation_set_smaller_than_a_batch_is_still_evaluated(tmp_path):
    args = make_args(tmp_path, "--max_steps", "4", "--eval_interval", "2")
    trainer.fit(tiny_model(), ToyCountingTask(), None, lm_loss, args, RUNTIME, str(tmp_path),
                val_set=ToyCountingTask(n=5, seed=1))
    rows = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]


class UnevenAnswers(torch.utils.data.Dataset):
    """SFT-like rows: the counting task, but only a random-length tail of each row is labelled, so micro-batches
    of the same size hold very different numbers of targets."""

    def __init__(self, n=64, length=17, seed=0):
        self.rows = ToyCountingTask(n, length, seed).rows
        g = torch.Generator().manual_seed(seed + 1)
        self.answer_len = torch.randint(1, length - 1, (n,), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        labels = self.rows[i, 1:].clone()
        labels[:-int(self.answer_len[i])] = -100
        return {"input_ids": self.rows[i, :-1], "shift_labels": labels}


def test_accumulated_micro_batches_weigh_every_target_token_equally(tmp_path):
    # 4 micro-batches of 2 must train exactly like one batch of 8 (same examples per step, fp32)
    run(tmp_path / "big", "--max_steps", "6", "--batch_size", "8", data=UnevenAnswers())
    run(tmp_path / "accum", "--max_steps", "6", "--batch_size", "2", "--accumulation_steps", "4", data=UnevenAnswers())
    big, accum = weights(tmp_path / "big"), weights(tmp_path / "accum")
    assert max((big[k] - accum[k]).abs().max().item() for k in big) < 1e-5
    losses = lambda d: [r["loss"] for r in map(__import__("json").loads, open(d / "metrics.jsonl")) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "accum"), abs=1e-5)


def test_one_host_sync_per_step_not_per_micro_batch(tmp_path, monkeypatch):
    calls = {"item": 0}
    real_item = torch.Tensor.item

    def counting_item(self):
        calls["item"] += 1
        return real_item(self)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    run(tmp_path, "--max_steps", "4", "--accumulation_steps", "8", "--batch_size", "4", "--log_interval", "100",
        "--save_interval", "100")
    assert calls["item"] < 4 * 8  # per-micro-batch .item() would be 32 syncs at least


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path):
    run(tmp_path, "--max_steps", "5")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed in the middle of a write
    run(tmp_path, "--max_steps", "10", "--resume")
    rows = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10]


def test_resume_with_another_batch_size_is_refused_and_a_longer_run_is_allowed(tmp_path, capsys):
    run(tmp_path, "--max_steps", "5")
    with pytest.raises(StageError, match="batch_size 8 -> 4"):
        run(tmp_path, "--max_steps", "10", "--batch_size", "4", "--resume")
    run(tmp_path, "--max_steps", "10", "--resume")
    assert "total steps 5 -> 10" in capsys.readouterr().out
    assert os.path.basename(list_checkpoints(str(tmp_path))[-1]) == "step_000010"


def test_a_fresh_run_never_prunes_into_an_old_one(tmp_path):
    run(tmp_path, "--max_steps", "20")  # step_000015, step_000020
    with pytest.raises(StageError, match="--resume.*--overwrite"):
        run(tmp_path, "--max_steps", "5")
    run(tmp_path, "--max_steps", "5", "--overwrite")
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_000005"]
    old = [p for p in os.listdir(tmp_path.parent) if p.startswith(tmp_path.name + ".replaced-")]
    assert len(old) == 1 and os.path.isdir(tmp_path.parent / old[0] / "step_000020")


def test_two_fresh_runs_with_one_seed_train_alike(tmp_path):
    # dropout draws from the global RNG: fit seeds it, whatever ran in the process before
    run(tmp_path / "a", "--max_steps", "3", model=tiny_model(dropout=0.2))
    torch.rand(7)  # some other use of the RNG in between
    run(tmp_path / "b", "--max_steps", "3", model=tiny_model(dropout=0.2))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _has_glibc_mallinfo2():
    import ctypes
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_glibc_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")
def test_a_cpu_training_process_reuses_freed_memory_instead_of_fresh_pages():
    """init_runtime on CPU keeps freed memory in the heap: a 64 MiB tensor (the speedrun's logits are 52 MiB)
    is then not its own mmap, whose pages the kernel would fault in and zero again every step."""
    import subprocess
    import sys
    probe = ("import ctypes, sys, torch\n"
             "from model.runtime import init_runtime\n"
             "class Info(ctypes.Structure):\n"
             "    _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',\n"
             "                'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
             "mallinfo2 = ctypes.CDLL('libc.so.6').mallinfo2\n"
             "mallinfo2.restype = Info\n"
             "if sys.argv[1] == 'runtime':\n"
             "    init_runtime('cpu')\n"
             "before = mallinfo2().hblkhd\n"
             "x = torch.empty(16 * 2**20)  # 64 MiB\n"
             "print((mallinfo2().hblkhd - before) // 2**20)\n")
    mapped = {}
    for setup in ("plain", "runtime"):
        result = subprocess.run([sys.executable, "-c", probe, setup], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert result.returncode == 0, result.stderr
        mapped[setup] = int(result.stdout.split()[-1])
    assert mapped == {"plain": 64, "runtime": 0}  # MiB in mmapped blocks after allocating it


def test_attention_kind_is_a_stage_flag_and_left_alone_by_default():
    parser = argparse.ArgumentParser()
    trainer.add_model_args(parser)
    assert trainer.model_overrides(parser.parse_args([])) == {}  # LMConfig.py / the checkpoint decides
    assert trainer.model_overrides(parser.parse_args(["--no-flash_attn", "--dim", "64"])) == {"flash_attn": False,
                                                                                                "dim": 64}


# ----------------------------------------------------------------------------------------------------------
# --compile auto in the loop (the rule itself: tests/test_compile_choice.py)

def compile_decisions(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "compile" in row]


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no working C++ compiler found")


def test_the_stages_default_is_compile_auto_and_a_bare_flag_means_on(tmp_path):
    assert make_args(tmp_path).compile == "auto"
    assert make_args(tmp_path, "--compile").compile == "on"
    assert make_args(tmp_path, "--compile", "off").compile == "off"


def test_a_compile_that_fails_goes_back_to_eager_and_trains_the_same_weights(tmp_path, monkeypatch, capsys):
    reference = run(tmp_path / "eager", "--max_steps", "12", "--compile", "off")
    monkeypatch.setattr(compile_choice, "TRY_IF_SECONDS_LEFT", 0.0)  # any run is long enough to try
    monkeypatch.setattr(compile_choice, "compile_model", lambda m: torch.compile(m, backend=failing_backend))
    torch._dynamo.reset()
    model = run(tmp_path / "auto", "--max_steps", "12")
    assert "--compile auto: compiling failed (RuntimeError: no working C++ compiler found)" in capsys.readouterr().out
    assert [d["compile"] for d in compile_decisions(tmp_path / "auto")] == ["failed"]
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # the failed step was rerun, not half-applied or skipped


def test_a_failing_compile_under_compile_on_ends_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_choice, "compile_model", lambda m: torch.compile(m, backend=failing_backend))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no working C.. compiler"):
        run(tmp_path, "--max_steps", "4", "--compile", "on")


def test_compile_auto_measures_real_compiled_steps_in_the_loop(tmp_path, monkeypatch):
    # the eager backend: dynamo traces the model for real, without inductor's C++ compile
    monkeypatch.setattr(compile_choice, "TRY_IF_SECONDS_LEFT", 0.0)
    monkeypatch.setattr(compile_choice, "compile_model", lambda m: torch.compile(m, backend="eager"))
    torch._dynamo.reset()
    run(tmp_path, "--max_steps", "24")
    decisions = compile_decisions(tmp_path)
    assert len(decisions) == 1 and decisions[0]["compile"] in ("kept", "dropped")
    assert decisions[0]["step"] == 1 + compile_choice.EAGER_STEPS + 1 + 2 * compile_choice.TURNS
    assert decisions[0]["eager_step_s"] > 0 and decisions[0]["compiled_step_s"] > 0
