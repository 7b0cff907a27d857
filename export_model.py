"""
Export a dense nano-LLM checkpoint as a plain transformers LlamaForCausalLM directory (no custom code), with
the tokenizer files: it loads in transformers (AutoModelForCausalLM / AutoTokenizer) with no nano-LLM code.
With --gguf it writes one GGUF file for llama.cpp / ollama instead (model/gguf_export.py; the tokenizer must
use the qwen2 pre-tokenizer, as every tokenizer train_tokenizer.py writes does: the shipped one, the demo's).

Run as:
    python export_model.py --checkpoint out/dpo_512 --out_dir out/hf_llama
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/hf_llama')"
    python export_model.py --checkpoint out/dpo_512 --gguf out/nano-llm-f16.gguf [--outtype f32|f16|q8_0]

The weights map one-to-one (same math, rotate-half RoPE); only the names change (model/llama.py).
A LoRA run directory is exported merged: its (checked) base with the adapter folded into the weights.
"""
import argparse
import os
import shutil
import sys

import torch

from model import Transformer
from model import lora
from model.checkpoint import load_init_model
from model.llama import to_llama
from model.runtime import StageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export_gguf_file(model, args):
    from model.gguf_export import export_gguf
    tokenizer_dir = args.tokenizer_dir or next(
        (d for d in (args.checkpoint, os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", "tokenizer"))
         if os.path.isfile(os.path.join(d, "tokenizer.json"))), None)
    if tokenizer_dir is None:
        raise FileNotFoundError(f"no tokenizer.json in {args.checkpoint} or model/tokenizer; pass --tokenizer_dir")
    size = export_gguf(model, tokenizer_dir, args.gguf, args.outtype)
    print(f"exported {args.checkpoint} -> {args.gguf} (GGUF llama, {args.outtype}, tokenizer from {tokenizer_dir}, "
          f"{size / 2**20:.1f} MiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="nano-LLM checkpoint directory (save_pretrained format)")
    parser.add_argument("--out_dir", default=None, help="where to write the LlamaForCausalLM directory")
    parser.add_argument("--gguf", default=None, metavar="PATH",
                        help="write a GGUF file for llama.cpp / ollama to PATH (with or instead of --out_dir)")
    parser.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16",
                        help="GGUF weight type: f32 exact, f16 (default, as llama.cpp's converter), q8_0 smallest")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="tokenizer files to copy (default: the checkpoint's own, else model/tokenizer)")
    args = parser.parse_args()
    if not args.out_dir and not args.gguf:
        parser.error("give --out_dir (transformers directory) and/or --gguf PATH (llama.cpp file)")

    try:
        model = load_init_model(args.checkpoint, {}) if lora.is_adapter_dir(args.checkpoint) else \
            Transformer.from_pretrained(args.checkpoint)
        if args.gguf:
            export_gguf_file(model, args)
            if not args.out_dir:
                return
        llama = to_llama(model)
    except (FileNotFoundError, ValueError, NotImplementedError, StageError) as err:
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
