"""
Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page, batching concurrent requests.

Run as:
    python serve_openai_api.py                                   # newest checkpoint, http://127.0.0.1:8000/
    python serve_openai_api.py --checkpoint out/sft_multi_512 --port 8000
    python serve_openai_api.py --host 0.0.0.0 --api_key secret   # reachable from other machines: set a key
    make serve

Then open http://127.0.0.1:8000/ for the chat page, or use any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret or anything without --api_key")
    client.chat.completions.create(model="nano-llm", messages=[{"role": "user", "content": "你好"}])

The checkpoint defaults to the newest of out/grpo_* > out/dpo_* > out/sft_multi_* > out/sft_single_* >
out/pretrain_* (as in 2-eval.py, then pretraining; also one folder down, e.g. out/demo/dpo after make demo), and the
server prints which.
Any stage works; a pretrained model is for /v1/completions (plain continuation).

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET / (chat page).
  - Supported fields: model, messages | prompt, max_tokens (max_completion_tokens), temperature, top_p, stop,
    seed, stream, stream_options.include_usage, user; extra: top_k, repetition_penalty. Defaults follow OpenAI
    (temperature 1, top_p 1; max_tokens: chat until </s> or the context is full, completions 16).
  - Refused with 400, never silently ignored: n > 1, tools / functions, logprobs, logit_bias, non-zero presence /
    frequency penalties, response_format other than text, echo, suffix, best_of > 1, unknown fields.
  - model: the name GET /v1/models lists (the checkpoint directory's name) or the alias "nano-llm"; a missing
    model means this one. Any other name -> 404 model_not_found: one server serves one model, and answering
    "gpt-4o" with a 26M-parameter model would only hide a client's misconfiguration.
  - Long conversations: the oldest turns are dropped until the prompt fits (as 2-eval.py does); a single message
    longer than the context -> 400. max_tokens beyond the context is capped (finish_reason "length").
  - Text in messages is text: a "<s>" or "</s>" typed by a user never becomes a control token.
  - Errors are OpenAI's error object {"error": {"message", "type", "param", "code"}}; in a stream that has
    started, an error arrives as one SSE event holding that object, and the stream ends.

Security: --api_key (or the NANO_LLM_API_KEY environment variable) makes every API request need
`Authorization: Bearer <key>` (else 401); / (a static page) and /health (liveness) stay open. The key is compared
in constant time and never logged. The server binds 127.0.0.1 by default; binding another address without a key
prints a warning, since anyone who reaches the port can then use the model.

Batching: model/engine.py decodes up to --max_batch requests together; --max_queue more wait; beyond that -> 429
with Retry-After. See docs/serving.md for measured throughput.
"""
import argparse
import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager

ROOT = os.path.dirname(os.path.abspath(__file__))
CHAT_PAGE = os.path.join(ROOT, "web", "chat.html")
MODEL_ALIAS = "nano-llm"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_TRIM_REPLY = 256     # reply room assumed when trimming history for a request without max_tokens
COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
OPEN_PATHS = ("/", "/health")

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
    """An error answered as OpenAI's error object."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------------------------------------
# request validation: every problem names its field

def bad(param, message):
    return APIError(400, message, param=param, code="invalid_value")


def number(body, name, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, not {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"between {low} and {high}"
        raise bad(name, f"'{name}' must be {span}, not {value}")
    return value


def check_fields(body, allowed):
    for name, value in body.items():
        if name in UNSUPPORTED:
            if value is not None and value not in UNSUPPORTED[name]:
                raise bad(name, f"'{name}' = {json.dumps(value)[:60]} is not supported by this server")
        elif name not in allowed:
            raise bad(name, f"Unrecognized request argument supplied: {name}")


def sampling_params(body, model_names, max_tokens_default, max_tokens_field="max_tokens"):
    """The fields /v1/chat/completions and /v1/completions share -> dict."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"'model' must be a string, not {type(model).__name__}")
    if model is not None and model not in model_names:
        raise APIError(404, f"The model '{model}' does not exist: this server serves '{model_names[0]}' "
                            f"(alias '{MODEL_ALIAS}'), see GET /v1/models", param="model", code="model_not_found")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4
                                 and all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", "'stop' must be a non-empty string or a list of at most 4 non-empty strings")
    for name in ("stream",):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad(name, f"'{name}' must be a boolean, not {type(body[name]).__name__}")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not body.get("stream"):
            raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
            raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    max_tokens = number(body, max_tokens_field, None, 1, None, integer=True)
    if max_tokens_field != "max_tokens":  # chat: either name (max_tokens is the older one)
        max_tokens = max_tokens or number(body, "max_tokens", None, 1, None, integer=True)
    return dict(
        max_tokens=max_tokens or max_tokens_default,
        temperature=number(body, "temperature", 1.0, 0, 2),
        top_p=number(body, "top_p", 1.0, 0, 1),
        top_k=number(body, "top_k", 0, 0, None, integer=True) or None,
        repetition_penalty=number(body, "repetition_penalty", 1.0, 1e-6, None),
        seed=number(body, "seed", None, None, None, integer=True),
        stop=stop or [],
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
    clean = []
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, dict):
            raise bad(where, f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of system, developer, user, assistant, "
                                       f"not {json.dumps(role)} (tool messages are not supported)")
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


async def read_json(request):
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# ----------------------------------------------------------------------------------------------------------
# token stream -> text, with stop strings

class TextStream:
    """Token ids in, text pieces out: holds back an unfinished UTF-8 character and any ending that could be the
    start of a stop string, and reports a stop string (cut, as OpenAI does)."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops, self.ids, self.text, self.sent = tokenizer, stops, [], "", 0

    def add(self, token):
        """-> (new text, stopped)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            return self._take(min(found)), True
        hold = max([n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
        return self._take(len(text) - hold), False

    def flush(self):
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(len(self.text))

    def _take(self, upto):
        piece = self.text[self.sent:max(upto, self.sent)]
        self.sent = max(upto, self.sent)
        return piece


# ----------------------------------------------------------------------------------------------------------
# the app

def create_app(model, tokenizer, checkpoint, engine, api_key=None):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from model.engine import EngineFull, Request

    model_id = os.path.basename(os.path.normpath(checkpoint))
    names = [model_id, MODEL_ALIAS]
    max_len = model.config.max_seq_len
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nano-LLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if api_key and request.url.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, err):
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, err):  # unknown path (404), wrong method (405)
        return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None,
                        headers=getattr(err, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request, err):
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()

    def start(prompt, params):
        """Submit to the engine; -> (request, queue of ("token", id) / ("done", reason, error) events)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda *event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731  (engine thread)
        request = Request(prompt, params["max_tokens"] or max_len, temperature=params["temperature"],
                          top_k=params["top_k"], top_p=params["top_p"],
                          repetition_penalty=params["repetition_penalty"], seed=params["seed"],
                          on_token=lambda token: put("token", token), on_done=lambda reason, err: put("done", reason, err))
        try:
            engine.submit(request)
        except EngineFull as err:
            raise APIError(429, f"the server is busy ({err}); retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return request, queue

    async def pieces(request, queue, stops, result):
        """Text pieces of one generation; result gets finish_reason and completion_tokens. Leaving early (client
        gone, stop string) cancels the request, which frees its slot at the engine's next step."""
        text, n_tokens = TextStream(tokenizer, stops), 0
        try:
            while True:
                event = await queue.get()
                if event[0] == "token":
                    n_tokens += 1
                    piece, stopped = text.add(event[1])
                    if piece:
                        yield piece
                    if stopped:
                        result.update(finish_reason="stop", completion_tokens=n_tokens)
                        return
                    continue
                reason, err = event[1], event[2]
                if reason not in ("stop", "length"):
                    raise APIError(500, f"generation {reason}: {err}", type="server_error")
                piece = text.flush()
                if piece:
                    yield piece
                result.update(finish_reason=reason, completion_tokens=n_tokens)
                return
        finally:
            request.cancel()

    def usage(prompt, result):
        return {"prompt_tokens": len(prompt), "completion_tokens": result["completion_tokens"],
                "total_tokens": len(prompt) + result["completion_tokens"]}

    async def respond(prompt, params, chat):
        request, queue = start(prompt, params)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": ident, "created": int(time.time()), "model": model_id}
        result = {}
        if not params["stream"]:
            answer = "".join([piece async for piece in pieces(request, queue, params["stop"], result)])
            choice = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": answer}} if chat else {"text": answer})
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice], "usage": usage(prompt, result)})

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(content=None, finish_reason=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": finish_reason, "logprobs": None}
            return sse({**head, "object": kind, "choices": [choice]})

        async def events():
            try:
                if chat:
                    yield chunk(role=True)
                async for piece in pieces(request, queue, params["stop"], result):
                    yield chunk(piece)
                yield chunk(finish_reason=result["finish_reason"])
                if params["include_usage"]:
                    yield sse({**head, "object": kind, "choices": [], "usage": usage(prompt, result)})
                yield "data: [DONE]\n\n"
            except APIError as err:  # the status line is sent already: the error goes in the stream
                yield sse(err.body())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.load()}

    @app.get("/")
    async def chat_page():
        with open(CHAT_PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    def model_card(name):
        return {"id": name, "object": "model", "created": created, "owned_by": "nano-llm",
                "context_length": max_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(model_id)]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name not in names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        from model.chat import context_budget, encode_chat, trim_history
        body = await read_json(http)
        check_fields(body, CHAT_FIELDS)
        params = sampling_params(body, names, None, "max_completion_tokens")
        messages = chat_messages(body)
        for k, message in enumerate(messages):
            n = len(encode_chat(tokenizer, [message]))
            if n >= max_len:
                raise bad(f"messages[{k}].content", f"messages[{k}] alone is {n} tokens with its chat template; "
                                                    f"the model's context is {max_len} tokens")
        last = len(encode_chat(tokenizer, messages[-1:]))
        budget = max(context_budget(max_len, min(params["max_tokens"] or DEFAULT_TRIM_REPLY, max_len)), last)
        prompt = encode_chat(tokenizer, trim_history(tokenizer, messages, budget))
        return await respond(prompt, params, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_json(http)
        check_fields(body, COMPLETION_FIELDS)
        params = sampling_params(body, names, COMPLETION_MAX_TOKENS)
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str):
            raise bad("prompt", "'prompt' must be a string (or a list holding one string)")
        from model.chat import encode_completion
        prompt = encode_completion(tokenizer, text)  # a "</s>" in the text stays text
        if len(prompt) >= max_len:
            raise bad("prompt", f"the prompt is {len(prompt)} tokens; the model's context is {max_len} tokens")
        return await respond(prompt, params, chat=False)

    return app


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--checkpoint", default=None, help="checkpoint directory (default: the newest, see above)")
    a("--tokenizer_dir", default=None, help="tokenizer directory (default: the checkpoint's copy, else model/tokenizer)")
    a("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    a("--port", type=int, default=8000, help="port (default: 8000)")
    a("--api_key", default=None, help="require 'Authorization: Bearer KEY' (default: $NANO_LLM_API_KEY, else none)")
    a("--max_batch", type=int, default=16, help="requests decoded together (KV cache slots) (default: 16)")
    a("--max_queue", type=int, default=64, help="requests waiting for a slot before 429 (default: 64)")
    a("--device", default="auto", help="auto (cuda > mps > cpu), or e.g. cuda:0, cpu")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="weights precision; auto = bfloat16 on CUDA (float16 without bf16), float32 elsewhere")
    a("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
      help="uvicorn's log level (info logs one line per request, never the key)")
    args = parser.parse_args()
    if args.max_batch < 1 or args.max_queue < 0:
        raise SystemExit("--max_batch must be >= 1 and --max_queue >= 0")

    import uvicorn

    from model import evaluate, stages
    from model.engine import Engine

    api_key = args.api_key or os.environ.get("NANO_LLM_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"WARNING: binding {args.host} without --api_key: anyone who can reach port {args.port} can use "
              f"the model. Set --api_key or NANO_LLM_API_KEY.", file=sys.stderr)
    model, tokenizer, checkpoint = evaluate.load_checkpoint(
        args.checkpoint, stages.CHAT_STAGES + stages.PRETRAIN_STAGES, args.device, args.dtype, args.tokenizer_dir)
    engine = Engine(model, tokenizer.eos_token_id, max_batch=args.max_batch, max_queue=args.max_queue)
    app = create_app(model, tokenizer, checkpoint, engine, api_key)
    n_params = sum(p.numel() for p in model.parameters())
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print(f"checkpoint {checkpoint}: {n_params / 1e6:.2f}M parameters, context {model.config.max_seq_len} tokens\n"
          f"chat page: http://{shown}:{args.port}/   API: http://{shown}:{args.port}/v1"
          + ("   (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    from model.evaluate import run_cli  # StageError (no checkpoint, ...) -> one line, exit 1
    run_cli(main)
