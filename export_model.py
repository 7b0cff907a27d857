"""
Export a dense nano-LLM checkpoint as a plain transformers LlamaForCausalLM directory (no custom code), with
the tokenizer files: it loads in transformers (AutoModelForCausalLM / AutoTokenizer) with no nano-LLM code.
With --gguf it writes one GGUF file for llama.cpp / ollama instead (model/gguf_export.py; the tokenizer must
use the qwen2 pre-tokenizer, as every tokenizer train_tokenizer.py writes does: the shipped one, the demo's).

Run as:
    python export_model.py --out_dir out/hf_llama       # the newest chat model (e.g. out/demo/dpo after make demo)
    python export_model.py --checkpoint out/dpo_512 --out_dir out/hf_llama
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/hf_llama')"
    python export_model.py --checkpoint out/dpo_512 --gguf out/nano-llm-f16.gguf [--outtype f32|f16|q8_0]

The weights map one-to-one (same math, rotate-half RoPE); only the names change (model/llama.py).
A LoRA run directory is exported merged: its (checked) base with the adapter folded into the weights.
"""
import argparse
import os
import sys

import torch

from model.model import Transformer
from model import lora
from model.checkpoint import copy_tokenizer, load_init_model, tokenizer_dir_for
from model.evaluate import resolve_checkpoint
from model.llama import to_llama
from model.errors import StageError
from model.stages import CHAT_STAGES, PRETRAIN_STAGES



def export_gguf_file(model, args, tokenizer_dir):
    from model.gguf_export import export_gguf
    size = export_gguf(model, tokenizer_dir, args.gguf, args.outtype)
    print(f"exported {args.checkpoint} -> {args.gguf} (GGUF llama, {args.outtype}, tokenizer from {tokenizer_dir}, "
          f"{size / 2**20:.1f} MiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="nano-LLM run directory (default: the newest chat model, "
                        "as 2-eval.py finds it, else the newest pretrained one)")
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
        args.checkpoint = resolve_checkpoint(args.checkpoint, CHAT_STAGES + PRETRAIN_STAGES)
        tokenizer_dir = tokenizer_dir_for(args, args.checkpoint)
        if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
            raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}; pass --tokenizer_dir")
        model = load_init_model(args.checkpoint, {}) if lora.is_adapter_dir(args.checkpoint) else \
            Transformer.from_pretrained(args.checkpoint)
        if args.gguf:
            export_gguf_file(model, args, tokenizer_dir)
            if not args.out_dir:
                return
        llama = to_llama(model)
    except (FileNotFoundError, ValueError, NotImplementedError, StageError) as err:
        sys.exit(f"export_model.py: {err}")
    llama.save_pretrained(args.out_dir)

    copy_tokenizer(tokenizer_dir, args.out_dir)
    print(f"copied tokenizer from {tokenizer_dir}")
    print(f"exported {args.checkpoint} -> {args.out_dir} (LlamaForCausalLM, "
          f"{sum(p.numel() for p in llama.parameters()) / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
