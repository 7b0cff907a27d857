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

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET / (chat page); for
the chat page's tools: GET /v1/tools (the tools this server runs, model/tools.py), POST /v1/tools/run.
  - Supported fields: model, messages | prompt, n (up to 16 choices; their prompt is prefilled once; with a seed,
    choice i uses seed + i), max_tokens (max_completion_tokens), temperature, top_p, stop, seed, stream,
    stream_options.include_usage, user; chat: tools, tool_choice, parallel_tool_calls; extra: top_k,
    repetition_penalty. Defaults follow OpenAI (temperature 1, top_p 1; max_tokens: chat until </s> or the context
    is full, completions 16). top_p 0 and temperatures below 1e-5 decode greedily.
  - Tool calling (docs/tools.md): tools are rendered in the chat format the model was trained with; messages may
    hold assistant tool_calls and role "tool" results (tool_call_id). A reply whose <tool_call> blocks parse and
    name declared tools -> message.tool_calls, finish_reason "tool_calls" (streamed: delta.tool_calls chunks);
    a call that does not parse is returned as content. tool_choice "none" leaves the tools out of the prompt;
    "required" and a named function write the start of the call for the model; parallel_tool_calls false keeps
    the first call.
  - Refused with 400, never silently ignored: functions / function_call (use tools), logprobs, logit_bias,
    non-zero presence / frequency penalties, response_format other than text, echo, suffix, best_of > 1, unknown
    fields; numbers that are NaN, infinite or out of range; more than 2048 messages; more than 4 stop strings or
    one over 1000 characters; malformed tools, tool_choice or tool messages (the error names the field).
  - model: the name GET /v1/models lists (the checkpoint directory's name) or the alias "nano-llm"; a missing
    model means this one. Any other name -> 404 model_not_found: one server serves one model, and answering
    "gpt-4o" with a 26M-parameter model would only hide a client's misconfiguration.
  - Long conversations: the oldest turns are dropped until the prompt fits (as 2-eval.py does); a single message
    longer than the context -> 400. max_tokens beyond the context is capped (finish_reason "length").
  - Text in messages is text: a "<s>" or "</s>" typed by a user never becomes a control token.
  - Errors are OpenAI's error object {"error": {"message", "type", "param", "code"}}; in a stream that has
    started, an error arrives as one SSE event holding that object, and the stream ends. A failure inside the
    server answers 500 with a request id; the detail is in the server's log under that id.
  - A client that hangs up (streaming or not) cancels its generation at the engine's next step.

Security: --api_key (or the NANO_LLM_API_KEY environment variable) makes every API request need
`Authorization: Bearer <key>` (else 401); / (a static page) and /health (liveness) stay open. The key is compared
in constant time and never logged. The server binds 127.0.0.1 by default; binding another address without a key
prints a warning, since anyone who reaches the port can then use the model. Against web pages in the user's
browser: POSTs must be `Content-Type: application/json` (else 415: a page cannot send that cross-site without the
server's consent), and the Host header must be an IP address, localhost or a name in --allowed_hosts (else 403:
a page that points its own domain at 127.0.0.1 arrives under its own name). Bodies over --max_body bytes -> 413,
before they are read.

Batching: model/engine.py decodes up to --max_batch requests together; --max_queue more wait; beyond that -> 429
with Retry-After. The protocol's rules live in model/openai_protocol.py. See docs/serving.md for measured
throughput and the abuse soak test.
"""
import argparse
import asyncio
import gc
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from model import fast_decode
from model.openai_protocol import (CHAT_FIELDS, COMPLETION_FIELDS, COMPLETION_MAX_TOKENS, DEFAULT_MAX_BODY,
                                   MODEL_ALIAS, APIError, bad, body_too_large, chat_messages, chat_prompt,
                                   check_content_type, check_fields, check_key, choice_object, choice_seed,
                                   chunk_object, completion_object, completion_prompt, completion_text, host_allowed,
                                   host_refused, json_object_text, max_token_bytes, parse_body, sampling_params, server_error, shown, sse,
                                   tool_call_chunks, tool_plan, usage_object, TextStream, ToolCallReader)

ROOT = os.path.dirname(os.path.abspath(__file__))
CHAT_PAGE = os.path.join(ROOT, "web", "chat.html")
OPEN_PATHS = ("/", "/health")
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: the same format and --log_level


class ServerState:
    """What the handlers share: the served model's names and context, its tokenizer and engine, the limits."""

    def __init__(self, model_config, tokenizer, checkpoint, engine, api_key=None, max_body=DEFAULT_MAX_BODY,
                 allowed_hosts=()):
        self.model_id = os.path.basename(os.path.normpath(checkpoint))
        self.names = [self.model_id, MODEL_ALIAS]
        self.max_len, self.tokenizer, self.engine = model_config.max_seq_len, tokenizer, engine
        self.api_key, self.max_body, self.allowed_hosts = api_key, max_body, tuple(allowed_hosts)
        self.token_bytes = max_token_bytes(tokenizer)  # lets a text far too long be refused without tokenizing
        self.created = int(time.time())


def error_response(err):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def report(err, what):
    """Log an internal failure in full under a new request id; -> the generic error the client gets."""
    request_id = "req_" + uuid.uuid4().hex[:24]
    log.error("%s %s: %s: %s", request_id, what, type(err).__name__, err, exc_info=err)
    return server_error(request_id)


class Guard:
    """Every HTTP request passes here first: the Host header (DNS rebinding), then the API key."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            try:
                if not host_allowed(headers.get("host"), self.state.allowed_hosts):
                    raise host_refused(headers.get("host"))
                if self.state.api_key and scope["path"] not in OPEN_PATHS:
                    check_key(headers.get("authorization"), self.state.api_key)
            except APIError as err:
                return await error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------
# reading a request, running a generation

async def read_json(state, http):
    """The body as a JSON object: application/json only, refused past max_body bytes before reading further."""
    check_content_type(http.headers.get("content-type"))
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > state.max_body:
        raise body_too_large(state.max_body)
    chunks, size = [], 0
    try:
        async for chunk in http.stream():
            size += len(chunk)
            if size > state.max_body:
                raise body_too_large(state.max_body)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client went away before sending the whole body") from None
    return parse_body(b"".join(chunks))


def submit(state, prompt, params):
    """Hand a prompt to the engine; -> (request, queue of ("token", id) / ("done", reason, error) events)."""
    from model.engine import GenerationRequest, QueueFullError
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    put = lambda *event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731  (engine thread)
    request = GenerationRequest(prompt, params["max_tokens"] or state.max_len, temperature=params["temperature"],
                      top_k=params["top_k"], top_p=params["top_p"], repetition_penalty=params["repetition_penalty"],
                      seed=params["seed"], on_token=lambda token: put("token", token),
                      on_done=lambda reason, err: put("done", reason, err))
    try:
        state.engine.submit(request)
    except QueueFullError as err:
        raise APIError(429, f"the server is busy ({err}); retry shortly", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    return request, queue


async def text_pieces(state, request, queue, stops, result):
    """Text pieces of one generation; result gets finish_reason and completion_tokens. Leaving early (client
    gone, stop string) cancels the request, which frees its slot at the engine's next step."""
    text, n_tokens = TextStream(state.tokenizer, stops), 0
    try:
        while True:
            event = await queue.get()
            if event[0] == "token":
                n_tokens += 1
                piece, stopped = text.add(event[1])
            else:
                reason, err = event[1], event[2]
                if reason == "error":
                    raise report(err, "generation failed")
                if reason == "cancelled":  # not by us (we stop reading first): the engine is stopping
                    raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
                piece, stopped = text.flush()
            if piece:
                yield piece
            if stopped or event[0] == "done":
                result.update(finish_reason="stop" if stopped else reason, completion_tokens=n_tokens)
                return
    finally:
        request.cancel()


async def unless_client_leaves(http, work):
    """-> work's result, or None if the client hangs up first (work is then cancelled)."""
    async def client_gone():
        while (await http.receive())["type"] != "http.disconnect":
            pass
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


async def respond(state, http, prompt, params, chat, plan=None):
    """Generate and answer, whole or streamed, n choices (each its own engine request; the engine prefills their
    shared prompt once). plan (chat only): the request's tools (ToolPlan); each reply's text goes through a
    ToolCallReader, which turns calls into tool_calls and passes everything else as content."""
    n, stops = params["n"], params["stop"]
    submitted = []
    try:
        for i in range(n):
            submitted.append(submit(state, prompt, {**params, "seed": choice_seed(params["seed"], i)}))
    except APIError:  # the queue filled up part way: none of this request's choices stays
        for request, _ in submitted:
            request.cancel()
        raise
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": state.model_id}
    results, readers = [{} for _ in range(n)], [ToolCallReader(plan) for _ in range(n)]
    usage = lambda: usage_object(len(prompt), sum(r["completion_tokens"] for r in results))  # noqa: E731

    def cancel_all():
        for request, _ in submitted:
            request.cancel()

    if not params["stream"]:
        async def join(i):
            request, queue = submitted[i]
            text = "".join([readers[i].add(piece)
                            async for piece in text_pieces(state, request, queue, stops, results[i])])
            rest, calls = readers[i].finish()
            return choice_object(chat, text + rest, "tool_calls" if calls else results[i]["finish_reason"], calls, i)
        async def join_all():  # a task awaiting the gather, so a hang-up's cancel is consumed, not logged
            return await asyncio.gather(*(join(i) for i in range(n)))
        choices = await unless_client_leaves(http, join_all())
        if choices is None:  # nobody to answer: the generations stop at the engine's next step
            cancel_all()
            return Response(status_code=499)
        return JSONResponse(completion_object(head, chat, choices, usage()))

    async def choice_events(i, out):
        """Choice i's chunks into out, then (i, None), or (i, error) if it failed."""
        request, queue = submitted[i]
        try:
            if chat:
                await out.put(sse(chunk_object(head, chat, role=True, index=i)))
            async for piece in text_pieces(state, request, queue, stops, results[i]):
                content = readers[i].add(piece)
                if content:
                    await out.put(sse(chunk_object(head, chat, content, index=i)))
            rest, calls = readers[i].finish()
            if rest:
                await out.put(sse(chunk_object(head, chat, rest, index=i)))
            for chunk in tool_call_chunks(head, calls or [], index=i):
                await out.put(sse(chunk))
            finish_reason = "tool_calls" if calls else results[i]["finish_reason"]
            await out.put(sse(chunk_object(head, chat, finish_reason=finish_reason, index=i)))
            await out.put((i, None))
        except Exception as err:
            await out.put((i, err))

    async def events():
        out = asyncio.Queue()
        tasks = [asyncio.ensure_future(choice_events(i, out)) for i in range(n)]
        try:
            ended = 0
            while ended < n:  # the choices' chunks as they come, interleaved (each carries its index)
                item = await out.get()
                if isinstance(item, str):
                    yield item
                    continue
                if item[1] is not None:
                    raise item[1]
                ended += 1
            if params["include_usage"]:
                yield sse({**head, "object": chunk_object(head, chat)["object"], "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        except APIError as err:  # the status line is sent already: the error goes in the stream
            yield sse(err.body())
        except Exception as err:
            yield sse(report(err, "stream failed").body())
        finally:  # the client left, or a choice failed: the others stop too
            for task in tasks:
                task.cancel()
            cancel_all()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------------------------------------
# the handlers: (state, request) -> response

async def health(state, http):
    return {"status": "ok", "model": state.model_id, **state.engine.load()}


async def chat_page(state, http):
    with open(CHAT_PAGE, encoding="utf-8") as f:
        return HTMLResponse(f.read())


def model_card(state):
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "nano-llm",
            "context_length": state.max_len}


async def list_models(state, http):
    return {"object": "list", "data": [model_card(state)]}


async def get_model(state, http):
    if http.path_params["name"] not in state.names:
        raise APIError(404, f"The model '{shown(http.path_params['name'])}' does not exist", param="model",
                       code="model_not_found")
    return model_card(state)


async def chat_completions(state, http):
    body = await read_json(state, http)
    check_fields(body, CHAT_FIELDS)
    params = sampling_params(body, state.names, None, "max_completion_tokens")
    plan = tool_plan(body)
    messages = chat_messages(body)
    # tokenizing a long history in a worker thread: it must not stall other clients
    prompt = await asyncio.to_thread(chat_prompt, state.tokenizer, messages, state.max_len, params["max_tokens"],
                                     state.token_bytes, plan.declared, plan.prefix)
    return await respond(state, http, prompt, params, chat=True, plan=plan)


async def completions(state, http):
    body = await read_json(state, http)
    check_fields(body, COMPLETION_FIELDS)
    params = sampling_params(body, state.names, COMPLETION_MAX_TOKENS)
    prompt = await asyncio.to_thread(completion_prompt, state.tokenizer, completion_text(body), state.max_len,
                                     state.token_bytes)
    return await respond(state, http, prompt, params, chat=False)


async def list_tools(state, http):
    """The tools this server can run (model/tools.py's registry), as a request's 'tools' declares them."""
    from model.tools import tool_schemas
    return {"object": "list", "data": tool_schemas()}


async def run_tool(state, http):
    """Run one call of a registry tool for the chat page: {"name", "arguments"} -> {"name", "content", "error"}.
    Only the registry's tools run (the calculator parses arithmetic itself and bounds its size); a call they
    refuse is answered with "error: <why>" as its content, as the tool loop answers the model."""
    from model.tools import TOOLS, run_call, tool_schemas
    body = await read_json(state, http)
    name = body.get("name")
    if not isinstance(name, str) or name not in TOOLS:
        raise bad("name", f"'name' must name a tool this server runs ({', '.join(TOOLS)}), not {shown(name)}")
    arguments = json_object_text(body.get("arguments"), "arguments")
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    result = await asyncio.to_thread(run_call, call, tool_schemas([name]))
    return {"name": name, "content": result.content, "error": result.error}


ROUTES = [
    ("GET", "/health", health),
    ("GET", "/", chat_page),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{name}", get_model),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/completions", completions),
    ("GET", "/v1/tools", list_tools),
    ("POST", "/v1/tools/run", run_tool),
]


async def on_api_error(http, err):
    return error_response(err)


async def on_http_error(http, err):  # unknown path (404), wrong method (405)
    return error_response(APIError(err.status_code, str(err.detail), headers=getattr(err, "headers", None),
                                   code="not_found" if err.status_code == 404 else None))


async def on_server_error(http, err):  # a bug: the client gets an id, the log gets the detail
    return error_response(report(err, f"{http.method} {http.url.path} failed"))


def with_state(handler, state):
    async def endpoint(http: Request):
        return await handler(state, http)
    return endpoint


def create_app(state):
    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        # Everything loaded so far (torch, transformers, the model, the tokenizer) lives as long as the server: out
        # of the collector's sight, a full collection no longer walks it (that walk stalled every client ~0.5 s)
        gc.collect()
        gc.freeze()
        yield
        state.engine.stop()

    app = FastAPI(title="nano-LLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, state=state)
    for method, path, handler in ROUTES:
        app.add_api_route(path, with_state(handler, state), methods=[method], name=handler.__name__)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_server_error)
    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--checkpoint", default=None, help="checkpoint directory (default: the newest, see above)")
    a("--tokenizer_dir", default=None, help="tokenizer directory (default: the checkpoint's copy, else model/tokenizer)")
    a("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    a("--port", type=int, default=8000, help="port (default: 8000)")
    a("--api_key", default=None, help="require 'Authorization: Bearer KEY' (default: $NANO_LLM_API_KEY, else none)")
    a("--allowed_hosts", default="", help="comma-separated host names the server answers to besides IP addresses "
                                          "and localhost, e.g. myserver.lan,.example.com (a leading dot: the domain "
                                          "and its subdomains); '*' = any")
    a("--max_body", type=int, default=DEFAULT_MAX_BODY,
      help=f"largest request body in bytes; larger -> 413 (default: {DEFAULT_MAX_BODY})")
    a("--max_batch", type=int, default=16, help="requests decoded together (KV cache slots) (default: 16)")
    a("--max_queue", type=int, default=64, help="requests waiting for a slot before 429 (default: 64)")
    a("--device", default="auto", help="auto (cuda > mps > cpu), or e.g. cuda:0, cpu")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="weights precision; auto = bfloat16 on CUDA (float16 without bf16), float32 elsewhere")
    fast_decode.add_arg(parser, server=True)
    a("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
      help="uvicorn's log level (info logs one line per request, never the key)")
    args = parser.parse_args()
    if args.max_batch < 1 or args.max_queue < 0 or args.max_body < 1:
        raise SystemExit("--max_batch and --max_body must be >= 1 and --max_queue >= 0")

    import uvicorn

    from model import evaluate, stages
    from model.engine import Engine

    fast_decode.set_mode(args.fast_decode)

    api_key = args.api_key or os.environ.get("NANO_LLM_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"WARNING: binding {args.host} without --api_key: anyone who can reach port {args.port} can use "
              f"the model. Set --api_key or NANO_LLM_API_KEY.", file=sys.stderr)
    model, tokenizer, checkpoint = evaluate.load_checkpoint(
        args.checkpoint, stages.CHAT_STAGES + stages.PRETRAIN_STAGES, args.device, args.dtype, args.tokenizer_dir)
    engine = Engine(model, tokenizer.eos_token_id, max_batch=args.max_batch, max_queue=args.max_queue)
    allowed_hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] + [args.host]
    state = ServerState(model.config, tokenizer, checkpoint, engine, api_key, args.max_body, allowed_hosts)
    n_params = sum(p.numel() for p in model.parameters())
    address = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print(f"checkpoint {checkpoint}: {n_params / 1e6:.2f}M parameters, context {model.config.max_seq_len} tokens\n"
          f"chat page: http://{address}:{args.port}/   API: http://{address}:{args.port}/v1"
          + ("   (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    from model.evaluate import run_cli  # StageError (no checkpoint, ...) -> one line, exit 1
    run_cli(main)
