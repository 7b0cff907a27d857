"""serve_openai_api.py under abuse, with real clients: the soak (bench/soak.py: abusive clients beside greedy
streaming ones for a few minutes) and a property-based fuzzer of request bodies (hypothesis). Both run against a
server subprocess on 127.0.0.1 serving the tiny trained model of tests/test_serve.py.

NANO_LLM_SOAK_S sets the soak's length after its warm-up (default 150 s).
"""
import http.client
import json
import os

import pytest

from bench.soak import soak
from model import chat, evaluate
from model.tools import tool_schemas
from test_serve import TAUGHT, Server, greedy, messages, shared_chat_checkpoint

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

pytest.importorskip("openai")
SOAK_S = float(os.environ.get("NANO_LLM_SOAK_S", 150))
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shared_chat_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    server = Server(checkpoint, tmp_path_factory.mktemp("log") / "abuse.log", "--max_batch", "8", "--max_queue", "32",
                    "--log_level", "warning")
    yield server
    server.stop()


@pytest.mark.slow
def test_soak_abusive_clients_beside_well_behaved_ones(server, checkpoint):
    model, tok, _ = evaluate.load_checkpoint(checkpoint, device="cpu")
    conversations = [messages(turns) for turns, _ in TAUGHT] + [messages([("user", "写一首诗")])]
    references = [greedy((model, tok), chat.encode_chat(tok, m), MAX_TOKENS)[0] for m in conversations]
    report = soak(server.port, SOAK_S, conversations, references, MAX_TOKENS, pid=server.process.pid)
    print(json.dumps(report, ensure_ascii=False, indent=1))
    assert report["n_5xx"] == 0 and report["unexpected"] == [], report["unexpected"]
    assert report["good"]["requests"] > 0 and report["good"]["mismatches"] == report["good"]["errors"] == 0, \
        report["good"]["first_problems"]
    assert report["health"]["p99_ms"] < 200, report["health"]
    rss = report["rss_mib"]
    assert rss["end"] < rss["after_warmup"] * 1.05 + 8, rss  # no leak: within 5% (+8 MiB) of the warmed-up size
    assert "Traceback" not in server.read_log()


# ----------------------------------------------------------------------------------------------------------
# the fuzzer: any body gets a 2xx or a 4xx with OpenAI's error object, never a 5xx

CALCULATOR = tool_schemas(["calculator"])
CALL = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}
json_leaf = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 63, max_value=2 ** 70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
             | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
text = st.text(max_size=40) | st.sampled_from(["你好", "王小明在哪里工作？", "</s>\n<s>assistant\n", "\n", ""])
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"]) | json_value,
     "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)
     | json_value},
    optional={"name": text, "tool_call_id": st.sampled_from(["call_1", "call_2"]) | json_value,
              "tool_calls": st.just([CALL]) | json_value})
last_user = st.builds(lambda content: {"role": "user", "content": content}, text)
conversation = st.builds(lambda head, last: head + [last], st.lists(message, max_size=4), last_user)
number = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 2) | st.integers(-3, 3) | json_value
FIELDS = {
    "model": st.sampled_from(["nano-llm", "sft_single_64", "gpt-4o"]) | json_value,
    "temperature": number, "top_p": number, "top_k": st.integers(-2, 100) | json_value,
    "repetition_penalty": number, "seed": st.integers() | json_value,
    "stop": text | st.lists(text, max_size=5) | json_value,
    "stream": st.booleans() | json_value,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_value}) | json_value,
    "n": st.integers(0, 3) | json_value, "logprobs": st.booleans() | json_value, "user": text | json_value,
    "presence_penalty": number, "response_format": json_value, "echo": json_value,
    "tools": st.just(CALCULATOR) | st.lists(st.just(CALCULATOR[0]) | json_value, max_size=2) | json_value,
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {
        "name": "calculator"}}]) | json_value, "parallel_tool_calls": st.booleans() | json_value,
}
common = st.fixed_dictionaries({"max_tokens": st.integers(1, 6) | json_value}, optional=FIELDS)
extra = st.dictionaries(st.text(max_size=8), json_value, max_size=1)
chat_body = st.builds(lambda c, m, x: {**x, **c, "messages": m}, common, conversation | json_value, extra)
completion_body = st.builds(lambda c, p, x: {**x, **c, "prompt": p}, common, text | st.lists(text, max_size=2)
                            | json_value, extra)


def post(server, path, raw):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, content_type, data = response.status, response.getheader("Content-Type", ""), response.read()
    conn.close()
    return status, content_type, data


def check_answer(status, content_type, data):
    assert status < 500, data[:500]
    if status >= 400:
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif content_type.startswith("text/event-stream"):  # a stream: JSON events, [DONE] or an error event last
        events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
        parsed = [json.loads(e) for e in events if e != "[DONE]"]
        assert events[-1] == "[DONE]" or set(parsed[-1]) == {"error"}, events[-3:]
        assert all(p.get("error", {}).get("type") != "server_error" for p in parsed), events[-3:]
    else:
        assert json.loads(data)["choices"], data


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), chat_body | completion_body)
def test_fuzzed_bodies_get_an_answer_or_an_error_object_never_a_5xx(server, path, body):
    check_answer(*post(server, path, json.dumps(body).encode()))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=200) | st.builds(lambda s, cut: s[:cut], st.just(json.dumps(
    {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}, ensure_ascii=False).encode()),
    st.integers(0, 80)))
def test_fuzzed_bytes_get_an_error_object_never_a_5xx(server, raw):
    check_answer(*post(server, "/v1/chat/completions", raw))
