"""
The project's own generator: streams tokens (and text pieces) as they are produced, with a preallocated KV cache.

transformers' `model.generate(...)` works too (Transformer is a GenerationMixin); this one exists because it is
small enough to read in one go and has no per-step bookkeeping beyond what decoding needs.

    for piece in stream_text(tokenizer, generate_stream(model, ids, max_new_tokens=100, temperature=0.7)):
        print(piece, end="", flush=True)

Also here: left_pad (token-id lists -> a left-padded batch), generate_batch (many prompts, batched, greedy by
default, each row cut at </s> / its first newline so its text never depends on its batch) and stream_reply
(text pieces of one reply).
"""
import math

import torch

from . import fast_decode


class KVCache:
    """Keys/values for every layer in one preallocated buffer, filled left to right.

    Implements the two methods the model's attention calls on a transformers Cache (`update`,
    `get_seq_length`), so the model needs no special case for it.
    """

    def __init__(self, config, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layers, self.max_len, self.length = config.n_layers, max_len, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, k, v, layer_idx: int):
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        if layer_idx == self.n_layers - 1:  # every layer has written this step's tokens
            self.length = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]


GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily: logits / 1e-45 overflow to inf and sampling crashes


def check_sampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """Reject settings that would crash or silently mean something else, with one message naming the value
    (top_p <= 0 would drop every token; a negative top_k is no k; a penalty <= 0 flips scores)."""
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), not {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    if repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), not {repetition_penalty}")


def sample_next(logits, generated, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """Pick the next token for each row from last-position logits (B, V). temperature 0 (or below GREEDY_BELOW)
    = greedy."""
    logits = logits.float()
    if repetition_penalty != 1.0 and generated.numel():
        # CTRL-style penalty, as in transformers: shrink the scores of tokens already present.
        seen = logits.gather(1, generated)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, sorted_idx, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(1)


@torch.no_grad()
def generate_stream(model, input_ids, max_new_tokens=256, temperature=1.0, top_k=None, top_p=None,
                    repetition_penalty=1.0, eos_token_id=None, attention_mask=None):
    """Yield the next token ids (B,) one step at a time. Rows that produced eos keep yielding eos.

    input_ids (B, T) may be left-padded, with attention_mask marking the real tokens.
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    B, T = input_ids.shape
    max_len = T + max_new_tokens
    # The compiled decode step when it is there or due (a float32 model on the CPU, no padding;
    # model/fast_decode.py), else the eager model. Either way the eager model prefills the prompt.
    fast = fast_decode.start(model, B, T, max_new_tokens, attention_mask)
    count_steps = fast is None and fast_decode.supported(model, attention_mask)  # steps the fast path could take
    if fast is not None:
        cache = fast.cache
    else:
        param = next(model.parameters())
        cache = KVCache(model.config, B, max_len, param.device, param.dtype)
    # Tokens so far, preallocated: the repetition penalty reads them, nothing else does.
    tokens = torch.empty(B, max_len, dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device) if eos_token_id is not None else None
    step_ids = input_ids
    t = T
    try:
        for t in range(T, max_len):
            if fast is not None and t > T:
                logits = fast.step(step_ids, t - 1)
            else:
                logits = model(step_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
            next_ids = sample_next(logits, tokens[:, :t], temperature, top_k, top_p, repetition_penalty)
            if finished is not None:
                next_ids = next_ids.masked_fill(finished, eos_token_id)
                finished |= next_ids == eos_token_id
            yield next_ids
            if finished is not None and bool(finished.all()):
                return
            tokens[:, t] = next_ids
            step_ids = tokens[:, t:t + 1]
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
    finally:
        if fast is not None:
            fast.close()
        elif count_steps:  # the auto policy counts the decode steps the eager model ran (all but the prompt's pass)
            fast_decode.count_eager(model, t - T)


def stream_text(tokenizer, token_stream, skip_special_tokens=True):
    """Turn a stream of (1,)-shaped token ids into text pieces, holding back bytes of an unfinished character
    (byte-level BPE can split one Chinese character over several tokens)."""
    ids, printed = [], ""
    for next_ids in token_stream:
        ids.append(int(next_ids[0]))
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(printed):
            yield text[len(printed):]
        printed = text


# ----------------------------------------------------------------------------------------------------------
# batches of prompts, streamed replies

def _newline_ids(tokenizer):
    """Bool mask over the vocabulary: tokens whose text contains a newline."""
    cached = getattr(tokenizer, "_nanollm_newline_ids", None)
    if cached is None:
        cached = torch.tensor(["\n" in tokenizer.decode([i]) for i in range(len(tokenizer))])
        tokenizer._nanollm_newline_ids = cached
    return cached


@torch.no_grad()
def left_pad(rows, pad_id, device):
    """Token-id lists -> (input_ids, attention_mask) on device, padded on the left so every row ends together."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def generate_batch(model, tokenizer, prompts, max_new_tokens=64, batch_size=64, stop_at_newline=True,
                   temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """Continuations of many prompts (token-id lists), batched with left padding; see the module docstring.

    Rows are sorted by length so a batch holds similar lengths (little padding), and a batch stops as soon as
    every row has finished: </s>, or a newline when stop_at_newline (scoring reads the first line only).
    """
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    newline = _newline_ids(tokenizer).to(device) if stop_at_newline else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad, device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        steps = []
        for next_ids in generate_stream(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                        eos_token_id=eos, attention_mask=attention_mask):
            steps.append(next_ids)
            done |= next_ids == eos
            if newline is not None:
                done |= newline[next_ids]
            if bool(done.all()):
                break
        generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]
        for r, i in enumerate(rows):
            ids = generated[r]
            if eos in ids:
                ids = ids[:ids.index(eos)]
            if newline is not None:  # cut after the first line, so a row's text does not depend on its batch
                ends = [k for k, token in enumerate(ids) if newline[token]]
                ids = ids[:ends[0] + 1] if ends else ids
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return texts


def stream_reply(model, tokenizer, ids, max_new_tokens, temperature=0.85, top_k=None, top_p=None,
                 repetition_penalty=1.0):
    """Text pieces of one continuation as they are generated (whole characters only), up to </s>."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    tokens = generate_stream(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=tokenizer.eos_token_id)
    yield from stream_text(tokenizer, tokens)
