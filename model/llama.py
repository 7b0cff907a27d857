"""
Conversion of a dense nano-LLM Transformer to transformers' LlamaForCausalLM (same math, rotate-half RoPE; the
weights map one-to-one and only the names change). export_model.py writes the result to disk; bench/ and the
tests compare against it in memory.

    from model.llama import from_llama, to_llama
    llama = to_llama(model)          # LlamaForCausalLM with the same weights and the same logits
    model = from_llama(llama, model.config)   # and back (e.g. after training it in transformers)
"""
import torch
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


def from_llama(llama: LlamaForCausalLM, config: LMConfig) -> Transformer:
    """The inverse of to_llama: a Transformer of config holding llama's weights, e.g. a model trained in
    transformers (python -m bench grpo scores TRL's GRPO result with this project's evaluation). The output layer
    must still be the embedding (tied), as to_llama made it."""
    ours = {llama_name: name for name, llama_name in LAYER_NAMES.items()}
    state = {}
    for name, tensor in llama.state_dict().items():
        if name == "lm_head.weight":
            if not torch.equal(tensor, llama.model.embed_tokens.weight):
                raise ValueError("the Llama model's lm_head is not its embedding; nano-LLM ties them")
        elif name == "model.embed_tokens.weight":
            state["tok_embeddings.weight"] = state["output.weight"] = tensor
        elif name == "model.norm.weight":
            state["norm.weight"] = tensor
        else:
            _, _, index, rest = name.split(".", 3)  # model.layers.<i>.<module>.weight
            state[f"layers.{index}.{ours[rest.rsplit('.', 1)[0]]}.weight"] = tensor
    model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.to(next(llama.parameters()).dtype)
