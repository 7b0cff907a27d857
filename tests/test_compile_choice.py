"""--compile auto|on|off (model/compile_choice.py): auto compiles only where the first steps say the run is long
enough, keeps the compiled model only if its steps measure faster, and goes back to eager when compiling fails.
(In the training loop itself: tests/test_trainer.py.)"""
from model.compile_choice import EAGER_STEPS, MAX_RECOMPILES, TURNS, CompileChoice


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


def test_auto_goes_back_to_eager_when_the_kept_compiled_model_keeps_recompiling():
    choice = CompileChoice("auto", "eager", compile_fn=fake_compile)
    steps(choice, 0.1, 1 + EAGER_STEPS, steps_left=10_000)
    choice.record(30.0, None, 10_000)
    take_turns(choice, 0.08, 0.1)
    _, news = steps(choice, 0.2, 5)  # slower steps (a busy moment), but not a recompile's 3x the compiled median
    assert news == [] and choice.recompiles == []
    _, news = steps(choice, 25.0, MAX_RECOMPILES - 1)  # a recompile for a new shape: about a first compile's cost
    assert news == [] and choice.model == ("compiled", "eager")  # a few are the price of compiling at all
    _, news = steps(choice, 25.0, 1)
    assert news == [{"compile": "dropped", "recompiles": 3, "recompile_s": 75.0}]
    assert set(steps(choice, 0.1, 10)[0]) == {"eager"}
