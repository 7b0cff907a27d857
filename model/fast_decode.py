"""
Fast decoding on CPU: the decode step (one new token per row, after the prompt) as one compiled graph over a
static KV cache. model/generate.py's generate_stream uses it by itself, so every caller (2-eval.py, the server's
engine, RL rollouts) gets it; the eager model stays the reference, and the prompt is always prefilled by it.

    from model import fast_decode
    fast_decode.set_mode("on")           # compile at the first generation ("auto" / "off", below)
    fast_decode.warm_up(model)           # or compile now (a server, before its first request)

Why it is faster (measured in docs/performance.md):
- One row's matrix-vector product is written as (W * x).sum(-1): inductor emits one vectorised reduction that
  reads W once, close to memory speed, where nn.Linear's one-row MKL kernel reads it at about half that (batches
  of rows use F.linear: a GEMM reads W once for all of them).
- The whole step (every layer, sampling excluded) is one graph: no per-op dispatch, no mask or RoPE tables
  built per token. The cache is preallocated and written in place; the position is a tensor and the number of
  cache columns attended to is the graph's one dynamic size, so the step compiles once per (batch size, cache
  size, thread count), not once per position.
- The graph reads the model's own parameters (no fused copies, no frozen constants): a training step or
  load_state_dict between two generations is used at once, and no memory is spent on a second set of weights.

When it compiles (set_mode, or NANOLLM_FAST_DECODE=auto|on|off in the environment):
    auto  (default) generations decode eagerly, exactly as without this module, until one starts whose
          max_new_tokens, added to the decode steps this model already ran eagerly, reach COMPILE_AFTER_TOKENS
          (2000); that generation compiles the step for its batch size (tens of seconds the first time on a
          machine, a few once inductor's on-disk cache holds it; a line on stderr says so) and every later one
          uses it. A short run never compiles, so it is never slower; a long one (a chat session, many prompts,
          RL rollouts) earns the compile back. The compile comes before a generation's first token, never in the
          middle of it. The server's engine counts its steps too and compiles between two of them (the server's
          default is off, and on there compiles before it listens).
    on    compile at the first generation (the engine: when it is made).
    off   never: the eager model only.
Only a plain float32 Transformer on the CPU, not training, without padding in its batch takes the fast path;
anything else (a GPU, bf16, a peft model, left-padded batches) decodes eagerly, as before. If compiling fails
(say, no C++ compiler), one warning is printed and this process decodes eagerly from then on.
"""
import os
import sys
import threading
import time
import types
import weakref

import torch
import torch.nn.functional as F

MODES = ("auto", "on", "off")
COMPILE_AFTER_TOKENS = 2000  # auto: eager steps (tokens at batch 1) so far + the ones asked for
_mode = os.environ.get("NANOLLM_FAST_DECODE", "auto")
if _mode not in MODES:
    raise ValueError(f"NANOLLM_FAST_DECODE must be one of {', '.join(MODES)}, not {_mode!r}")
_broken = None  # the error that made compiling fail: eager from then on


def set_mode(mode: str):
    """auto | on | off (see the module docstring); applies to every model in this process."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"fast decode mode must be one of {', '.join(MODES)}, not {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


def add_arg(parser, server: bool = False):
    """The scripts' --fast_decode flag (2-eval.py, 0-eval_pretrain.py, serve_openai_api.py); apply it with
    set_mode(args.fast_decode). The server's default is off: under auto its engine would stop every stream for the
    compile (tens of seconds) at a moment no client chose; a long-running server asks for on, which compiles before
    it listens."""
    if server:
        default = os.environ.get("NANOLLM_FAST_DECODE", "off")
        when = ("off (default): the eager model only; on: compile the engine's steps at startup, before serving "
                "(recommended for a server that runs for long); auto: compile between two decode steps once the "
                f"engine has run {COMPILE_AFTER_TOKENS} eager ones (every stream pauses then, once)")
    else:
        default = _mode
        when = (f"auto (default): compile it before an answer only once this run has decoded about "
                f"{COMPILE_AFTER_TOKENS} tokens one prompt at a time, counting the answer's max_new_tokens, so a short "
                "run never compiles; on: compile before the first answer; off: the eager model only")
    parser.add_argument("--fast_decode", choices=MODES, default=default,
                        help="decode with a compiled decode step (model/fast_decode.py; a float32 model on the CPU; "
                             f"docs/performance.md has its speed). {when}. Compiling takes tens of seconds the first "
                             "time on a machine, seconds once cached")


# ----------------------------------------------------------------------------------------------------------
# the step

class StaticCache:
    """Keys/values as one (B, kv_heads, capacity, head_dim) tensor per layer: separate tensors, so the compiled step
    writes each in place (views of one buffer would be aliased graph inputs, which the compiler copies). Also
    implements the two methods the model's attention calls, so the eager model prefills straight into it."""

    def __init__(self, config, batch_size: int, capacity: int, device="cpu", dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.n_layers, self.capacity, self.length = config.n_layers, capacity, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, k, v, layer_idx: int):
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        if layer_idx == self.n_layers - 1:
            self.length = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def step_weights(model, capacity: int):
    """The tensors decode_step reads, as nested tuples: the model's own parameters (no copies) and RoPE tables for
    positions 0..capacity-1, made by the function the model uses, so they are the eager path's values exactly."""
    from .model import rope_cos_sin
    c = model.config
    cos, sin = rope_cos_sin(torch.arange(capacity, device=model.device)[None], c.head_dim, c.rope_theta,
                            model.tok_embeddings.weight.dtype)

    def ffn(f):
        return f.w1.weight, f.w3.weight, f.w2.weight

    layers = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        if c.use_moe:
            mlp = (f.gate.weight, tuple(ffn(e) for e in f.experts), tuple(ffn(e) for e in f.shared_experts))
        else:
            mlp = ffn(f)
        layers.append((layer.attention_norm.weight, a.wq.weight, a.wk.weight, a.wv.weight, a.wo.weight,
                       layer.ffn_norm.weight, mlp))
    return model.tok_embeddings.weight, model.norm.weight, model.output.weight, cos[0], sin[0], tuple(layers)


def _matvec(x, w, by_rows: bool):
    """x (B, K) @ w (N, K)^T. by_rows: an elementwise-product reduction, one weight row at a time for all rows
    of x (each weight row is read from memory once, vectorised, at close to memory speed); else F.linear, the
    GEMM, which costs more per weight read but less per row (the better one from about SMALL_BATCH rows up)."""
    if by_rows:
        return (w[:, None, :] * x[None]).sum(-1).T
    return F.linear(x, w)


def _rms_norm(x, weight, eps: float):
    # RMSNorm.forward, float32 in and out
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(x, w1, w3, w2, by_rows: bool):
    return _matvec(F.silu(_matvec(x, w1, by_rows)) * _matvec(x, w3, by_rows), w2, by_rows)


def decode_step(shape, weights, tokens, positions, starts, slots, keys, values):
    """One token per row through the whole model: logits (B, vocab).

    shape: (n_heads, n_kv_heads, head_dim, norm_eps, use_moe, top_k, norm_topk_prob, by_rows), plain values (the
    compiler specialises on them; by_rows: see _matvec). tokens (B,) this step's inputs; positions (B,) their RoPE positions; slots: arange(L),
    the cache columns in use, this step's last (its keys/values are written there); its length is the one
    dynamic size, so attention reads L columns, not the whole cache, without a compile per length. starts (B,):
    the first column each row may attend to (rows of a batch may start later). keys, values: StaticCache's
    per-layer lists, written in place.
    """
    n_heads, n_kv_heads, head_dim, eps, use_moe, top_k, norm_topk_prob, by_rows = shape
    embedding, final_norm, output, cos_table, sin_table, layers = weights
    B, L = tokens.shape[0], slots.shape[0]
    rep = n_heads // n_kv_heads
    x = F.embedding(tokens, embedding)                                   # (B, D)
    cos, sin = cos_table[positions][:, None], sin_table[positions][:, None]  # (B, 1, head_dim), over heads
    column = slots[-1:]
    hidden = (slots[None] < starts[:, None])[:, None, None, :]           # (B, 1, 1, L): not this row's

    def rope(t):  # apply_rope's formula
        return t * cos + t.roll(head_dim // 2, dims=-1) * sin

    for i, (attn_norm, wq, wk, wv, wo, ffn_norm, mlp) in enumerate(layers):
        h = _rms_norm(x, attn_norm, eps)
        q = rope(_matvec(h, wq, by_rows).view(B, n_heads, head_dim))
        k = rope(_matvec(h, wk, by_rows).view(B, n_kv_heads, head_dim))
        v = _matvec(h, wv, by_rows).view(B, n_kv_heads, head_dim)
        keys[i].index_copy_(2, column, k[:, :, None, :])
        values[i].index_copy_(2, column, v[:, :, None, :])
        q = q.view(B, n_kv_heads, rep, 1, head_dim)                       # GQA: rep query heads per kv head
        scores = (q * keys[i][:, :, None, :L]).sum(-1) * head_dim ** -0.5   # (B, kv, rep, L)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        y = (probs[..., None] * values[i][:, :, None, :L]).sum(-2)          # (B, kv, rep, head_dim)
        x = x + _matvec(y.reshape(B, n_heads * head_dim), wo, by_rows)
        h = _rms_norm(x, ffn_norm, eps)
        if use_moe:
            gate, experts, shared = mlp
            # The gate as MoEGate computes it; then every expert runs, weighted 0 when not chosen (no
            # data-dependent shapes, at the price of reading every expert's weights).
            scores = F.linear(h, gate).softmax(-1)
            topk_weight, topk_idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
            if top_k > 1 and norm_topk_prob:
                topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
            expert_weight = torch.zeros_like(scores).scatter(1, topk_idx, topk_weight)
            y = sum(_swiglu(h, *e, by_rows) * expert_weight[:, j:j + 1] for j, e in enumerate(experts))
            for e in shared:
                y = y + _swiglu(h, *e, by_rows)
            x = x + y
        else:
            x = x + _swiglu(h, *mlp, by_rows)
    return _matvec(_rms_norm(x, final_norm, eps), output, by_rows)


# ----------------------------------------------------------------------------------------------------------
# per model: compiled steps, caches, the policy

SMALL_BATCH = 4  # up to this many rows the one-weight-row-at-a-time reduction beats F.linear (docs/performance.md)


def batch_kind(rows: int):
    """Which compiled step serves `rows` rows: 1 (one row, static shapes), "few" (2..SMALL_BATCH rows, by_rows) or
    "many" (more, F.linear). Both batch kinds take any number of rows in their range without a recompile."""
    return 1 if rows == 1 else "few" if rows <= SMALL_BATCH else "many"


class _Decoder:
    """What one model keeps between generations: its compiled steps, its free caches (by rows and capacity) and
    the decode steps it ran eagerly (the auto policy's count). Holds no reference to the model."""

    def __init__(self):
        self.steps = {}        # (batch kind, capacity, threads) -> compiled decode_step
        self.free_caches = {}  # (rows, capacity) -> [StaticCache], at most one
        self.eager_steps = 0   # decode steps the eager model ran (generate_stream and the engine)
        self.lock = threading.Lock()          # the cache pool
        self.compile_lock = threading.Lock()  # one compile at a time


_decoders = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def _decoder(model) -> _Decoder:
    with _decoders_lock:
        if model not in _decoders:
            _decoders[model] = _Decoder()
        return _decoders[model]


def supported(model, attention_mask=None) -> bool:
    """Whether generation with this model (and this mask) can take the fast path at all."""
    from .model import Transformer  # here: model.generate (which imports this module) stays free of transformers
    if _mode == "off" or _broken is not None or not isinstance(model, Transformer):
        return False
    param = model.tok_embeddings.weight
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return False
    if model.training and model.config.dropout > 0:
        return False
    return attention_mask is None or bool(attention_mask.all())


def capacity_for(model, length: int) -> int:
    """Cache size for a generation that ends at `length` tokens: max_seq_len, or a multiple of it past the
    context (one more compile), so the compiled step's shapes do not change with the prompt."""
    n = model.config.max_seq_len
    return max(1, -(-length // n)) * n


def _new_step_fn():
    """A fresh copy of decode_step for torch.compile: each copy has its own code object, hence its own compile
    cache. Needed because the generated C++ bakes in the thread count it was compiled with, while the compile
    cache would not notice torch.set_num_threads: a step per thread count must be a separate function."""
    code = decode_step.__code__
    return types.FunctionType(code.replace(), decode_step.__globals__, code.co_name, decode_step.__defaults__,
                              decode_step.__closure__)


def _shape(config, kind):
    return (config.n_heads, config.n_kv_heads, config.head_dim, float(config.norm_eps), bool(config.use_moe),
            int(config.num_experts_per_tok), bool(config.norm_topk_prob), kind != "many")


def _key(kind, capacity: int):
    return kind, capacity, torch.get_num_threads()


def _due(decoder, steps_ahead: int) -> bool:
    """Under the current mode, should the steps be compiled now? (auto: see the module docstring)"""
    return _mode == "on" or (_mode == "auto" and decoder.eager_steps + steps_ahead >= COMPILE_AFTER_TOKENS)


def compile_step(model, kind, capacity: int, say_why: str | None = None):
    """Compile decode_step for this model, batch kind (batch_kind) and cache capacity at the current thread count
    (running it once on a scratch cache), remember it and return it. None, and eager decoding from then on after
    one warning, if the compiler fails. say_why: a line for stderr before a compile the caller did not ask for."""
    global _broken
    decoder = _decoder(model)
    key = _key(kind, capacity)
    with decoder.compile_lock:
        if key in decoder.steps or _broken is not None:
            return decoder.steps.get(key)
        if say_why:
            print(f"fast decode: {say_why}: compiling the decode step for {kind} row(s) (once per process; "
                  f"NANOLLM_FAST_DECODE=off skips it)", file=sys.stderr, flush=True)
        step = torch.compile(_new_step_fn(), fullgraph=True)  # static shapes, but for mark_dynamic below
        rows = 1 if kind == 1 else 2 if kind == "few" else SMALL_BATCH + 1
        cache = StaticCache(model.config, rows, capacity)
        zeros = torch.zeros(rows, dtype=torch.long)
        tokens, positions, starts = zeros.clone(), zeros.clone(), zeros.clone()
        slots = torch.arange(min(3, capacity))
        torch._dynamo.mark_dynamic(slots, 0)  # the attention length: one compile for every length
        if kind != 1:  # and the number of rows, within the kind's range
            for t in (tokens, positions, starts, *cache.keys, *cache.values):
                torch._dynamo.mark_dynamic(t, 0)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                step(_shape(model.config, kind), step_weights(model, capacity), tokens, positions, starts, slots,
                     cache.keys, cache.values)
        except Exception as err:  # no C++ compiler, an unsupported platform: decode eagerly, say it once
            _broken = err
            print(f"fast decode: compiling the decode step failed ({type(err).__name__}: {str(err)[:200]}); "
                  f"decoding eagerly", file=sys.stderr)
            return None
        decoder.steps[key] = step
        decoder.compile_seconds = time.perf_counter() - t0
        return step


def warm_up(model, rows=(1,), capacity: int | None = None):
    """Compile now the steps for generations of these numbers of rows, so that no request waits for them later;
    does nothing when the fast path does not apply or the mode is off."""
    if not supported(model):
        return
    for kind in dict.fromkeys(batch_kind(n) for n in rows):
        compile_step(model, kind, capacity or model.config.max_seq_len)


class Session:
    """One generate_stream call on the compiled step: its cache (from the model's pool, given back by close)."""

    def __init__(self, model, batch_size: int, capacity: int, step_fn):
        self.decoder, self.batch_size, self.capacity = _decoder(model), batch_size, capacity
        self.kind = batch_kind(batch_size)
        self.shape, self.step_fn = _shape(model.config, self.kind), step_fn
        self.weights = step_weights(model, capacity)  # the parameters as they are now
        with self.decoder.lock:
            pool = self.decoder.free_caches.get((batch_size, capacity))
            self.cache = pool.pop() if pool else StaticCache(model.config, batch_size, capacity)
        self.cache.length = 0
        # the step's inputs live in tensors of their own: a slice of the caller's token buffer would have a stride
        # that depends on the generation's length, and every new stride is a recompile
        self._tokens = torch.zeros(batch_size, dtype=torch.long)
        self._positions = torch.zeros(batch_size, dtype=torch.long)
        self._starts = torch.zeros(batch_size, dtype=torch.long)
        self._slots = torch.arange(capacity)

    def step(self, tokens, position: int):
        """tokens (B, 1) at `position` (the same for every row: no padding here) -> logits (B, vocab)."""
        self._tokens.copy_(tokens[:, 0])
        self._positions.fill_(position)
        logits = self.step_fn(self.shape, self.weights, self._tokens, self._positions, self._starts,
                              self._slots[:position + 1], self.cache.keys, self.cache.values)
        self.cache.length = position + 1
        return logits

    def close(self):
        """Give the cache back (one kept per batch size and capacity: concurrent generations allocate their own)."""
        with self.decoder.lock:
            self.decoder.free_caches[(self.batch_size, self.capacity)] = [self.cache]
        self.cache = None


def start(model, batch_size: int, prompt_length: int, new_tokens: int, attention_mask=None):
    """A Session for a generation of batch_size rows, new_tokens after a prompt of prompt_length, when the compiled
    step applies (see supported) and is compiled, or due now (compiled here); else None: the caller decodes
    eagerly with its own cache, as it always did, and reports its steps to count_eager."""
    if not supported(model, attention_mask):
        return None
    decoder, kind = _decoder(model), batch_kind(batch_size)
    capacity = capacity_for(model, prompt_length + new_tokens)
    step_fn = decoder.steps.get(_key(kind, capacity))
    if step_fn is None and _due(decoder, new_tokens):
        step_fn = compile_step(model, kind, capacity, None if _mode == "on" else
                               f"{decoder.eager_steps} eager decode steps so far + {new_tokens} asked for")
    return Session(model, batch_size, capacity, step_fn) if step_fn is not None else None


def count_eager(model, n_steps: int):
    """The eager model ran n_steps decode steps for this model (the auto policy's count)."""
    if n_steps > 0:
        _decoder(model).eager_steps += n_steps


class EngineSteps:
    """The compiled steps for model/engine.py: rows 0..n-1 of a shared cache (per-layer (max_batch, kv_heads,
    capacity, head_dim) tensors), right-aligned, every row's new token written at the same column. step() takes
    any n from 1 to max_batch; ready() says whether the steps are compiled (count_eager: the auto policy)."""

    def __init__(self, model, keys, values, max_batch: int):
        self._model, self.keys, self.values = weakref.ref(model), keys, values
        self.decoder, self.capacity = _decoder(model), keys[0].shape[2]
        self.kinds = list(dict.fromkeys(batch_kind(n) for n in range(1, max_batch + 1)))
        self.shapes = {kind: _shape(model.config, kind) for kind in self.kinds}
        self.steps, self.weights = None, None
        self._slots = torch.arange(self.capacity)
        if _mode == "on" and supported(model):
            self.compile()

    def compile(self, say_why: str | None = None):
        model = self._model()
        steps = {kind: compile_step(model, kind, self.capacity, say_why) for kind in self.kinds}
        if all(step is not None for step in steps.values()):
            self.steps, self.weights = steps, step_weights(model, self.capacity)

    def ready(self) -> bool:
        return self.steps is not None

    def count_eager(self):
        """One eager engine step more; under auto, compile between two steps once enough were run."""
        self.decoder.eager_steps += 1
        if _mode == "auto" and _broken is None and self.decoder.eager_steps >= COMPILE_AFTER_TOKENS \
                and supported(self._model()):
            self.compile(f"{self.decoder.eager_steps} eager engine steps")

    def step(self, tokens, positions, starts, end: int):
        """tokens, positions, starts: (n,) long tensors (each row's input, its RoPE position, its first column);
        every row's keys/values go to column `end` -> logits (n, vocab)."""
        n = tokens.shape[0]
        kind = batch_kind(n)
        return self.steps[kind](self.shapes[kind], self.weights, tokens, positions, starts, self._slots[:end + 1],
                                [k[:n] for k in self.keys], [v[:n] for v in self.values])
