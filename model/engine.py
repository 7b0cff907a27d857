"""
Batched decoding engine for the server (serve_openai_api.py): many requests share one model and decode together.

One background thread runs the loop. Each step it
  1. drops the requests whose client went away (GenerationRequest.cancel),
  2. admits waiting requests into free slots: prefill the prompt alone (exactly as generate_stream does), sample
     the first token, copy the prompt's keys/values into the request's slot of the shared cache,
  3. decodes one token for every active request in a single forward pass, and retires the finished ones.
So a request joins at the next step, leaves when it is done, and its slot is reused at once.

    engine = Engine(model, eos_token_id=tokenizer.eos_token_id, max_batch=16, max_queue=64).start()
    request = GenerationRequest(prompt_ids, max_new_tokens=100, temperature=0.0, on_token=print)
    engine.submit(request)     # raises QueueFullError when max_batch + max_queue requests are in already

Cache layout: rows 0..n-1 of preallocated (max_batch, kv_heads, max_seq_len, head_dim) buffers, one per layer,
hold the n active requests, right-aligned: every row's tokens end at the shared column `end`, shorter rows start later and
the attention mask hides the columns before them. Each step writes all new tokens at column `end`, so the model's
ordinary "padded batch + cache" path applies unchanged (positions come from the mask, per row). Rows stay packed
at the front (a finished row is replaced by the last one), so the forward pass slices views and copies nothing.
When column `end` reaches max_seq_len, or a new prompt is longer than `end`, the rows are shifted to end at the
longest one (`_realign`); that is rare and cheap next to a forward pass.

The decode step: on a float32 model on the CPU, model/fast_decode.py's compiled step (EngineSteps: one for 1 row,
one for a few, one for many; the same math as the model's forward) once it is compiled; the eager model's forward
before that, and elsewhere. It is compiled at start with fast_decode mode "on" (serve_openai_api.py
--fast_decode on), or under "auto" between two steps once the engine has run fast_decode.COMPILE_AFTER_TOKENS
eager ones; never with "off". The prompt is always prefilled by the eager model.

Greedy output does not depend on the batch: a request's first token comes from its own prefill, later ones from
a row whose masked-out columns contribute exactly zero (tests/test_serve.py compares with generate_stream).
Sampling draws from the request's own RNG state (its `seed`), so a seeded request is reproducible in any batch.
"""
import collections
import threading

import torch

from . import fast_decode
from .generate import KVCache, sample_next


class QueueFullError(Exception):
    """max_batch requests are decoding and max_queue more are waiting."""


class GenerationRequest:
    """One generation. on_token(token_id) is called from the engine thread for every new token; on_done(reason,
    error) once at the end, reason "stop" (eos), "length" (max_new_tokens), "cancelled" or "error"."""

    def __init__(self, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 seed=None, on_token=None, on_done=None):
        self.prompt, self.max_new_tokens = list(prompt), max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
        self.rng_state = generator.get_state()
        self.on_token, self.on_done = on_token or (lambda token: None), on_done or (lambda reason, error: None)
        self.ids = list(prompt)  # prompt + generated tokens (the repetition penalty reads them)
        self.n_generated, self.cancelled, self.hit_eos, self.error = 0, False, False, None
        self.finished = False  # on_done was called: never twice, whichever path ends it

    def cancel(self):
        """Ask the engine to drop this request; its slot is free after the current step."""
        self.cancelled = True

    @property
    def cached(self) -> int:
        """Tokens whose keys/values are in the cache: all but the newest, which is the next step's input."""
        return len(self.ids) - 1


class SlotCache:
    """The shared KV buffers, one tensor per layer (as fast_decode's compiled step takes them); implements the two
    methods the model's attention calls (see KVCache)."""

    def __init__(self, config, max_batch, max_len, device, dtype):
        shape = (max_batch, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len, self.end, self.n = max_len, 0, 0  # shared end column, active rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.end

    def update(self, k, v, layer_idx: int):
        """k, v (n, kv_heads, 1, head_dim): every row's new token, written at column `end`."""
        self.keys[layer_idx][:self.n, :, self.end] = k[:, :, 0]
        self.values[layer_idx][:self.n, :, self.end] = v[:, :, 0]
        return self.keys[layer_idx][:self.n, :, :self.end + 1], self.values[layer_idx][:self.n, :, :self.end + 1]


class Engine:
    def __init__(self, model, eos_token_id, max_batch=16, max_queue=64):
        self.model, self.eos, self.max_batch, self.max_queue = model, eos_token_id, max_batch, max_queue
        param = next(model.parameters())
        self.device, self.max_len = param.device, model.config.max_seq_len
        self.cache = SlotCache(model.config, max_batch, self.max_len, param.device, param.dtype)
        self.fast = fast_decode.EngineSteps(model, self.cache.keys, self.cache.values, max_batch) \
            if fast_decode.supported(model) else None
        self.rows = []                          # active requests; rows[i] owns cache row i
        self.waiting = collections.deque()
        self.n_prefilling = 0                   # taken from waiting, not yet in rows: they hold slots too
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.n_steps = 0                        # decode steps run (for tests and stats)
        self.n_prefills = 0                     # prompts prefilled (one per distinct prompt admitted in a step)

    # -- the server's side ------------------------------------------------------------------------------------

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join(timeout=10)

    def submit(self, request: GenerationRequest):
        if not 1 <= len(request.prompt) < self.max_len:
            raise ValueError(f"the prompt is {len(request.prompt)} tokens; the context holds {self.max_len}")
        # never past the context: the last token generated is not fed back, so prompt + new <= max_len fits
        request.max_new_tokens = max(1, min(request.max_new_tokens, self.max_len - len(request.prompt)))
        with self.wakeup:
            self._drop_cancelled_waiting()
            if len(self.rows) + self.n_prefilling + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFullError(f"{self.max_batch} requests running and {self.max_queue} waiting")
            self.waiting.append(request)
            self.wakeup.notify()

    def load(self) -> dict:
        with self.wakeup:  # a request moves from prefilling to rows under this lock: never counted 0 or 2 times
            self._drop_cancelled_waiting()
            return {"running": len(self.rows) + self.n_prefilling, "waiting": len(self.waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "decode_steps": self.n_steps}

    def _drop_cancelled_waiting(self):
        """Requests cancelled while waiting leave the queue now (with the lock held), not when a slot frees up:
        until then they would hold places of max_queue."""
        if any(request.cancelled for request in self.waiting):
            for request in [r for r in self.waiting if r.cancelled]:
                self._finish(request, "cancelled")
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    # -- the loop ---------------------------------------------------------------------------------------------

    def _loop(self):
        while True:
            with self.wakeup:
                while not self.stopping and not self.rows and not self.waiting:
                    self.wakeup.wait()
                if self.stopping:
                    break
                admitted = []
                while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
                self.n_prefilling = len(admitted)
            try:
                self._step(admitted)
            except Exception as err:  # e.g. out of memory: fail the requests in flight, keep serving
                for request in self.rows + admitted:  # a request may be in both, or done: _finish tells it once
                    self._finish(request, "error", err)
                with self.wakeup:
                    self.rows, self.n_prefilling, self.cache.n, self.cache.end = [], 0, 0, 0
        for request in self.rows + list(self.waiting):
            self._finish(request, "cancelled")

    @torch.no_grad()
    def _step(self, admitted):
        for i in reversed(range(len(self.rows))):  # clients gone: free their slots before anything else
            if self.rows[i].cancelled:
                self._retire(i, "cancelled")
        prefilled = {}  # prompt -> its keys/values and last logits: the n choices of one API request share one
        for request in admitted:
            goes_on = False
            if request.cancelled:
                self._finish(request, "cancelled")
            else:
                try:
                    goes_on = self._prefill(request, prefilled)
                except Exception as err:  # this request only (the cache is untouched until its copy at the end)
                    self._finish(request, "error", err)
            with self.wakeup:  # its first token may be out already: it counts as running until this point
                if goes_on:
                    self.rows.append(request)
                self.n_prefilling -= 1
        if not self.rows:
            return
        if self.cache.end == self.max_len:  # no column left for this step's tokens: drop the unused prefix
            self._realign(max(r.cached for r in self.rows))
        n, end = len(self.rows), self.cache.end
        self.cache.n = n
        inputs = torch.tensor([[r.ids[-1]] for r in self.rows], device=self.device)
        starts = torch.tensor([end - r.cached for r in self.rows], device=self.device)
        if self.fast is not None and self.fast.ready():
            positions = torch.tensor([r.cached for r in self.rows], device=self.device)
            logits = self.fast.step(inputs[:, 0], positions, starts, end)
        else:
            attention_mask = (torch.arange(end + 1, device=self.device)[None, :] >= starts[:, None]).long()
            logits = self.model(inputs, attention_mask=attention_mask, cache=self.cache,
                                logits_to_keep=1).logits[:, -1]
            if self.fast is not None:
                self.fast.count_eager()
        self.cache.end += 1
        self.n_steps += 1
        for i in range(n):
            self._emit(self.rows[i], logits[i:i + 1])
        for i in reversed(range(n)):
            reason = self._done(self.rows[i])
            if reason:
                self._retire(i, reason)

    def _prefill(self, request, prefilled):
        """The prompt alone, as generate_stream runs it (or its result from an earlier request of this step with the
        same prompt, in prefilled); its first token; then, if it goes on, its keys and values into the next free
        row. -> whether it goes on (the caller appends it to rows)."""
        key = tuple(request.prompt)
        if key not in prefilled:
            prompt = torch.tensor([request.prompt], device=self.device)
            kv = KVCache(self.model.config, 1, len(request.prompt), self.device, self.cache.keys[0].dtype)
            prefilled[key] = kv, self.model(prompt, cache=kv, logits_to_keep=1).logits[:, -1]
            self.n_prefills += 1
        kv, logits = prefilled[key]  # kv is only read (copied into the row); the logits are copied for sampling
        self._emit(request, logits.clone())
        reason = self._done(request)
        if reason:
            self._finish(request, reason, request.error)
            return False
        length = len(request.prompt)
        if length > self.cache.end:
            self._realign(length)
        row, end = len(self.rows), self.cache.end
        for layer in range(len(self.cache.keys)):
            self.cache.keys[layer][row, :, end - length:end] = kv.keys[layer, 0]
            self.cache.values[layer][row, :, end - length:end] = kv.values[layer, 0]
        return True

    def _emit(self, request, logits):
        """Sample the request's next token from its (1, vocab) logits, with its settings and its own RNG.
        A failure here (say, a callback's) ends this request only."""
        try:
            logits, generated = logits.float().cpu(), torch.tensor([request.ids])
            if request.sampling["temperature"] > 0:
                with torch.random.fork_rng(devices=[]):  # sample_next draws from the global CPU RNG: lend it ours
                    torch.set_rng_state(request.rng_state)
                    token = int(sample_next(logits, generated, **request.sampling)[0])
                    request.rng_state = torch.get_rng_state()
            else:
                token = int(sample_next(logits, generated, **request.sampling)[0])
            request.n_generated += 1
            if token == self.eos:
                request.hit_eos = True
            else:
                request.ids.append(token)
                request.on_token(token)
        except Exception as err:
            request.error = err

    def _done(self, request):
        if request.error is not None:
            return "error"
        if request.hit_eos:
            return "stop"
        if request.n_generated >= request.max_new_tokens:
            return "length"
        return "cancelled" if request.cancelled else None

    def _retire(self, i, reason):
        """Free row i: the last row moves into it, so active rows stay packed at the front."""
        request, last = self.rows[i], len(self.rows) - 1
        if i != last:
            for buffer in self.cache.keys + self.cache.values:
                buffer[i] = buffer[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()
        self.cache.n = len(self.rows)
        if not self.rows:
            self.cache.end = 0
        self._finish(request, reason, request.error)

    def _realign(self, new_end):
        """Shift every row so that its tokens end at column new_end (>= the longest row)."""
        old_end = self.cache.end
        for i, request in enumerate(self.rows):
            length = request.cached
            for buffer in self.cache.keys + self.cache.values:
                buffer[i, :, new_end - length:new_end] = buffer[i, :, old_end - length:old_end].clone()
        self.cache.end = new_end

    def _finish(self, request, reason, error=None):
        if request.finished:  # a failed step ends everything in flight, some of which may be done already
            return
        request.finished = True
        try:
            request.on_done(reason, error)
        except Exception:  # a callback's failure must not stop the engine
            pass
