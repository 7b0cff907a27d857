"""
Conversion of a dense nano-LLM Transformer to transformers' LlamaForCausalLM (same math, rotate-half RoPE; the
weights map one-to-one and only the names change). export_model.py writes the result to disk; bench/ and the
tests compare against it in memory.

    from model.llama import to_llama
    llama = to_llama(model)          # LlamaForCausalLM with the same weights and the same logits
"""
from transformers import LlamaConfig, LlamaForCausalLM

from .LMConfig import LMConfig
from .model import Transformer

# our name -> Llama name, per block
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def llama_config(config: LMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def llama_state_dict(model: Transformer) -> dict:
    """Our state dict under Llama's names (the tied output weight is shared, so it is not repeated)."""
    renamed = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight":
            continue
        if name == "tok_embeddings.weight":
            renamed["model.embed_tokens.weight"] = tensor
        elif name == "norm.weight":
            renamed["model.norm.weight"] = tensor
        else:
            _, index, module, rest = name.split(".", 3)  # layers.<i>.<module>.<...>
            ours = f"{module}.{rest}".rsplit(".", 1)[0]
            renamed[f"model.layers.{index}.{LAYER_NAMES[ours]}.weight"] = tensor
    return renamed


def to_llama(model: Transformer) -> LlamaForCausalLM:
    """A LlamaForCausalLM with model's weights (copied into it), in model's dtype. Dense models only: raises
    NotImplementedError for MoE."""
    if model.config.use_moe:
        raise NotImplementedError("exporting an MoE checkpoint to transformers is not supported yet "
                                  "(LlamaForCausalLM has no experts); export a dense model")
    llama = LlamaForCausalLM(llama_config(model.config))
    state = llama_state_dict(model)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: the same tensor under both names
    llama.load_state_dict(state, strict=True)
    llama.tie_weights()
    return llama.to(next(model.parameters()).dtype)
