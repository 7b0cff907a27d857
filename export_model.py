"""
Export a dense nano-LLM checkpoint as a plain transformers LlamaForCausalLM directory (no custom code), with
the tokenizer files, so llama.cpp converters, vLLM, lm-eval and anything else that reads Llama can take it.

Run as:
    python export_model.py --checkpoint out/dpo_512 --out_dir out/hf_llama
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/hf_llama')"

The weights map one-to-one (same math, rotate-half RoPE); only the names change.
"""
import argparse
import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model import LMConfig, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

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
    if model.config.use_moe:
        raise NotImplementedError("exporting an MoE checkpoint to transformers is not supported yet "
                                  "(LlamaForCausalLM has no experts); export a dense model")
    llama = LlamaForCausalLM(llama_config(model.config))
    state = llama_state_dict(model)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: the same tensor under both names
    llama.load_state_dict(state, strict=True)
    llama.tie_weights()
    return llama.to(next(model.parameters()).dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="nano-LLM checkpoint directory (save_pretrained format)")
    parser.add_argument("--out_dir", required=True, help="where to write the LlamaForCausalLM directory")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="tokenizer files to copy (default: the checkpoint's own, else model/tokenizer)")
    args = parser.parse_args()

    try:
        model = Transformer.from_pretrained(args.checkpoint)
        llama = to_llama(model)
    except (FileNotFoundError, ValueError, NotImplementedError) as err:
        sys.exit(f"export_model.py: {err}")
    llama.save_pretrained(args.out_dir)

    candidates = [args.tokenizer_dir] if args.tokenizer_dir else [
        args.checkpoint, os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "tokenizer")]
    for tokenizer_dir in candidates:
        if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, name)):
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(args.out_dir, name))
            print(f"copied tokenizer from {tokenizer_dir}")
            break
    print(f"exported {args.checkpoint} -> {args.out_dir} (LlamaForCausalLM, "
          f"{sum(p.numel() for p in llama.parameters()) / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
