"""model/fast_decode.py: the compiled decode step gives the eager model's tokens (dense and MoE, long prompts, to the
end of the context and past it, batches, weights changed in between), seeded sampling stays reproducible, the auto
policy compiles only after enough tokens, and anything unsupported or failing decodes eagerly.

Compiling costs seconds even for the tiny model (tens of seconds on a cold, busy machine): one model per module,
compiled once; the extra shapes are in the test marked slow.
"""
import pytest
import torch

from model import fast_decode
from model.generate import generate_stream
from conftest import make_tiny_model


def varied_model(seed=1, **overrides):
    """A tiny model with large random weights: its greedy output varies from token to token (the default init
    repeats one token), so a wrong cache column or position shows up as a different sequence."""
    model = make_tiny_model(seed=seed, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def tokens(model, prompt, n, mode, batch=1, **sampling):
    """generate_stream's tokens with the fast path forced on or off: a list per row."""
    previous = fast_decode.get_mode()
    fast_decode.set_mode(mode)
    try:
        ids = torch.tensor([prompt] * batch)
        steps = list(generate_stream(model, ids, max_new_tokens=n, **{"temperature": 0, **sampling}))
        return torch.stack(steps, dim=1).tolist()
    finally:
        fast_decode.set_mode(previous)


@pytest.fixture(scope="module")
def model():
    return varied_model()


def compiled_steps(model):
    return dict(fast_decode._decoder(model).steps)


def test_greedy_tokens_equal_the_eager_path(model):
    max_len = model.config.max_seq_len
    short = [1, 5, 9, 17, 33]
    ours = tokens(model, short, max_len - len(short), "on")  # to the last slot of the context
    assert ours == tokens(model, short, max_len - len(short), "off")
    assert len(set(ours[0])) > 5  # a varied sequence, not one token repeated
    assert list(compiled_steps(model)) == [(1, max_len, torch.get_num_threads())]
    long_prompt = [(7 * i) % 60 + 3 for i in range(20)]  # most of the context is prompt (prefilled eagerly)
    assert tokens(model, long_prompt, 12, "on") == tokens(model, long_prompt, 12, "off")
    # the step reads the model's parameters, not a copy: a change between generations is used at once
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.mul_(-1.5)
        model.norm.weight.add_(0.5)
    changed = tokens(model, short, 20, "on")
    assert changed == tokens(model, short, 20, "off") and changed[0] != ours[0][:20]
    assert len(compiled_steps(model)) == 1  # no recompile for any of it


def test_interleaved_generations_keep_their_own_caches(model):
    a, b = [1, 2, 3], [4, 40, 30, 20]
    expected = tokens(model, a, 15, "off"), tokens(model, b, 15, "off")
    fast_decode.set_mode("on")
    try:
        streams = generate_stream(model, torch.tensor([a]), 15, temperature=0), \
            generate_stream(model, torch.tensor([b]), 15, temperature=0)
        got = [[int(x), int(y)] for x, y in zip(*streams)]
    finally:
        fast_decode.set_mode("auto")
    assert ([g[0] for g in got], [g[1] for g in got]) == (expected[0][0], expected[1][0])


def test_seeded_sampling_is_reproducible_and_draws_what_the_eager_path_draws(model):
    sampling = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)
    runs = []
    for mode in ("on", "on", "off"):
        torch.manual_seed(123)
        runs.append(tokens(model, [1, 5, 9], 25, mode, **sampling))
    assert runs[0] == runs[1] == runs[2]
    torch.manual_seed(124)
    assert tokens(model, [1, 5, 9], 25, "on", **sampling) != runs[0]


def test_auto_compiles_only_after_enough_tokens(monkeypatch):
    model = varied_model(seed=2)
    reference = tokens(model, [1, 5, 9], 25, "off")
    assert tokens(model, [1, 5, 9], 25, "auto") == reference  # far under the default 2000: no compile
    assert compiled_steps(model) == {}
    monkeypatch.setattr(fast_decode, "COMPILE_AFTER_TOKENS", 60)
    assert tokens(model, [1, 5, 9], 25, "auto") == reference  # 24 + 25 < 60: eager again
    assert compiled_steps(model) == {}
    # 48 eager steps so far + 25 asked for reach 60: this generation compiles before its first token
    assert tokens(model, [1, 5, 9], 25, "auto") == reference
    assert len(compiled_steps(model)) == 1 and fast_decode._decoder(model).eager_steps == 48


def test_a_failing_compiler_means_eager_decoding_and_one_warning(monkeypatch, capsys):
    model = varied_model(seed=3)

    def broken_compile(fn, **kwargs):
        def step(*args):
            raise RuntimeError("no C++ compiler found")
        return step
    monkeypatch.setattr(fast_decode, "_broken", None)
    monkeypatch.setattr(fast_decode.torch, "compile", broken_compile)
    reference = tokens(model, [1, 5, 9], 10, "off")
    assert tokens(model, [1, 5, 9], 10, "on") == reference
    assert tokens(model, [1, 5, 9], 10, "on") == reference
    err = capsys.readouterr().err
    assert err.count("fast decode: compiling the decode step failed") == 1 and "no C++ compiler" in err
    assert fast_decode.start(model, 1, 3, 7) is None


def test_what_the_fast_path_does_not_take():
    model = varied_model(seed=4)
    padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert not fast_decode.supported(model, attention_mask=padded)
    assert fast_decode.supported(model, attention_mask=torch.ones_like(padded))
    assert not fast_decode.supported(make_tiny_model(dropout=0.1).train())
    assert not fast_decode.supported(varied_model(seed=4).to(torch.bfloat16))
    # supported, but under auto and far from the threshold: no session, the eager path with its own cache
    assert fast_decode.start(model, 1, 3, 5) is None
    fast_decode.set_mode("off")
    try:
        assert not fast_decode.supported(model)
    finally:
        fast_decode.set_mode("auto")
    with pytest.raises(ValueError, match="fast decode mode"):
        fast_decode.set_mode("always")


@pytest.mark.slow
def test_past_the_context_moe_and_batches_equal_the_eager_path(model):
    # past max_seq_len: a cache twice as long (one more compile); RoPE goes on as in the eager path
    assert tokens(model, [1, 5, 9], 40, "on") == tokens(model, [1, 5, 9], 40, "off")
    assert (1, 2 * model.config.max_seq_len, torch.get_num_threads()) in compiled_steps(model)
    # two rows without padding: F.linear instead of the one-row reduction
    assert tokens(model, [3, 1, 4, 1, 5], 20, "on", batch=2) == tokens(model, [3, 1, 4, 1, 5], 20, "off", batch=2)
    moe = varied_model(seed=5, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    for prompt in ([1, 5, 9], [(5 * i) % 60 + 3 for i in range(20)]):
        n = moe.config.max_seq_len - len(prompt)
        assert tokens(moe, prompt, n, "on") == tokens(moe, prompt, n, "off")


@pytest.mark.slow
def test_engine_on_the_compiled_steps_answers_as_generate_stream(model):
    """Six requests of different lengths at once: the engine's rows go from 6 (the "many" step) through the "few"
    one to 1 as they finish, with a realignment when a longer prompt joins; every greedy answer equals
    generate_stream's eager one for that prompt alone."""
    import threading
    from model.engine import Engine, GenerationRequest
    prompts = [[1, 5, 9], [3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8], [6, 6, 6, 6, 6], [9, 8, 7, 6, 5, 4]]
    lengths = [20, 6, 12, 3, 16, 9]
    expected = [tokens(model, p, n, "off")[0] for p, n in zip(prompts, lengths)]
    fast_decode.set_mode("on")
    try:
        engine = Engine(model, eos_token_id=-1, max_batch=6, max_queue=6)
    finally:
        fast_decode.set_mode("auto")
    assert engine.fast.ready() and sorted(map(str, engine.fast.steps)) == ["1", "few", "many"]
    answers, done = {}, threading.Event()

    def finished(i):
        def on_done(reason, error):
            answers[i] = (reason, error)
            if len(answers) == len(prompts):
                done.set()
        return on_done
    requests = [GenerationRequest(p, max_new_tokens=n, on_done=finished(i))
                for i, (p, n) in enumerate(zip(prompts, lengths))]
    for request in requests:
        engine.submit(request)
    engine.start()
    try:
        assert done.wait(120)
    finally:
        engine.stop()
    assert all(reason == "length" for reason, _ in answers.values()), answers
    assert [r.ids[len(p):] for r, p in zip(requests, prompts)] == expected
    assert engine.n_steps >= max(lengths) - 1
