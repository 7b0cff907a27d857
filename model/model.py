"""
The nano-LLM Transformer: a Llama-architecture decoder with an optional mixture of experts.

Dense math is exactly Llama's (pre-norm RMSNorm in fp32, RoPE in the rotate-half convention, GQA, SwiGLU,
no biases, tied embeddings), so model/llama.py maps the weights one-to-one onto LlamaForCausalLM.
Attention runs one of three ways, chosen per forward by attention_path: SDPA (flash when plain causal), flex
attention with a document-causal BlockMask (CUDA, packed or padded rows), or explicit math (flash_attn=False).
MoE follows the seed: softmax gate, top-k, optional renormalisation, sequence- or batch-level balance loss,
shared experts on every token. The balance loss is added to the training loss (the seed dropped it).

    from model.LMConfig import LMConfig
    from model.model import Transformer
    model = Transformer(LMConfig(dim=256, n_layers=4))
    out = model(input_ids, labels=input_ids)   # out.loss, out.logits, out.aux_loss, out.past_key_values
    model.save_pretrained("out/x"); Transformer.from_pretrained("out/x")   # strict: mismatches are errors
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import ModelOutput

from .LMConfig import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under bf16 autocast: the mean of squares underflows in half precision.
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos and sign-folded sin tables, (B, T, head_dim), for the given positions (Llama's rotate-half layout).

    sin's first half is negated, so rotate_half(x) * sin == x.roll(head_dim // 2, -1) * signed_sin exactly:
    one roll instead of chunk + neg + cat (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, heads, head_dim) by position; cos/sin from rope_cos_sin. Llama's
    x * cos + rotate_half(x) * sin, bit for bit."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.wo.is_residual_projection = True
        self.dropout = config.dropout
        self.flash_attn = config.flash_attn

    def forward(self, x, cos, sin, attn_mask, cache):
        """attn_mask: None (plain causal over a fresh sequence, or one new token after the cache), a boolean
        (B, 1, T, past+T) mask, or a BlockMask (the flex path); see attention_path for which one a forward uses."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(attn_mask, BlockMask):
            y = _flex(q.device.type)(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
        elif not self.flash_attn:
            y = math_attention(q, k, v, attn_mask, dropout_p)
        else:  # SDPA: the fused causal (flash) kernel when attn_mask is None, else the dense mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                               dropout_p=dropout_p, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def math_attention(q, k, v, attn_mask, dropout_p: float = 0.0):
    """softmax(Q K^T / sqrt(head_dim)) V written out (config.flash_attn=False): the reference the fused kernels
    must match, for debugging and for hardware without them. q (B, H, T, hd); k, v (B, H_kv, S, hd);
    attn_mask a boolean (B, 1, T, S) mask (True = may attend) or None for causal (aligned to the last key)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # GQA, as SDPA's enable_gqa
    T, S = q.shape[-2], k.shape[-2]
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~attn_mask, float("-inf")).float().softmax(dim=-1).to(q.dtype)
    return F.dropout(probs, dropout_p) @ v


def attention_path(device, *, flash_attn: bool = True, cached: bool = False, masked: bool = True,
                   dropout: bool = False) -> str:
    """Which attention a forward runs: "math", "sdpa" or "flex".

    math  config.flash_attn=False: explicit softmax(QK^T)V (math_attention), dense mask.
    flex  CUDA, a fresh forward (no KV cache) whose mask is more than causal (packed documents, padding), no
          attention dropout: flex_attention with a document-causal BlockMask, which skips masked-out blocks and
          stays a fused kernel, where a dense boolean mask would push SDPA off its flash kernel.
    sdpa  everything else: plain causal (flash), or SDPA with a dense boolean mask (CPU/MPS, generation with a
          KV cache, prefill included; dropout: flex_attention has none; flex has no backward on CPU either).
    """
    if not flash_attn:
        return "math"
    if torch.device(device).type == "cuda" and masked and not cached and not dropout:
        return "flex"
    return "sdpa"


_compiled_flex = None


def _flex(device_type: str):
    """flex_attention is only fast compiled (eager it materialises the scores). Inside a torch.compile'd model it
    is traced into the model's graph; in an eager model on CUDA it is compiled on its own, once per process
    (lazily: the wrapper costs a second at import). Elsewhere (a CPU test forcing the path): eager."""
    global _compiled_flex
    if device_type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def document_block_mask(doc_id, key_valid, B: int, T: int, device) -> BlockMask:
    """Flex BlockMask of the same mask as dense_attention_mask (fresh forward, no cache): causal, within a
    document (doc_id (B, T) or None), real keys only (key_valid (B, T) bool or None), every query sees itself."""
    def mask_mod(b, h, q, kv):
        keep = kv <= q
        if doc_id is not None:
            keep = keep & (doc_id[b, q] == doc_id[b, kv])
        if key_valid is not None:
            keep = keep & key_valid[b, kv]
        return keep | (q == kv)
    return create_block_mask(mask_mod, B, None, T, T, device=device)


def dense_attention_mask(doc_id, key_valid, past_len: int, T: int, device):
    """Boolean (B, 1, T, past+T) mask, or None when plain causal attention is exact (the fast path).
    doc_id (B, T): document of each query/key (fresh forward only); key_valid (B, past+T): False at padding."""
    if doc_id is None and key_valid is None:
        # A fresh sequence is plain causal; a single new token after the cache sees all of it.
        return None if past_len == 0 or T == 1 else _causal_with_past(device, past_len, T)[None, None]
    mask = _causal_with_past(device, past_len, T).unsqueeze(0)  # (1, T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    if doc_id is not None:
        mask = mask & (doc_id[:, :, None] == doc_id[:, None, :])
    # A padding query with nothing to attend to would give NaN; let every query see itself.
    mask = mask | _diagonal(device, past_len, T).unsqueeze(0)
    return mask.unsqueeze(1)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MoEGate(nn.Module):
    """Softmax router: picks top-k experts per token and computes the load-balancing loss while training."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        B, T, D = x.shape
        scores = F.linear(x.reshape(-1, D), self.weight).float().softmax(dim=-1)  # (B*T, E)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = scores.new_zeros(())
        if self.training and self.alpha > 0.0:
            if self.seq_aux:
                # Per sequence: fraction of routed slots each expert received (scaled so uniform = 1)
                # times its mean gate probability.
                load = torch.zeros(B, self.n_experts, device=x.device)
                load.scatter_add_(1, topk_idx.view(B, -1), torch.ones(B, T * self.top_k, device=x.device))
                load = load / (T * self.top_k / self.n_experts)
                aux_loss = (load * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                load = F.one_hot(topk_idx.view(-1), self.n_experts).float().mean(0) * self.n_experts
                aux_loss = (scores.mean(0) * load).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class MOEFeedForward(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])
        self.aux_loss = None

    def forward(self, x):
        B, T, D = x.shape
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        x_flat = x.reshape(-1, D)
        flat_expert = topk_idx.view(-1)                        # (B*T*k,) expert of each routed slot
        order = torch.argsort(flat_expert, stable=True)        # slots grouped by expert
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()
        routed_inputs = x_flat[order // topk_idx.shape[1]]     # slot -> its token
        # Every expert runs, on however many tokens it got (possibly zero), so each expert's parameters are
        # in the graph and DDP never waits for a gradient that does not come. Same path in train and eval.
        routed_outputs = torch.cat(
            [expert(chunk) for expert, chunk in zip(self.experts, routed_inputs.split(counts))], dim=0)
        slot_outputs = torch.empty_like(routed_outputs).index_copy_(0, order, routed_outputs)
        y = (slot_outputs.view(-1, topk_idx.shape[1], D) * topk_weight.unsqueeze(-1).to(x.dtype)).sum(dim=1)
        y = y.view(B, T, D)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y


class TransformerBlock(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = MOEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, attn_mask, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


@dataclass
class LMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # transformers 5.x calls the cache `cache`; ModelOutput also answers to `.past_key_values` for it.
    cache: Cache | None = None
    aux_loss: torch.Tensor | None = None


def estimate_flops_per_token(config: LMConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) for MFU, as nanoGPT's estimate_mfu counts them: 6 per matmul
    weight a token goes through (2 forward, 4 backward), the output projection included, plus causal attention
    (QK^T and PV over on average seq_len/2 keys: 2 x 2 x seq_len/2 x dim forward, x3 with backward; the masked half
    is not counted, unlike nanoGPT's 12 x n_layers x seq_len x dim). Embedding lookups, norms, softmax and
    activations are left out. MoE: only the active weights count, i.e. the router (dim x n_routed_experts) plus
    num_experts_per_tok routed and n_shared_experts shared FFNs; the stored-but-idle experts cost no FLOPs."""
    hd, L, D = config.head_dim, config.n_layers, config.dim
    attention = D * config.n_heads * hd * 2 + D * config.n_kv_heads * hd * 2  # wq, wo; wk, wv
    ffn = 3 * D * config.hidden_dim
    if config.use_moe:
        ffn = ffn * (config.num_experts_per_tok + config.n_shared_experts) + D * config.n_routed_experts
    matmul_params = L * (attention + ffn) + config.vocab_size * D
    return 6 * matmul_params + 6 * L * seq_len * D


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model built from its config."""


class Transformer(PreTrainedModel, GenerationMixin):
    config_class = LMConfig
    config: LMConfig
    base_model_prefix = "nanollm"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerBlock"]
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}
    _supports_sdpa = True

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([TransformerBlock(config, i) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied
        self.post_init()

    def _init_weights(self, module):
        # GPT-2 / Llama: N(0, 0.02); projections back into the residual stream scaled by 1/sqrt(2 * n_layers)
        # so the residual's variance does not grow with depth.
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoEGate):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), device_type="cpu",
                            eps: float = 1e-8) -> torch.optim.AdamW:
        """AdamW with two groups: matrices decay; norms, other 1-D params and the (tied) embedding do not.
        Fused (one kernel for all tensors) on CUDA and CPU: on CPU 3-4x faster than the per-tensor loop that
        AdamW uses by default there, and than foreach (python -m bench train measures it)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and not name.startswith("tok_embeddings") else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token at this sequence length: estimate_flops_per_token(self.config, seq_len)."""
        return estimate_flops_per_token(self.config, seq_len)

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        shift_labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> LMOutput:
        """
        input_ids (B, T). attention_mask (B, past+T): 1 = real token, 0 = padding (left or right).
        position_ids (B, T): default from attention_mask (padding-aware) or 0..T-1. Several documents packed in
        one row are given by position ids that restart at 0; no token then attends across a document boundary.
        labels (B, T): Hugging Face convention (aligned with input_ids, shifted inside, -100 ignored).
        shift_labels (B, T): the same targets already shifted (target of position t at t), as in transformers'
        loss functions; used by packed pretraining rows. past_key_values / cache: a transformers Cache.
        logits_to_keep: compute logits only for the last N positions (0 = all); generation needs one.
        """
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape

        find_documents = position_ids is not None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        attn_mask = self._attention_mask(input_ids.device, attention_mask, position_ids, past_len, B, T,
                                         find_documents, cached=cache is not None)

        h = self.dropout(self.tok_embeddings(input_ids))
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache)
        h = self.norm(h)

        aux_loss = None
        if self.config.use_moe:
            aux_loss = sum(layer.feed_forward.aux_loss for layer in self.layers)

        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
            logits = self.output(h)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=-100)
            if aux_loss is not None and self.training:
                loss = loss + aux_loss
        else:
            logits = self.output(h[:, -logits_to_keep:] if logits_to_keep else h)
        return LMOutput(loss=loss, logits=logits, cache=cache, aux_loss=aux_loss)

    def _attention_mask(self, device, attention_mask, position_ids, past_len: int, B: int, T: int,
                        find_documents: bool, cached: bool):
        """The mask every layer uses: None (plain causal), a dense boolean mask, or a flex BlockMask."""
        key_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask[:, -(past_len + T):].bool()
        # Packed documents: a position that does not continue the previous one starts a new document. Only
        # positions the caller gave can hold such restarts (derived ones restart only where the padding mask
        # already cuts), and skipping the scan spares plain batches a host sync and torch.compile a graph break.
        doc_id = None
        if find_documents and past_len == 0 and T > 1:
            starts = torch.ones_like(position_ids, dtype=torch.bool)
            starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
            if bool(starts[:, 1:].any()):
                doc_id = starts.long().cumsum(-1)
        # A KV cache (even an empty one, at prefill) means generation: the dense mask, no flex compile per length.
        path = attention_path(device, flash_attn=self.config.flash_attn, cached=cached,
                              masked=doc_id is not None or key_valid is not None,
                              dropout=self.training and self.config.dropout > 0)
        if path == "flex":
            return document_block_mask(None if doc_id is None else doc_id.expand(B, T),
                                       None if key_valid is None else key_valid.expand(B, T), B, T, device)
        return dense_attention_mask(doc_id, key_valid, past_len, T, device)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a save_pretrained directory; any missing, unexpected or mis-shaped tensor is an error."""
        path = str(pretrained_model_name_or_path)
        check_checkpoint(path)
        kwargs.pop("output_loading_info", None)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        problems = [f"missing key {k}" for k in info.get("missing_keys", [])]
        problems += [f"unexpected key {k}" for k in info.get("unexpected_keys", [])]
        problems += [f"mis-shaped key {m}" for m in info.get("mismatched_keys", [])]
        if problems:
            raise CheckpointMismatchError(f"checkpoint {path} does not fit its config: " + "; ".join(problems))
        return model


def _causal_with_past(device, past_len: int, T: int):
    """(T, past+T) bool: query i (absolute position past+i) sees keys 0..past+i."""
    return torch.ones(T, past_len + T, dtype=torch.bool, device=device).tril(diagonal=past_len)


def _diagonal(device, past_len: int, T: int):
    eye = torch.zeros(T, past_len + T, dtype=torch.bool, device=device)
    eye[:, past_len:] = torch.eye(T, dtype=torch.bool, device=device)
    return eye


def check_checkpoint(path: str):
    """Compare the tensors in path/model.safetensors with the model its config.json describes, reading only
    the headers. Raises CheckpointMismatchError naming every key that is missing, unexpected or mis-shaped."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no model.safetensors in checkpoint directory {path}")
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    config = LMConfig.from_pretrained(path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    # Tied output weights are stored once, under the embedding's name.
    expected.pop("output.weight", None)
    found.pop("output.weight", None)
    problems = [f"missing key '{k}' (expected shape {expected[k]})" for k in expected if k not in found]
    problems += [f"unexpected key '{k}' (shape {found[k]})" for k in found if k not in expected]
    problems += [f"key '{k}' has shape {found[k]} in the checkpoint but {expected[k]} in the model "
                 f"built from config.json" for k in expected if k in found and found[k] != expected[k]]
    if problems:
        raise CheckpointMismatchError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))


# `AutoModelForCausalLM.from_pretrained(checkpoint_dir)` builds this class once this module is imported
AutoConfig.register(LMConfig.model_type, LMConfig, exist_ok=True)
AutoModelForCausalLM.register(LMConfig, Transformer, exist_ok=True)
