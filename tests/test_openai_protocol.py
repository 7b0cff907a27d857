"""model/openai_protocol.py without a server: request rules, stop strings, the streamed text, prompts from chats.
(tests/test_serve.py checks the same rules end to end through real HTTP.)"""
import random
import time

import pytest

from model import chat
from model.openai_protocol import (MAX_STOP_CHARS, APIError, StopStrings, TextStream, chat_prompt,
                                   check_content_type, host_allowed, max_token_bytes, parse_body, sampling_params)

NAMES = ["sft_single_64", "nano-llm"]


def params(**body):
    return sampling_params(body, NAMES, None, "max_completion_tokens")


def refused(body, status=400):
    """-> the APIError's param for a body sampling_params refuses."""
    with pytest.raises(APIError) as err:
        params(**body)
    assert err.value.status == status, err.value.message
    return err.value.param, err.value.message


# ----------------------------------------------------------------------------------------------------------
# numbers

def test_values_openai_accepts_are_greedy_rather_than_a_crash():
    # top_p 0 and a temperature too small to divide by (1e-45 / logits -> inf -> NaN probabilities) were 500s
    for body in ({"top_p": 0}, {"temperature": 1e-45}, {"temperature": 0, "top_p": 0.5}, {"temperature": 5e-6}):
        got = params(**body)
        assert got["temperature"] == 0.0 and got["top_p"] == 1.0, body
    assert params(temperature=0.7, top_p=0.9)["temperature"] == 0.7
    assert params(seed=(1 << 64) - 1)["seed"] == (1 << 64) - 1 and params(seed=-(1 << 63))["seed"] == -(1 << 63)


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", 2.5), ("temperature", -1),
    ("top_p", float("nan")), ("top_p", -0.1), ("top_p", float("-inf")),
    ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")), ("repetition_penalty", 0),
    ("repetition_penalty", 1e-40), ("repetition_penalty", 1e300),
    ("top_k", -1), ("top_k", 2.5), ("max_tokens", float("nan")), ("max_tokens", 0), ("max_completion_tokens", True),
    ("seed", 1 << 64), ("seed", -(1 << 63) - 1), ("seed", float("nan")),
])
def test_bad_numbers_get_a_400_naming_the_field(field, value):
    param, message = refused({field: value})
    assert param == field and message.startswith(f"'{field}'") or message.startswith(field), message


def test_stop_strings_are_bounded_in_number_and_length():
    assert params(stop="x" * MAX_STOP_CHARS)["stop"] == ["x" * MAX_STOP_CHARS]
    param, message = refused({"stop": ["a", "b" * 100_000]})
    assert param == "stop" and "100000" in message and str(MAX_STOP_CHARS) in message
    assert refused({"stop": list("abcde")})[0] == "stop"
    assert refused({"stop": []})[0] == "stop" and refused({"stop": [""]})[0] == "stop"


# ----------------------------------------------------------------------------------------------------------
# the body and the headers

def test_bodies_that_are_not_plain_json_objects_are_400_not_500():
    assert parse_body(b'{"temperature": NaN}')["temperature"] != 0  # parses: refused by the field's rule
    assert parse_body('{"a": "\\ud83d\\ude00"}'.encode())["a"] == "😀"  # a surrogate pair is one character
    for raw in (b"[" * 5000 + b"]" * 5000, b'{"seed": ' + b"9" * 5000 + b"}", b'{"a": "\\ud800"}', b"\xff\xfe",
                b"", b"[]", b'"text"', b'{"a": 1'):
        with pytest.raises(APIError) as err:
            parse_body(raw)
        assert err.value.status == 400 and err.value.code == "invalid_json", raw[:20]


def test_content_type_must_be_json():
    for ok in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        check_content_type(ok)
    for wrong in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None, ""):
        with pytest.raises(APIError) as err:
            check_content_type(wrong)
        assert err.value.status == 415


def test_host_header_must_name_this_machine_or_an_allowed_host():
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "10.0.0.5", "app.localhost:8000",
                 None):
        assert host_allowed(host, ()), host
    for host in ("evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io:8000", "example.com"):
        assert not host_allowed(host, ()), host
    assert host_allowed("myserver.lan:8000", ("myserver.lan",))
    assert host_allowed("a.example.com", (".example.com",)) and host_allowed("example.com", (".example.com",))
    assert not host_allowed("badexample.com", (".example.com",))
    assert host_allowed("anything.at.all", ("*",))


# ----------------------------------------------------------------------------------------------------------
# stop strings and streamed text

def test_stop_matcher_finds_what_find_finds():
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        matcher, fed, found = StopStrings(stops), 0, None
        while fed < len(text) and found is None:
            piece = text[fed:fed + rng.randint(1, 4)]
            at = matcher.feed(piece)
            found = None if at is None else fed + at
            fed += len(piece)
        hits = [i for i in (text[:fed].find(s) for s in stops) if i >= 0]
        assert found == (min(hits) if hits else None), (stops, text)
        if found is None:  # what is held back is exactly the longest ending that starts a stop string
            longest = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
            assert matcher.partial() == longest


def old_text_stream(tokenizer, stops, tokens):
    """The server's first TextStream (decode every id on every token, search the whole text): the reference."""
    ids, sent, pieces = [], 0, []
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            pieces.append(text[sent:min(found)])
            return "".join(pieces), True
        hold = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
        pieces.append(text[sent:max(sent, len(text) - hold)])
        sent = max(sent, len(text) - hold)
    return "".join(pieces) + tokenizer.decode(ids, skip_special_tokens=True)[sent:], False


def stream(tokenizer, stops, tokens):
    text, pieces = TextStream(tokenizer, stops), []
    for token in tokens:
        piece, stopped = text.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    piece, stopped = text.flush()
    return pieces + [piece], stopped


def test_streamed_text_equals_decoding_everything_and_stops_where_it_did(tokenizer):
    rng = random.Random(1)
    texts = ["王小明在蓝海科技工作。", "12+30=42。", "他喜欢下围棋，也喜欢😀 emoji and English words.", "一二三四五六七八九十"]
    for _ in range(300):
        text = rng.choice(texts) * rng.randint(1, 3)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if rng.random() < 0.3:  # raw byte tokens and control tokens, as a random model emits
            tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        stops = rng.sample(["科技", "工作。", "围棋，也", "😀", "42", "三四", "zzz", "。"], rng.randint(0, 3))
        pieces, stopped = stream(tokenizer, stops, tokens)
        assert ("".join(pieces), stopped) == old_text_stream(tokenizer, stops, tokens), (text, stops)
        if not stops:
            assert "".join(pieces) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_streamed_text_decodes_each_token_a_bounded_number_of_times(tokenizer):
    decoded = []

    class Counting:
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    tokens = tokenizer("王小明在蓝海科技工作。" * 40, add_special_tokens=False)["input_ids"]
    pieces, _ = stream(Counting(), ["x" * 999, "y" * 999, "z" * 999, "w" * 999], tokens)
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert sum(decoded) < 6 * len(tokens), (sum(decoded), len(tokens))  # re-decoding all: len ** 2 / 2


def test_long_stop_strings_cost_linear_time(tokenizer):
    # four 1,000-character stops that keep almost matching: each token used to scan every prefix of each stop
    stops = ["好" * (MAX_STOP_CHARS - 1) + c for c in "一二三四"]
    tokens = tokenizer("好" * 3000, add_special_tokens=False)["input_ids"]
    start = time.perf_counter()
    pieces, stopped = stream(tokenizer, stops, tokens)
    assert not stopped and "".join(pieces) == "好" * 3000
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------------------------------------
# conversations -> prompt ids

def test_chat_prompt_counts_once_trims_and_refuses_huge_messages_untokenized(tokenizer):
    calls = []

    class Counted:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, **kwargs):
            calls.append(len(texts))
            return tokenizer(texts, **kwargs)

    history = [{"role": "user" if k % 2 == 0 else "assistant", "content": f"第{k}句"} for k in range(2047)]
    ids = chat_prompt(Counted(), history, max_len=128, max_tokens=32)
    budget = chat.context_budget(128, 32)
    assert ids == chat.encode_chat(tokenizer, chat.trim_history(tokenizer, history, budget)) and len(ids) <= budget
    assert max(calls) == len(history) and sum(calls) < len(history) + 100, calls  # one call counts them all
    calls.clear()
    token_bytes = max_token_bytes(tokenizer)
    with pytest.raises(APIError) as err:
        chat_prompt(Counted(), [{"role": "user", "content": "长" * (128 * token_bytes)}], 128, None, token_bytes)
    assert err.value.param == "messages[0].content" and "128 tokens" in err.value.message and calls == []
    with pytest.raises(APIError) as err:  # shorter, still too long: counted
        chat_prompt(Counted(), [{"role": "user", "content": "你好"}, {"role": "user", "content": "长" * 300}], 128,
                    None, token_bytes)
    assert err.value.param == "messages[1].content" and "alone is" in err.value.message and max(calls) == 2
