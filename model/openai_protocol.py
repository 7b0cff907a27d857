"""
The OpenAI protocol as serve_openai_api.py speaks it: what a request may hold, the error object, the objects
sent back, and the text of a stream with its stop strings. No HTTP here (the server owns sockets and the engine),
so each rule is a plain function with its own test (tests/test_openai_protocol.py).

    params = sampling_params(body, ["sft_multi_512", "nano-llm"], None, "max_completion_tokens")
    ids = chat_prompt(tokenizer, chat_messages(body), max_len=512, max_tokens=params["max_tokens"])
    text = TextStream(tokenizer, params["stop"])
    piece, stopped = text.add(token_id)   # per generated token; text.flush() at the end

Tools (docs/tools.md): tool_plan(body) reads tools / tool_choice / parallel_tool_calls into a ToolPlan (what the
prompt declares, the start of a call it forces); chat_messages accepts assistant tool_calls and tool results;
ToolCallReader(plan) turns the reply's text into content plus tool_calls, piece by piece for a stream.

Limits (each refused with a 400 naming the field and the limit): MAX_MESSAGES messages, MAX_STOPS stop strings
of at most MAX_STOP_CHARS characters, numbers finite and in OpenAI's ranges. The body's size, its Content-Type and
the Host header are checked by the server before a body is read (check_content_type, host_allowed).
"""
import hmac
import ipaddress
import json
import math
import re
import uuid

from .chat import (CALL_OPEN, ChatEncoder, chat_turns, context_budget, encode_completion, encode_texts, message_text,
                   parse_tool_calls, to_json, trim_history)
from .generate import GREEDY_BELOW, check_sampling

MODEL_ALIAS = "nano-llm"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
DEFAULT_TRIM_REPLY = 256     # reply room assumed when trimming history for a request without max_tokens
COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
DEFAULT_MAX_BODY = 1 << 20   # bytes; --max_body
MAX_MESSAGES = 2048          # OpenAI's own limit on 'messages'
MAX_STOPS, MAX_STOP_CHARS = 4, 1000
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
PENALTY_RANGE = (1e-3, 1e3)  # keeps penalised float32 logits finite at any temperature
MAX_PENDING_TOKENS = 8       # a UTF-8 character is at most 4 tokens: more undecodable ones are broken bytes
MAX_TOOLS = 128              # OpenAI's own limit on 'tools'
MAX_TOOL_NAME = 64           # OpenAI's limit on a function's name
MAX_N = 16                   # choices per request: each holds an engine slot (the default --max_batch)

# Fields OpenAI defines that this server cannot honour: refused unless they hold their no-op value.
UNSUPPORTED = {
    "best_of": (1,), "functions": ([],), "function_call": ("none",), "logprobs": (False, 0),
    "top_logprobs": (0,), "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "response_format": ({"type": "text"},), "echo": (False,), "suffix": ("",), "audio": (), "modalities": (["text"],),
}
COMMON_FIELDS = {"model", "n", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed",
                 "stream", "stream_options", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls"}
INSTEAD = {"functions": "use 'tools' (OpenAI's deprecated 'functions' is not read)",
           "function_call": "use 'tool_choice' (OpenAI's deprecated 'function_call' is not read)"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}


class APIError(Exception):
    """An error answered as OpenAI's error object {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param, message):
    return APIError(400, message, param=param, code="invalid_value")


def shown(value, limit=60):
    """A client's value inside an error message: JSON, ASCII-only, cut to `limit` characters."""
    try:
        text = json.dumps(value) if not isinstance(value, str) else json.dumps(value)[1:-1]
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def server_error(request_id):
    """What a client sees of a failure inside the server: the detail goes to the log under request_id."""
    return APIError(500, f"The server had an error while processing your request; its log has the details "
                          f"under request id {request_id}", type="server_error", code="internal_error",
                    headers={"X-Request-Id": request_id})


# ----------------------------------------------------------------------------------------------------------
# before the body: who may ask, and in what form

def check_key(authorization, api_key):
    """`Authorization: Bearer <key>`, compared in constant time; raises 401."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def host_allowed(host, allowed_hosts):
    """Whether a Host header names this server. A web page that re-points its own domain name at 127.0.0.1 (DNS
    rebinding) reaches the port under that name, so names are checked: IP addresses, localhost (and *.localhost)
    and the entries of allowed_hosts pass ("*" allows any, ".example.com" a domain and its subdomains)."""
    if "*" in allowed_hosts or not host:
        return True
    host = host.strip().lower()
    name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    for entry in ("localhost", ".localhost", *(h.strip().lower() for h in allowed_hosts)):
        if name == entry or name == entry.lstrip(".") or (entry.startswith(".") and name.endswith(entry)):
            return True
    return False


def host_refused(host):
    return APIError(403, f"this server does not answer to the host {shown(host)!r}: start it with --allowed_hosts "
                         f"naming it (a check against web pages that point their own domain at this machine)",
                    code="host_not_allowed")


def check_content_type(content_type):
    """The API's POSTs take application/json only: a web page can send text/plain to any address without asking
    (no CORS preflight), but not application/json. Raises 415."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the request body must be sent as 'Content-Type: application/json', not "
                            f"{shown(content_type or 'none')!r}", code="unsupported_media_type")


def body_too_large(max_body):
    return APIError(413, f"the request body is larger than this server's limit of {max_body} bytes (--max_body)",
                    code="request_too_large")


_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_body(raw):
    """Request body bytes -> a JSON object (dict). NaN and Infinity parse (Python's json accepts them) and are
    refused later by the field that holds them."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # bad syntax or UTF-8, a 5,000-digit number, 1,000 nested arrays
        raise APIError(400, f"the request body is not valid JSON: {shown(str(err), 200)}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if _LONE_SURROGATE.search(raw):  # "\ud800" alone decodes to a str that cannot be encoded back: not text
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                                "pair): not text", code="invalid_json") from None
    return body


# ----------------------------------------------------------------------------------------------------------
# the fields: every problem names its field

def number(body, name, default, low=None, high=None, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # json.loads reads NaN, and NaN passes comparisons
        raise bad(name, f"'{name}' must be a finite number, not {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"<= {high}" if low is None else f"between {low} and {high}"
        raise bad(name, f"'{name}' must be {span}, not {value}")
    return value


def check_fields(body, allowed):
    for name, value in body.items():
        if name in UNSUPPORTED:
            if value is not None and value not in UNSUPPORTED[name]:
                raise bad(name, f"'{name}' = {shown(value)} is not supported by this server"
                                + (f": {INSTEAD[name]}" if name in INSTEAD else ""))
        elif name not in allowed:
            raise bad(shown(name), f"Unrecognized request argument supplied: {shown(name)}")


def stop_strings(body):
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return []
    if not (isinstance(stop, list) and 1 <= len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings")
    longest = max(len(s) for s in stop)
    if longest > MAX_STOP_CHARS:
        raise bad("stop", f"a stop string is {longest} characters; this server takes at most {MAX_STOP_CHARS}")
    return stop


def sampling_params(body, model_names, max_tokens_default, max_tokens_field="max_tokens"):
    """The fields /v1/chat/completions and /v1/completions share -> dict. The sampling knobs follow the rules
    the command line applies (generate.check_sampling) within OpenAI's ranges; top_p 0 and temperatures too small
    to divide by are greedy."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"'model' must be a string, not {type(model).__name__}")
    if model is not None and model not in model_names:
        raise APIError(404, f"The model '{shown(model)}' does not exist: this server serves '{model_names[0]}' "
                            f"(alias '{MODEL_ALIAS}'), see GET /v1/models", param="model", code="model_not_found")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise bad("stream", f"'stream' must be a boolean, not {type(body['stream']).__name__}")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not body.get("stream"):
            raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
            raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    max_tokens = number(body, max_tokens_field, None, 1, integer=True)
    if max_tokens_field != "max_tokens":  # chat: either name (max_tokens is the older one)
        max_tokens = max_tokens or number(body, "max_tokens", None, 1, integer=True)
    params = dict(
        temperature=number(body, "temperature", 1.0, 0, 2),
        top_p=number(body, "top_p", 1.0, 0, 1),
        top_k=number(body, "top_k", 0, integer=True),
        repetition_penalty=number(body, "repetition_penalty", 1.0, *PENALTY_RANGE),
    )
    greedy = params["temperature"] < GREEDY_BELOW or params["top_p"] == 0  # OpenAI takes top_p 0: the top token
    if greedy:
        params.update(temperature=0.0, top_p=1.0)
    for name, value in params.items():  # the command line's rules, one field at a time so the error names it
        try:
            check_sampling(**{name: value})
        except ValueError as err:
            raise bad(name, str(err)) from None
    return dict(
        params,
        top_k=params["top_k"] or None,
        max_tokens=max_tokens or max_tokens_default,
        seed=number(body, "seed", None, *SEED_RANGE, integer=True),
        n=number(body, "n", 1, 1, MAX_N, integer=True),
        stop=stop_strings(body),
        stream=bool(body.get("stream")),
        include_usage=bool((stream_options or {}).get("include_usage")),
    )


def text_content(content, where):
    """A message's content as text: a string, or a list of text parts (joined)."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"{where}.content", f"{where}.content must be a string (or a list of text parts)")
    return content


def json_object_text(value, where):
    """A call's arguments: OpenAI sends a JSON string holding an object (an object as such is taken too)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as err:
            raise bad(where, f"{where} is not valid JSON ({shown(str(err), 80)}): {shown(value)}") from None
    if not isinstance(value, dict):
        raise bad(where, f"{where} must be a JSON object (as a string), not {shown(value)}")
    return value


def assistant_calls(message, where):
    """The tool_calls of an assistant message -> [(id, {"type": "function", "function": {name, arguments}})]."""
    calls = message.get("tool_calls")
    if calls is None or calls == []:
        return []
    if not isinstance(calls, list):
        raise bad(f"{where}.tool_calls", f"{where}.tool_calls must be a list of {{id, type, function}}")
    clean = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise bad(at, f"{at} must be an object {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                          f"\"arguments\"}}}}")
        if call.get("type", "function") != "function":
            raise bad(f"{at}.type", f"{at}.type must be 'function', not {shown(call.get('type'))}")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise bad(f"{at}.id", f"{at}.id must be a non-empty string (the tool message answering it names it)")
        name = call["function"].get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"{at}.function.name", f"{at}.function.name must be a non-empty string")
        arguments = json_object_text(call["function"].get("arguments"), f"{at}.function.arguments")
        clean.append((call["id"], {"type": "function", "function": {"name": name, "arguments": arguments}}))
    return clean


def chat_messages(body):
    """Validated messages, content as plain text (text parts joined); roles system/developer/user/assistant/tool.
    An assistant message may carry tool_calls (its content then may be null); each call is answered by the tool
    messages right after it (tool_call_id naming the call), as OpenAI requires. The last message is the user's or
    a tool's result: the model answers it."""
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "'messages' is required: a non-empty list of {role, content}")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content}")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"'messages' holds {len(messages)} messages; this server takes at most {MAX_MESSAGES} "
                              f"(the oldest turns are dropped anyway when the conversation outgrows the context)")
    clean, waiting, caller = [], {}, None  # waiting: ids of the calls of messages[caller] not answered yet
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, dict):
            raise bad(where, f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of system, developer, user, assistant, tool, "
                                       f"not {shown(role)}")
        if role != "tool" and waiting:
            raise unanswered(caller, waiting)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise bad(f"{where}.tool_call_id", f"{where}.tool_call_id must be a string: the id of the call "
                                                   f"this message answers")
            if caller is None:
                raise bad(f"{where}.role", f"{where} is a 'tool' message, but no assistant message with "
                                           f"'tool_calls' comes before it")
            if call_id not in waiting:
                raise bad(f"{where}.tool_call_id", f"{where}.tool_call_id {shown(call_id)!r} answers no waiting call "
                                                   f"of messages[{caller}] (waiting: {shown(list(waiting)) or 'none'})")
            del waiting[call_id]
            clean.append({"role": "tool", "content": text_content(message.get("content"), where)})
            continue
        calls = assistant_calls(message, where) if role == "assistant" else []
        content = message.get("content")
        if calls and content is None:  # OpenAI sends content null beside calls
            content = ""
        content = text_content(content, where)
        if calls:
            ids = [call_id for call_id, _ in calls]
            if len(set(ids)) < len(ids):
                raise bad(f"{where}.tool_calls", f"{where}.tool_calls holds the same id twice")
            waiting, caller = dict.fromkeys(ids), k
            clean.append({"role": "assistant", "content": content, "tool_calls": [call for _, call in calls]})
        else:
            caller = None
            clean.append({"role": ROLES[role], "content": content})
    if waiting:
        raise unanswered(caller, waiting)
    if clean[-1]["role"] not in ("user", "tool"):
        raise bad("messages", f"the last message must be the user's (or a tool's result), not the "
                              f"{clean[-1]['role']}'s: the model answers it")
    return clean


def unanswered(caller, waiting):
    return bad(f"messages[{caller}].tool_calls", f"messages[{caller}] calls tools whose results are missing: "
                                                f"no tool message answers {shown(list(waiting))}")


# ----------------------------------------------------------------------------------------------------------
# tools: the declarations, tool_choice, parallel_tool_calls

class ToolPlan:
    """How a chat request uses tools. declared: the tools rendered in the prompt (None: none, and the reply is
    never read as calls); prefix: text the reply is forced to start with (tool_choice "required" or a named
    function); parallel: whether a reply may make several calls (False keeps the first)."""

    def __init__(self, declared=None, prefix="", parallel=True):
        self.declared, self.prefix, self.parallel = declared, prefix, parallel
        self.names = {tool["function"]["name"] for tool in declared or ()}


def function_schema(tool, where):
    """One entry of 'tools' -> {"type": "function", "function": {name[, description][, parameters]}}, in the key
    order training data uses (model.tools.Tool.schema), so the prompt renders as in training."""
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad(where, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                         f"\"parameters\"}}}}")
    fn, where = tool["function"], f"{where}.function"
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_TOOL_NAME:
        raise bad(f"{where}.name", f"{where}.name is required: a string of 1 to {MAX_TOOL_NAME} characters")
    clean = {"name": name}
    if fn.get("description") is not None:
        if not isinstance(fn["description"], str):
            raise bad(f"{where}.description", f"{where}.description must be a string")
        clean["description"] = fn["description"]
    if fn.get("strict"):
        raise bad(f"{where}.strict", f"{where}.strict = true is not supported by this server: it does not constrain "
                                     f"the model's output to the schema")
    parameters = fn.get("parameters")
    if parameters is not None:
        at = f"{where}.parameters"
        if not isinstance(parameters, dict):
            raise bad(at, f"Invalid schema for function {shown(name)!r}: {at} must be a JSON Schema object, not "
                          f"{shown(parameters)}")
        if parameters.get("type", "object") != "object":
            raise bad(at, f"Invalid schema for function {shown(name)!r}: the arguments' schema must have type "
                          f"'object', not {shown(parameters.get('type'))}")
        properties = parameters.get("properties", {})
        if not isinstance(properties, dict) or not all(isinstance(p, dict) for p in properties.values()):
            raise bad(f"{at}.properties", f"{at}.properties must be an object of JSON Schemas")
        required = parameters.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise bad(f"{at}.required", f"{at}.required must be a list of parameter names")
        clean["parameters"] = parameters
    return {"type": "function", "function": clean}


def call_prefix(name=None):
    """The start of a call the reply is forced to begin with: with a name, up to its arguments' object."""
    if name is None:
        return CALL_OPEN + '\n{"name": "'
    return CALL_OPEN + '\n{"name": ' + to_json(name) + ', "arguments": '


def tool_plan(body):
    """'tools', 'tool_choice' and 'parallel_tool_calls' -> ToolPlan.

    tool_choice "auto" (the default with tools): the tools are declared and the model decides. "none": the tools
    are not declared at all (a model that sees no tools calls none; a call it writes anyway is text). "required":
    the reply is forced to start a call (its first characters are written for the model), a named function: the
    call's name too. parallel_tool_calls false: a reply's first call only."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", f"'parallel_tool_calls' must be a boolean, not {type(parallel).__name__}")
    if tools is not None and not isinstance(tools, list):
        raise bad("tools", "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}")
    if tools and len(tools) > MAX_TOOLS:
        raise bad("tools", f"'tools' holds {len(tools)} tools; this server takes at most {MAX_TOOLS}")
    declared, names = [], set()
    for k, tool in enumerate(tools or []):
        schema = function_schema(tool, f"tools[{k}]")
        name = schema["function"]["name"]
        if name in names:
            raise bad(f"tools[{k}].function.name", f"tools[{k}].function.name {shown(name)!r} is declared twice")
        names.add(name)
        declared.append(schema)
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        named = fn["name"]
        if named not in names:
            raise bad("tool_choice", f"tool_choice names the function {shown(named)!r}, which is not in 'tools'"
                                     + (f" (declared: {shown(sorted(names))})" if names else " (no tools declared)"))
    elif choice is not None and choice not in ("auto", "none", "required"):
        raise bad("tool_choice", f"'tool_choice' must be 'auto', 'none', 'required' or "
                                 f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, not {shown(choice)}")
    if choice == "required" and not declared:
        raise bad("tool_choice", "tool_choice 'required' needs 'tools' to call")
    if not declared or choice == "none":
        return ToolPlan(parallel=parallel is not False)
    if choice == "required" and len(declared) == 1:
        named = declared[0]["function"]["name"]
    prefix = call_prefix(named) if named or choice == "required" else ""
    return ToolPlan(declared, prefix, parallel is not False)


def completion_text(body):
    text = body.get("prompt")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise bad("prompt", "'prompt' must be a string (or a list holding one string)")
    return text


# ----------------------------------------------------------------------------------------------------------
# text -> prompt ids (CPU work for a worker thread, not the event loop)

def max_token_bytes(tokenizer):
    """The most UTF-8 bytes one token stands for: a text of n characters is at least n / this many tokens."""
    return max(len(tokenizer.decode([i]).encode("utf-8")) for i in range(len(tokenizer)))


def too_long(param, n_chars, token_bytes, max_len):
    """A text too long for the context, known without tokenizing it (so a huge one costs nothing)."""
    return bad(param, f"{param} is {n_chars} characters, at least {n_chars // token_bytes} tokens; "
                      f"the model's context is {max_len} tokens")


def chat_prompt(tokenizer, messages, max_len, max_tokens, token_bytes=None, tools=None, prefix=""):
    """The prompt ids for a conversation: one tokenizer call counts every message, a message that alone fills
    the context is refused, then the oldest turns are dropped until the prompt leaves room for the reply (the
    current turn, from the last user message on, is kept whole if the context holds it). tools:
    the declarations (their system turn is always kept); prefix: the forced start of the reply, after the
    generation header."""
    for k, message in enumerate(messages):
        text = message_text(message)
        if token_bytes and len(text) >= max_len * token_bytes:
            raise too_long(f"messages[{k}].content", len(text), token_bytes, max_len)
    tools_text = chat_turns([], tools)[0][1] if tools else ""
    if token_bytes and len(tools_text) >= max_len * token_bytes:
        raise too_long("tools", len(tools_text), token_bytes, max_len)
    encoder = ChatEncoder(tokenizer)
    lengths = encoder.message_lengths(messages)
    prefix_ids = encode_texts(tokenizer, [prefix])[0] if prefix else []
    fixed = len(encoder.header("assistant")) + len(prefix_ids)  # the reply's header and forced start
    if tools:
        fixed += len(encoder.message_ids("system", encode_texts(tokenizer, [tools_text])[0]))
        if fixed >= max_len:
            raise bad("tools", f"the tool declarations are {fixed} tokens with their chat template; the model's "
                               f"context is {max_len} tokens")
    for k, n in enumerate(lengths):
        if n + fixed >= max_len:
            raise bad(f"messages[{k}].content", f"messages[{k}] alone is {n + fixed} tokens with its chat "
                                                f"template{' and the tools' if tools else ''}; the model's context "
                                                f"is {max_len} tokens")
    # the current turn (the last user message and the calls and results after it) stays whole when it fits the
    # context, at the cost of reply room: a tool's result without the call it answers would mean nothing
    last_user = max((k for k, message in enumerate(messages) if message["role"] == "user"), default=len(messages) - 1)
    current = min(sum(lengths[last_user:]) + fixed, max_len - 1)
    budget = max(context_budget(max_len, min(max_tokens or DEFAULT_TRIM_REPLY, max_len)), lengths[-1] + fixed, current)
    header = len(encoder.header("assistant"))  # trim_history counts the header itself
    kept = trim_history(tokenizer, messages, budget - fixed + header, lengths)
    ids = encoder.prompt(kept, tools) + prefix_ids
    if len(ids) >= max_len:  # a system message merged with the tools can tokenize a little longer than apart
        raise bad("messages", f"the conversation's last turn and the tools are {len(ids)} tokens; the model's "
                              f"context is {max_len} tokens")
    return ids


def completion_prompt(tokenizer, text, max_len, token_bytes=None):
    if token_bytes and len(text) >= max_len * token_bytes:
        raise too_long("prompt", len(text), token_bytes, max_len)
    ids = encode_completion(tokenizer, text)  # a "</s>" in the text stays text
    if len(ids) >= max_len:
        raise bad("prompt", f"the prompt is {len(ids)} tokens; the model's context is {max_len} tokens")
    return ids


# ----------------------------------------------------------------------------------------------------------
# token ids -> text, with stop strings; all linear in the text

class StopStrings:
    """Finds stop strings in text fed piece by piece: a Knuth-Morris-Pratt matcher per string, so each character
    costs O(1) per string (re-searching the text per token cost O(len(stop) ** 2) per token)."""

    def __init__(self, stops):
        self.stops, self.state, self.fail = list(stops), [0] * len(stops), []
        for s in self.stops:  # fail[i]: the longest proper prefix of s[:i + 1] that is also its suffix
            fail, k = [0] * len(s), 0
            for i in range(1, len(s)):
                while k and s[i] != s[k]:
                    k = fail[k - 1]
                k += s[i] == s[k]
                fail[i] = k
            self.fail.append(fail)

    def feed(self, text):
        """-> where in `text` the earliest stop string that ends in it starts (negative: in earlier text), or None."""
        first = None
        for j, (s, fail) in enumerate(zip(self.stops, self.fail)):
            k = self.state[j]
            for i, ch in enumerate(text):
                while k and ch != s[k]:
                    k = fail[k - 1]
                k += ch == s[k]
                if k == len(s):
                    first = i + 1 - k if first is None else min(first, i + 1 - k)
                    break
            self.state[j] = k
        return first

    def partial(self):
        """Characters at the end of the text so far that could be the start of a stop string."""
        return max(self.state, default=0)


class TextStream:
    """Token ids in, text pieces out: holds back an unfinished UTF-8 character and any ending that could be the
    start of a stop string, and reports a stop string (cut, as OpenAI does).

    Decoding is incremental: only the tokens since the last complete character are decoded (with one token
    before them, as Hugging Face's TextStreamer and TGI do), never all the ids again."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, StopStrings(stops)
        self.ids, self.prefix, self.read = [], 0, 0  # ids[prefix:read] decoded last time; ids[read:] are new
        self.held = ""  # decoded, not yet sent: could be the start of a stop string

    def add(self, token):
        """-> (new text, stopped)."""
        self.ids.append(token)
        return self._send(self._decode(force=False))

    def flush(self):
        """At the end of the generation: what is left (an unfinished character as U+FFFD). -> (text, stopped)."""
        piece, stopped = self._send(self._decode(force=True))
        if stopped:
            return piece, True
        piece, self.held = piece + self.held, ""
        return piece, False

    def _decode(self, force):
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        new = decode(self.ids[self.prefix:])
        if new.endswith("\ufffd") and not force and len(self.ids) - self.read < MAX_PENDING_TOKENS:
            return ""  # the last character is not complete yet
        old = decode(self.ids[self.prefix:self.read])
        self.prefix, self.read = self.read, len(self.ids)
        return new[len(old):] if new.startswith(old) else new

    def _send(self, text):
        if not text:
            return "", False
        at = self.stops.feed(text)
        self.held += text
        if at is not None:  # the stop string starts `at` characters into this text (before it if negative)
            piece = self.held[:len(self.held) - len(text) + at]
            self.held = ""
            return piece, True
        keep = min(self.stops.partial(), len(self.held))
        piece, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return piece, False


class ToolCallReader:
    """An assistant reply's text pieces in, content to send out; its tool calls at the end.

    With tools declared, an ending that could be the start of "<tool_call>" (or of "\\n<tool_call>": the newline
    before a call is not content) is held back, as TextStream holds back a stop string's start. Once "<tool_call>"
    appears, the rest is held to the end and read with chat.parse_tool_calls: calls that parse, each naming a
    declared tool, are the reply's tool calls; anything else (not JSON, no closing tag, an undeclared name) is
    sent as content after all, so a broken call is text, never an error. Without tools, pieces pass through."""

    def __init__(self, plan=None):
        self.plan = plan or ToolPlan()
        self.text = self.plan.prefix  # the reply so far, a forced start included
        self.sent = 0                 # characters of text sent as content
        self.call_at = 0 if self.plan.prefix else None  # where the first <tool_call> starts

    def add(self, piece) -> str:
        """-> the content that can be sent now."""
        self.text += piece
        if self.plan.declared is None:
            return self._send(len(self.text))
        if self.call_at is not None:
            return ""
        at = self.text.find(CALL_OPEN, self.sent)
        if at >= 0:
            self.call_at = at
            return self._send(at - 1 if at > self.sent and self.text[at - 1] == "\n" else at)
        held = next((n for n in range(min(len(CALL_OPEN) + 1, len(self.text) - self.sent), 0, -1)
                     if ("\n" + CALL_OPEN).startswith(self.text[-n:]) or CALL_OPEN.startswith(self.text[-n:])), 0)
        return self._send(len(self.text) - held)

    def finish(self):
        """At the end of the reply -> (content not sent yet, calls or None). Calls are OpenAI's
        {"id", "type": "function", "function": {"name", "arguments": JSON string}}."""
        if self.call_at is None:
            return self._send(len(self.text)), None
        parsed = parse_tool_calls(self.text)
        if parsed.error is not None or not parsed.calls or \
                any(call["function"]["name"] not in self.plan.names for call in parsed.calls):
            return self._send(len(self.text)), None
        calls = parsed.calls if self.plan.parallel else parsed.calls[:1]
        rest = parsed.content[self.sent:]
        self.sent = len(self.text)
        return rest, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                       "function": {"name": call["function"]["name"],
                                    "arguments": to_json(call["function"]["arguments"])}} for call in calls]

    def _send(self, end):
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece


# ----------------------------------------------------------------------------------------------------------
# what goes back

def choice_object(chat, text, finish_reason, tool_calls=None, index=0):
    """One whole answer of a request's n. With tool_calls, content is the text before the calls, or null."""
    choice = {"index": index, "finish_reason": finish_reason, "logprobs": None}
    message = {"role": "assistant", "content": text or None if tool_calls else text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice.update({"message": message} if chat else {"text": text})
    return choice


def completion_object(head, chat, choices, usage):
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage}


def chunk_object(head, chat, content=None, finish_reason=None, role=False, index=0):
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": index, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
    return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}


def choice_seed(seed, i):
    """The seed of choice i of n: seed + i (seed - i at the top of the range), so a seeded request is
    reproducible and its choices differ; None stays None (each choice draws its own)."""
    if seed is None:
        return None
    return seed + i if seed + i <= SEED_RANGE[1] else seed - i


def tool_call_chunks(head, calls, index=0):
    """A reply's calls as OpenAI streams them: per call a chunk with its index, id, type, name and empty arguments,
    then one with the arguments (a client joins the pieces of each index)."""
    chunks = []
    for index, call in enumerate(calls):
        start = {"index": index, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}
        rest = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
        for delta in (start, rest):
            chunks.append({**head, "object": "chat.completion.chunk", "choices": [
                {"index": index, "delta": {"tool_calls": [delta]}, "finish_reason": None, "logprobs": None}]})
    return chunks


def usage_object(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj):
    """One server-sent event holding a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
