"""Tool calling through serve_openai_api.py, end to end with the official `openai` client: a tiny model trained
to call the calculator (and to answer its result, to make two calls at once, to write a broken call and to call a
tool nobody declared) is served as a subprocess; the tests do the full round trip (call -> model.tools.run_call in
the test -> the result as a `tool` message -> the answer), streamed and not, and send bad tool requests.
"""
import json

import pytest
import torch

from model import chat
from model.checkpoint import copy_tokenizer
from model.LMConfig import LMConfig
from model.model import Transformer
from model.tools import TOOLS, run_call, tool_schemas
from conftest import overfit
from test_serve import TINY, Server, request

openai = pytest.importorskip("openai")

CALCULATOR = tool_schemas(["calculator"])


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def user(text):
    return {"role": "user", "content": text}


ASK = "123乘以456等于多少？"
TWO = "12乘以34，56乘以78？"
BROKEN = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"\n</tool_call>'  # not JSON
# the conversations the fixture model memorises, all with the calculator declared
TAUGHT = [
    [user(ASK), {"role": "assistant", "content": "", "tool_calls": [call("calculator", {"expression": "123*456"})]},
     {"role": "tool", "content": "56088"}, {"role": "assistant", "content": "123×456=56088。"}],
    [user(TWO), {"role": "assistant", "content": "我来算两次。", "tool_calls": [
        call("calculator", {"expression": "12*34"}), call("calculator", {"expression": "56*78"})]},
     {"role": "tool", "content": "408"}, {"role": "tool", "content": "4368"},
     {"role": "assistant", "content": "408和4368。"}],
    [user("写一个坏的调用"), {"role": "assistant", "content": BROKEN}],
    [user("杭州天气怎么样？"), {"role": "assistant", "content": "", "tool_calls": [call("weather", {"city": "杭州"})]},
     {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "杭州晴。"}],
]


def train_tool_checkpoint(run_dir, steps=200):
    """A tiny model trained on TAUGHT (the loss on every assistant turn, as SFT trains) until it replays them."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat.DEFAULT_TOKENIZER_DIR)
    torch.manual_seed(0)
    model = Transformer(LMConfig(**TINY, max_seq_len=512))  # the calculator's declaration alone is ~190 tokens
    rows = chat.ChatEncoder(tok).encode_many(TAUGHT, "all", [CALCULATOR] * len(TAUGHT))
    assert overfit(model, rows, steps) < 0.01  # near 0.05 a reply's first token could still go either way
    model.save_pretrained(run_dir)
    copy_tokenizer(chat.DEFAULT_TOKENIZER_DIR, run_dir)
    return run_dir


def shared_tool_checkpoint(tmp_path_factory):
    """train_tool_checkpoint once per test session: tests/test_chat_page.py serves the same model."""
    path = tmp_path_factory.getbasetemp() / "tool_checkpoint" / "out" / "sft_multi_512"
    if not (path / "config.json").exists():
        train_tool_checkpoint(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = shared_tool_checkpoint(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)
    server = Server(checkpoint, tmp_path_factory.mktemp("log") / "tools.log", "--max_batch", "4")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(chat.DEFAULT_TOKENIZER_DIR)


def ask(server, messages, **kwargs):
    kwargs.setdefault("max_tokens", 200)
    return server.client().chat.completions.create(model="nano-llm", messages=messages, temperature=0, **kwargs)


def ask_streamed(server, messages, **kwargs):
    """-> (content, calls as [{"id", "type", "function": {"name", "arguments"}}], finish_reason, chunks), joined
    from the deltas the way a client joins them: the pieces of one call share its index."""
    chunks = list(ask(server, messages, stream=True, **kwargs))
    content, calls = "", {}
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            entry = calls.setdefault(piece.index, {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
            entry["id"] = piece.id or entry["id"]
            entry["type"] = piece.type or entry["type"]
            entry["function"]["name"] += piece.function.name or ""
            entry["function"]["arguments"] += piece.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], chunks[-1].choices[0].finish_reason, chunks


def as_dicts(tool_calls):
    return [{"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in tool_calls]


def results_of(tool_calls):
    """Run each call with the project's tools, as the client's own code would: -> the tool messages."""
    return [{"role": "tool", "tool_call_id": c["id"],
             "content": run_call(call(c["function"]["name"], json.loads(c["function"]["arguments"])),
                                 CALCULATOR).content} for c in tool_calls]


# ----------------------------------------------------------------------------------------------------------
# the round trip

def test_the_model_calls_the_calculator_and_answers_its_result(server, tok):
    reply = ask(server, [user(ASK)], tools=CALCULATOR)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [tool_call] = choice.message.tool_calls
    assert tool_call.id.startswith("call_") and tool_call.type == "function"
    assert tool_call.function.name == "calculator"
    assert json.loads(tool_call.function.arguments) == {"expression": "123*456"}  # a JSON string, as OpenAI's
    # the prompt is the training rendering: the tools in the system turn
    assert reply.usage.prompt_tokens == len(chat.encode_chat(tok, [user(ASK)], CALCULATOR))
    results = results_of(as_dicts(choice.message.tool_calls))
    assert results[0]["content"] == "56088"
    history = [user(ASK), {"role": "assistant", "content": None, "tool_calls": as_dicts(choice.message.tool_calls)},
               *results]
    final = ask(server, history, tools=CALCULATOR)
    assert final.choices[0].message.content == "123×456=56088。" and final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    assert final.usage.prompt_tokens == len(chat.encode_chat(tok, TAUGHT[0][:3], CALCULATOR))


def test_the_streamed_round_trip_equals_the_whole_one(server):
    whole = ask(server, [user(ASK)], tools=CALCULATOR).choices[0].message
    content, calls, finish, chunks = ask_streamed(server, [user(ASK)], tools=CALCULATOR)
    assert content == "" and finish == "tool_calls"
    assert [c["function"] for c in calls] == [c["function"] for c in as_dicts(whole.tool_calls)]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    # OpenAI's shape: the first chunk of a call holds its index, id, type, name and empty arguments
    first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls).choices[0].delta.tool_calls[0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                       "calculator", "")
    history = [user(ASK), {"role": "assistant", "content": None, "tool_calls": calls}, *results_of(calls)]
    content, calls, finish, _ = ask_streamed(server, history, tools=CALCULATOR)
    assert (content, calls, finish) == ("123×456=56088。", [], "stop")


def test_text_before_several_calls_and_parallel_tool_calls_false(server):
    message = ask(server, [user(TWO)], tools=CALCULATOR).choices[0].message
    assert message.content == "我来算两次。"  # the newline before the first <tool_call> is not content
    expected = [{"name": "calculator", "arguments": '{"expression": "12*34"}'},
                {"name": "calculator", "arguments": '{"expression": "56*78"}'}]
    assert [c["function"] for c in as_dicts(message.tool_calls)] == expected
    assert len({c.id for c in message.tool_calls}) == 2
    content, calls, finish, _ = ask_streamed(server, [user(TWO)], tools=CALCULATOR)
    assert content == "我来算两次。" and [c["function"] for c in calls] == expected and finish == "tool_calls"
    one = ask(server, [user(TWO)], tools=CALCULATOR, parallel_tool_calls=False).choices[0].message
    assert [c["function"] for c in as_dicts(one.tool_calls)] == expected[:1]
    history = [user(TWO), {"role": "assistant", "content": "我来算两次。", "tool_calls": calls}, *results_of(calls)]
    assert [m["content"] for m in history[2:]] == ["408", "4368"]
    assert ask(server, history, tools=CALCULATOR).choices[0].message.content == "408和4368。"


def test_a_broken_or_undeclared_call_comes_back_as_content(server):
    for question, text in (("写一个坏的调用", BROKEN),
                           ("杭州天气怎么样？", chat.message_text(TAUGHT[3][1]))):  # weather is not declared
        choice = ask(server, [user(question)], tools=CALCULATOR).choices[0]
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "stop")
        content, calls, finish, _ = ask_streamed(server, [user(question)], tools=CALCULATOR)
        assert (content, calls, finish) == (text, [], "stop")
    # cut short inside the call: "length", the partial call as text
    choice = ask(server, [user(ASK)], tools=CALCULATOR, max_tokens=20).choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("<tool_call>\n{")
    assert choice.message.tool_calls is None


def test_tool_choice_forces_a_call_or_hides_the_tools(server, tok):
    expected = [{"name": "calculator", "arguments": '{"expression": "123*456"}'}]
    for choice in ("required", {"type": "function", "function": {"name": "calculator"}}):
        reply = ask(server, [user(ASK)], tools=CALCULATOR, tool_choice=choice)
        assert [c["function"] for c in as_dicts(reply.choices[0].message.tool_calls)] == expected, choice
        assert reply.choices[0].finish_reason == "tool_calls"
        content, calls, finish, _ = ask_streamed(server, [user(ASK)], tools=CALCULATOR, tool_choice=choice)
        assert content == "" and [c["function"] for c in calls] == expected and finish == "tool_calls"
    # the forced start of the call is part of the prompt: the prompt is the conversation's plus that start
    forced = chat.encode_chat(tok, [user(ASK)], CALCULATOR) + chat.encode_texts(
        tok, ['<tool_call>\n{"name": "calculator", "arguments": '])[0]
    assert ask(server, [user(ASK)], tools=CALCULATOR, tool_choice="required").usage.prompt_tokens == len(forced)
    # "none": the tools are not declared at all, and whatever the model writes is content
    reply = ask(server, [user(ASK)], tools=CALCULATOR, tool_choice="none", max_tokens=30)
    assert reply.usage.prompt_tokens == len(chat.encode_chat(tok, [user(ASK)]))
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------------------------------------
# bad tool requests: 400 with OpenAI's error object naming the field

CALL = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}
BAD_TOOL_REQUESTS = [
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("a tool that is not a function", {"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ("no name", {"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
     "tools[0].function.name"),
    ("schema not an object", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
    ("schema of another type", {"tools": [{"type": "function", "function": {"name": "f",
                                                                            "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ("properties not an object", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": ["x"]}}}]}, "tools[0].function.parameters.properties"),
    ("duplicate names", {"tools": CALCULATOR * 2}, "tools[1].function.name"),
    ("unknown tool_choice name", {"tools": CALCULATOR, "tool_choice": {"type": "function",
                                                                        "function": {"name": "search"}}},
     "tool_choice"),
    ("unknown tool_choice", {"tools": CALCULATOR, "tool_choice": "always"}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("parallel_tool_calls a string", {"tools": CALCULATOR, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ("strict schemas", {"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
     "tools[0].function.strict"),
    ("functions", {"functions": [{"name": "f"}]}, "functions"),
    ("tool message without tool_call_id", {"messages": [
        user(ASK), {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "2"}]},
     "messages[2].tool_call_id"),
    ("tool message answering no call", {"messages": [user(ASK), {"role": "tool", "tool_call_id": "call_1",
                                                                  "content": "2"}]}, "messages[1].role"),
    ("tool_call_id of no waiting call", {"messages": [
        user(ASK), {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_2", "content": "2"}]}, "messages[2].tool_call_id"),
    ("a call nobody answered", {"messages": [
        user(ASK), {"role": "assistant", "content": None, "tool_calls": [CALL]}, user("?")]},
     "messages[1].tool_calls"),
    ("arguments not JSON", {"messages": [
        user(ASK), {"role": "assistant", "content": None, "tool_calls": [
            {**CALL, "function": {"name": "calculator", "arguments": '{"expression": '}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"}]}, "messages[1].tool_calls[0].function.arguments"),
    ("arguments not an object", {"messages": [
        user(ASK), {"role": "assistant", "content": None, "tool_calls": [
            {**CALL, "function": {"name": "calculator", "arguments": "[1]"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"}]}, "messages[1].tool_calls[0].function.arguments"),
    ("a call without id", {"messages": [
        user(ASK), {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
                                                                           "function": CALL["function"]}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"}]}, "messages[1].tool_calls[0].id"),
    ("the assistant's turn last", {"messages": [
        user(ASK), {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"}, {"role": "assistant", "content": "2"}]},
     "messages"),
]


@pytest.mark.parametrize("body, param", [b[1:] for b in BAD_TOOL_REQUESTS], ids=[b[0] for b in BAD_TOOL_REQUESTS])
def test_bad_tool_requests_get_an_error_object(server, body, param):
    status, _, answer = request(server, "/v1/chat/completions", {"messages": [user(ASK)], **body})
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


def test_the_client_sees_bad_tool_requests_as_bad_requests(server):
    with pytest.raises(openai.BadRequestError, match="search"):
        ask(server, [user(ASK)], tools=CALCULATOR, tool_choice={"type": "function", "function": {"name": "search"}})
    with pytest.raises(openai.BadRequestError, match="Invalid schema"):
        ask(server, [user(ASK)], tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}])
    assert server.health()["running"] == 0


# ----------------------------------------------------------------------------------------------------------
# the registry for the chat page: GET /v1/tools, POST /v1/tools/run

def test_the_server_lists_and_runs_its_registry_tools_only(server):
    status, _, listed = request(server, "/v1/tools")
    assert status == 200 and listed["data"] == tool_schemas() and set(TOOLS) == {"calculator"}
    run = lambda body: request(server, "/v1/tools/run", body)  # noqa: E731
    assert run({"name": "calculator", "arguments": '{"expression": "123*456"}'})[2] == {
        "name": "calculator", "content": "56088", "error": None}
    assert run({"name": "calculator", "arguments": {"expression": "(1+2)*3"}})[2]["content"] == "9"
    status, _, refused = run({"name": "calculator", "arguments": {"expression": "__import__('os').getcwd()"}})
    assert status == 200 and refused["content"].startswith("error: ") and refused["error"]
    status, _, answer = run({"name": "shell", "arguments": {"command": "ls"}})
    assert status == 400 and answer["error"]["param"] == "name"
    status, _, answer = run({"name": "calculator", "arguments": "{"})
    assert status == 400 and answer["error"]["param"] == "arguments"
