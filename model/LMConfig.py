"""
LMConfig: every architecture knob of the nano-LLM Transformer, with the seed's field names.

Edit the defaults below to change the model every stage trains (the seed's habit), or override them per run
with flags (`python 1-pretrain.py --dim 768 --n_layers 16`). The config is saved inside every checkpoint
(config.json), so later stages and eval read it from there and never ask for sizes again.

    dim          512/768     model width; below 512 quality drops fast on real data
    n_layers     8/16        Transformer blocks
    use_moe      True/False  replace each FeedForward with a mixture of experts
    vocab_size   6400        must equal the tokenizer's vocabulary size
    flash_attn   True/False  True: fused attention (SDPA; flex_attention for packed/padded rows on CUDA).
                             False: plain softmax(QK^T)V, same results, slower (debugging, old hardware)
"""
from transformers import PretrainedConfig


class LMConfig(PretrainedConfig):
    model_type = "nanollm"
    # Standard Hugging Face names resolve to ours, so transformers' generation, caches and export code
    # that read `config.hidden_size` or `config.num_hidden_layers` work unchanged.
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "hidden_dim",
        "rms_norm_eps": "norm_eps",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 8,
        n_kv_heads: int = 2,
        vocab_size: int = 6400,
        hidden_dim: int | None = None,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        max_seq_len: int = 512,
        dropout: float = 0.0,
        flash_attn: bool = True,
        rope_theta: float = 10000.0,
        # Mixture of experts (used only when use_moe=True)
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        **kwargs,
    ):
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        # SwiGLU keeps the parameter count of a 4*dim MLP: 2/3 of it, rounded up to multiple_of.
        # Resolved here so config.json records the real width.
        if hidden_dim is None:
            hidden_dim = int(2 * (4 * dim) / 3)
            hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.hidden_dim = hidden_dim
        self.multiple_of = multiple_of
        self.norm_eps = norm_eps
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.flash_attn = flash_attn
        self.rope_theta = rope_theta
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = int(n_shared_experts)
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)
        self.validate_shapes()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate_shapes(self):
        """Raise one ValueError naming the fields of any combination the model cannot be built from."""
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if problems:
            raise ValueError("invalid LMConfig: " + "; ".join(problems))
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim = dim/n_heads = {self.head_dim} is odd (RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.use_moe:
            if self.n_routed_experts < 1:
                problems.append(f"n_routed_experts={self.n_routed_experts} must be >= 1 with use_moe")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                f"[1, n_routed_experts={self.n_routed_experts}]")
            if self.n_shared_experts < 0:
                problems.append(f"n_shared_experts={self.n_shared_experts} must be >= 0")
            if self.scoring_func != "softmax":
                problems.append(f"scoring_func={self.scoring_func!r} is not supported (only 'softmax')")
        if problems:
            raise ValueError("invalid LMConfig: " + "; ".join(problems))
