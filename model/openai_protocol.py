"""
The OpenAI protocol as serve_openai_api.py speaks it: what a request may hold, the error object, the objects
sent back, and the text of a stream with its stop strings. No HTTP here (the server owns sockets and the engine),
so each rule is a plain function with its own test (tests/test_openai_protocol.py).

    params = sampling_params(body, ["sft_multi_512", "nano-llm"], None, "max_completion_tokens")
    ids = chat_prompt(tokenizer, chat_messages(body), max_len=512, max_tokens=params["max_tokens"])
    text = TextStream(tokenizer, params["stop"])
    piece, stopped = text.add(token_id)   # per generated token; text.flush() at the end

Limits (each refused with a 400 naming the field and the limit): MAX_MESSAGES messages, MAX_STOPS stop strings
of at most MAX_STOP_CHARS characters, numbers finite and in OpenAI's ranges. The body's size, its Content-Type and
the Host header are checked by the server before a body is read (check_content_type, host_allowed).
"""
import hmac
import ipaddress
import json
import math
import re

from .chat import ChatEncoder, context_budget, encode_completion, trim_history
from .generate import GREEDY_BELOW, check_sampling

MODEL_ALIAS = "nano-llm"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_TRIM_REPLY = 256     # reply room assumed when trimming history for a request without max_tokens
COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
DEFAULT_MAX_BODY = 1 << 20   # bytes; --max_body
MAX_MESSAGES = 2048          # OpenAI's own limit on 'messages'
MAX_STOPS, MAX_STOP_CHARS = 4, 1000
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
PENALTY_RANGE = (1e-3, 1e3)  # keeps penalised float32 logits finite at any temperature
MAX_PENDING_TOKENS = 8       # a UTF-8 character is at most 4 tokens: more undecodable ones are broken bytes

# Fields OpenAI defines that this server cannot honour: refused unless they hold their no-op value.
UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",), "parallel_tool_calls": (), "logprobs": (False, 0), "top_logprobs": (0,),
    "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "response_format": ({"type": "text"},), "echo": (False,), "suffix": ("",), "audio": (), "modalities": (["text"],),
}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed",
                 "stream", "stream_options", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
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
                raise bad(name, f"'{name}' = {shown(value)} is not supported by this server")
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
        stop=stop_strings(body),
        stream=bool(body.get("stream")),
        include_usage=bool((stream_options or {}).get("include_usage")),
    )


def chat_messages(body):
    """Validated messages, content as plain text (text parts joined); roles system/developer/user/assistant."""
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "'messages' is required: a non-empty list of {role, content}")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content}")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"'messages' holds {len(messages)} messages; this server takes at most {MAX_MESSAGES} "
                              f"(the oldest turns are dropped anyway when the conversation outgrows the context)")
    clean = []
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, dict):
            raise bad(where, f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of system, developer, user, assistant, "
                                       f"not {shown(role)} (tool messages are not supported)")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string (or a list of text parts)")
        clean.append({"role": ROLES[role], "content": content})
    if clean[-1]["role"] != "user":
        raise bad("messages", f"the last message must be the user's, not the {clean[-1]['role']}'s: "
                              f"the model answers the user")
    return clean


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


def chat_prompt(tokenizer, messages, max_len, max_tokens, token_bytes=None):
    """The prompt ids for a conversation: one tokenizer call counts every message, a message that alone fills
    the context is refused, then the oldest turns are dropped until the prompt leaves room for the reply."""
    for k, message in enumerate(messages):
        if token_bytes and len(message["content"]) >= max_len * token_bytes:
            raise too_long(f"messages[{k}].content", len(message["content"]), token_bytes, max_len)
    encoder = ChatEncoder(tokenizer)
    lengths = encoder.message_lengths(messages)
    reply_header = len(encoder.header("assistant"))
    for k, n in enumerate(lengths):
        if n + reply_header >= max_len:
            raise bad(f"messages[{k}].content", f"messages[{k}] alone is {n + reply_header} tokens with its chat "
                                                f"template; the model's context is {max_len} tokens")
    budget = max(context_budget(max_len, min(max_tokens or DEFAULT_TRIM_REPLY, max_len)), lengths[-1] + reply_header)
    return encoder.prompt(trim_history(tokenizer, messages, budget, lengths))


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


# ----------------------------------------------------------------------------------------------------------
# what goes back

def completion_object(head, chat, text, finish_reason, usage):
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage}


def chunk_object(head, chat, content=None, finish_reason=None, role=False):
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
    return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}


def usage_object(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj):
    """One server-sent event holding a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
