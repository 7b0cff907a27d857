"""--compile auto|on|off (model/compile_choice.py): auto compiles only where the first steps say the run is long
enough, keeps the compiled model only if its steps measure faster, and goes back to eager when compiling fails."""
import argparse
import json
import os

import pytest
import torch

from model import compile_choice, trainer
from model.compile_choice import EAGER_STEPS, TURNS, CompileChoice
from model.LMConfig import LMConfig
from model.model import Transformer
from model.runtime import Runtime

RUNTIME = Runtime(torch.device("cpu"), False, 0, 0, 1)


def fake_compile(model):
    return ("compiled", model)


def steps(choice, seconds, n, steps_left=10_000, seconds_left=None):
    """n steps of `seconds` each; the models the steps ran through and the decisions handed out."""
    used, news = [], []
    for _ in range(n):
        used.append(choice.model)
        news.append(choice.record(seconds, seconds_left, steps_left))
    return used, [d for d in news if d]


def test_auto_never_compiles_a_run_too_short_to_pay_for_it():
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    # 0.1 s steps and 5,000 steps left: 500 s, under the 600 s it takes to try
    used, news = steps(choice, 0.1, 50, steps_left=5_000)
    assert set(used) == {"eager"} and news == [] and choice.compiled is None


def take_turns(choice, compiled_s, eager_s):
    """TURNS turns of compiled then eager steps; the models each step ran through, and the decisions."""
    used, news = [], []
    for _ in range(TURNS):
        for seconds in (compiled_s, eager_s):
            used.append(choice.model)
            news.append(choice.record(seconds, None, 10_000))
    return used, [d for d in news if d]


def test_auto_keeps_the_compiled_model_when_its_steps_are_faster():
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    used, _ = steps(choice, 0.1, 1 + EAGER_STEPS, steps_left=10_000)  # 1,000 s left: worth a try
    assert set(used) == {"eager"} and choice.model == ("compiled", "eager")
    choice.record(30.0, None, 10_000)  # the step that compiles
    used, news = take_turns(choice, 0.08, 0.1)
    assert used == [("compiled", "eager"), "eager"] * TURNS  # both take turns, so a drifting machine slows both
    assert news == [{"compile": "kept", "compiled_vs_eager": 0.8, "eager_step_s": 0.1, "compiled_step_s": 0.08,
                     "compile_s": 29.9}]
    used, news = steps(choice, 0.08, 20)
    assert set(used) == {("compiled", "eager")} and news == []


def test_auto_judges_by_the_turns_not_by_a_machine_that_slowed_down_meanwhile():
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    steps(choice, 0.1, 1 + EAGER_STEPS, steps_left=10_000)  # eager steps on a fast stretch
    choice.record(30.0, None, 10_000)
    _, news = take_turns(choice, 0.16, 0.2)  # then everything got twice as slow: compiled is still 0.8x eager
    assert news[0]["compile"] == "kept" and news[0]["compiled_vs_eager"] == 0.8


def test_auto_goes_back_to_eager_when_compiled_steps_are_not_faster():
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    steps(choice, 0.1, 1 + EAGER_STEPS, steps_left=10_000)
    choice.record(30.0, None, 10_000)
    _, news = take_turns(choice, 0.099, 0.1)  # 1% faster is within noise: not worth a different model
    assert news[0]["compile"] == "dropped"
    used, _ = steps(choice, 0.1, 10)
    assert set(used) == {"eager"}


def test_a_failure_of_the_compiled_model_falls_back_only_under_auto_and_only_when_it_ran_compiled():
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    assert not choice.fall_back(RuntimeError("a data error in an eager step"))
    steps(choice, 0.1, 1 + EAGER_STEPS, steps_left=10_000)
    assert choice.fall_back(RuntimeError("backend raised"))
    assert choice.model == "eager" and choice.decision["compile"] == "failed"
    assert set(steps(choice, 0.1, 20)[0]) == {"eager"}  # for good: no second try


def test_auto_reads_a_time_budget_instead_of_the_steps_left():
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    steps(choice, 0.1, 1 + EAGER_STEPS, steps_left=float("inf"), seconds_left=60)
    assert choice.model == "eager"
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    steps(choice, 0.1, 1 + EAGER_STEPS, steps_left=float("inf"), seconds_left=3600)
    assert choice.model == ("compiled", "eager")


def test_on_and_off():
    assert CompileChoice("on", "eager", compile_fn=fake_compile).model == ("compiled", "eager")
    off = CompileChoice("off", "eager", compile_fn=fake_compile)
    assert set(steps(off, 10.0, 20)[0]) == {"eager"}
    assert not CompileChoice("on", "eager", compile_fn=fake_compile).fall_back(RuntimeError("x"))


# ------------------------------------------------------------------------------------------------------------
# in the training loop

class Counting(torch.utils.data.Dataset):
    def __init__(self, n=96, length=17):
        g = torch.Generator().manual_seed(0)
        self.rows = (torch.randint(0, 60, (n, 1), generator=g) + torch.arange(length)) % 60 + 3

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i, :-1], "shift_labels": self.rows[i, 1:]}


def train(out_dir, *extra):
    parser = argparse.ArgumentParser()
    trainer.add_training_args(parser)
    args = parser.parse_args(["--batch_size", "8", "--learning_rate", "1e-2", "--warmup_iters", "2",
                              "--max_steps", "24", "--log_interval", "4", "--save_interval", "100",
                              "--eval_interval", "0", "--dtype", "float32", "--device", "cpu",
                              "--out_dir", str(out_dir)] + list(extra))
    torch.manual_seed(0)
    model = Transformer(LMConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32))
    trainer.fit(model, Counting(), None, trainer.lm_loss, args, RUNTIME, str(out_dir))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return model, [r for r in rows if "compile" in r]


def test_the_stages_default_is_auto_and_a_bare_flag_means_on():
    parser = argparse.ArgumentParser()
    trainer.add_training_args(parser)
    assert parser.parse_args([]).compile == "auto"
    assert parser.parse_args(["--compile"]).compile == "on"
    assert parser.parse_args(["--compile", "off"]).compile == "off"


def test_a_compile_that_fails_goes_back_to_eager_and_trains_the_same_weights(tmp_path, monkeypatch, capsys):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    reference, _ = train(tmp_path / "eager", "--compile", "off")
    monkeypatch.setattr(compile_choice, "TRY_IF_SECONDS_LEFT", 0.0)  # any run is long enough to try
    monkeypatch.setattr(compile_choice, "compile_model", lambda m: torch.compile(m, backend=failing_backend))
    torch._dynamo.reset()
    model, decisions = train(tmp_path / "auto")
    assert "--compile auto: compiling failed" in capsys.readouterr().out
    assert decisions[0]["compile"] == "failed" and "no working C++ compiler" in decisions[0]["error"]
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # the failed step was rerun, not half-applied or skipped


def test_a_failing_compile_with_compile_on_is_an_error(tmp_path, monkeypatch):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(compile_choice, "compile_model", lambda m: torch.compile(m, backend=failing_backend))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no working C.. compiler"):
        train(tmp_path / "on", "--compile", "on")


def test_auto_measures_real_compiled_steps_in_the_loop(tmp_path, monkeypatch):
    # eager backend: dynamo traces the model for real, without inductor's minutes of C++ compiling
    monkeypatch.setattr(compile_choice, "TRY_IF_SECONDS_LEFT", 0.0)
    monkeypatch.setattr(compile_choice, "compile_model", lambda m: torch.compile(m, backend="eager"))
    torch._dynamo.reset()
    _, decisions = train(tmp_path / "auto")
    assert len(decisions) == 1 and decisions[0]["compile"] in ("kept", "dropped")
    assert decisions[0]["step"] == 1 + EAGER_STEPS + 1 + 2 * TURNS
    assert decisions[0]["eager_step_s"] > 0 and decisions[0]["compiled_step_s"] > 0
