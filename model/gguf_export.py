"""
Write a dense nano-LLM Transformer + its tokenizer as one GGUF file for llama.cpp (llama-cli, llama-server,
llama-cpp-python, ollama), with the `gguf` package. export_model.py --gguf is the command-line entry point.

    from model.gguf_export import export_gguf
    export_gguf(model, "model/tokenizer", "out/model-f16.gguf", outtype="f16")

The model is llama.cpp's "llama" architecture as-is (pre-norm RMSNorm, SwiGLU, GQA, rotate-half RoPE, tied
embeddings: with no output.weight llama.cpp reuses token_embd). Tensors are named and laid out as
llama.cpp's convert_hf_to_gguf.py writes a Hugging Face Llama, including its q/k row permutation (llama.cpp
rotates adjacent pairs; our RoPE, like HF Llama's, rotates the two halves of each head).

The tokenizer goes in as a "gpt2" (byte-level BPE) vocabulary with pre-tokenizer "qwen2": llama.cpp has no way
to take an arbitrary split regex, so only a tokenizer.json whose pre-tokenisation is exactly one llama.cpp
implements is accepted (every tokenizer train_tokenizer.py writes: the shipped one, the demo's).
"""
import json
import os

import numpy as np
import torch

OUTTYPES = ("f32", "f16", "q8_0")

# tokenizer.json split regex -> llama.cpp pre-tokenizer name (llama.cpp src/llama-vocab.cpp lists the regex per
# name; these are the originals its comments quote, which is what a Hugging Face tokenizer.json holds).
LLAMA_CPP_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}

# our parameter name -> llama.cpp tensor name, per block
BLOCK_TENSORS = {
    "attention_norm": "attn_norm",
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down",
}


def permute_for_llama_cpp(weight, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: reorder each head's output rows from rotate-half order
    (pairs (i, i + d/2)) to the interleaved order llama.cpp's RoPE rotates (pairs (2i, 2i + 1))."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_cpp_tensors(model):
    """(name, float32 numpy array) in llama.cpp's naming and layout; the tied output weight is not repeated."""
    config = model.config
    if config.use_moe:
        raise NotImplementedError("exporting an MoE checkpoint to GGUF is not supported yet; export a dense model")
    out = []
    for name, tensor in model.state_dict().items():
        if name == "output.weight":
            continue  # tied to tok_embeddings: llama.cpp uses token_embd when output.weight is absent
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if name == "tok_embeddings.weight":
            out.append(("token_embd.weight", array))
        elif name == "norm.weight":
            out.append(("output_norm.weight", array))
        else:
            _, index, module, rest = name.split(".", 3)  # layers.<i>.<module>.<...>
            ours = f"{module}.{rest}".rsplit(".", 1)[0]
            if ours == "attention.wq":
                array = permute_for_llama_cpp(array, config.n_heads)
            elif ours == "attention.wk":
                array = permute_for_llama_cpp(array, config.n_kv_heads)
            out.append((f"blk.{index}.{BLOCK_TENSORS[ours]}.weight", array))
    return out


def llama_cpp_pre_tokenizer(tokenizer_json):
    """The llama.cpp pre-tokenizer name equivalent to this tokenizer.json, or ValueError saying why none is."""
    fix = "retrain it with train_tokenizer.py, then retrain the model"
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("ignore_merges") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"only a plain byte-level BPE tokenizer exports to GGUF; {fix}")
    if tokenizer_json.get("normalizer") is not None:
        raise ValueError(f"the tokenizer has a normalizer, which llama.cpp would not apply; {fix}")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex") and not steps[1].get("add_prefix_space"):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in LLAMA_CPP_PRE_TOKENIZERS:
            return LLAMA_CPP_PRE_TOKENIZERS[regex]
    raise ValueError(f"the tokenizer's pre-tokenizer is not one llama.cpp implements (e.g. a demo run made before "
                     f"the demo's tokenizer split like Qwen2: run the demo again); {fix}")


def load_tokenizer_files(tokenizer_dir):
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer_json = json.load(f)
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    return tokenizer_json, config


def add_tokenizer(writer, tokenizer_dir, vocab_size):
    import gguf
    tokenizer_json, config = load_tokenizer_files(tokenizer_dir)
    pre = llama_cpp_pre_tokenizer(tokenizer_json)
    vocab = dict(tokenizer_json["model"]["vocab"])
    special = {}
    for added in tokenizer_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = added.get("special", False)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{tokenizer_dir}: token ids are not 0..{len(vocab) - 1}")
    if len(vocab) != vocab_size:
        raise ValueError(f"{tokenizer_dir}: {len(vocab)} tokens but the model's vocab_size is {vocab_size}")
    tokens = [None] * len(vocab)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    token_type = gguf.TokenType
    types = [token_type.CONTROL if special.get(i) else token_type.USER_DEFINED if i in special else token_type.NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]

    def token_id(key, default):
        name = config.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        return vocab.get(name, default) if name else default

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(token_id("bos_token", 1))
    writer.add_eos_token_id(token_id("eos_token", 2))
    writer.add_unk_token_id(token_id("unk_token", 0))
    writer.add_pad_token_id(token_id("pad_token", 0))
    # the data pipeline and the chat template write <s> themselves: nothing is added on encode
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(config.get("add_eos_token", False)))
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def export_gguf(model, tokenizer_dir, path, outtype="f16", name="nano-LLM"):
    """Write model (dense Transformer) and the tokenizer in tokenizer_dir to path. outtype: f32 (exact), f16, or
    q8_0 (2-D weights quantized; norms stay f32, as llama.cpp's converter does). Returns the file size."""
    import gguf
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    tensors = llama_cpp_tensors(model)  # refuses MoE before anything is written
    config = model.config
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = gguf.GGUFWriter(path + ".tmp", "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer_dir, config.vocab_size)

    for tensor_name, array in tensors:
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, array)  # norms: always f32
            continue
        try:
            data, data_qtype = gguf.quants.quantize(array, qtype), qtype
        except gguf.QuantError:  # q8_0 needs rows that are a multiple of 32 values: fall back as the converter does
            data, data_qtype = gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), \
                gguf.GGMLQuantizationType.F16
        writer.add_tensor(tensor_name, data, raw_dtype=data_qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(path + ".tmp", path)
    return os.path.getsize(path)


def gguf_chat_template(path):
    """The chat template stored in a GGUF file (for checks; llama.cpp reads it itself)."""
    import gguf
    return gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
