"""nano-LLM model package: config, Transformer, datasets, shared trainer.

Importing it registers the model with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works in-process.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .LMConfig import LMConfig
from .model import CheckpointMismatchError, Transformer

AutoConfig.register(LMConfig.model_type, LMConfig, exist_ok=True)
AutoModelForCausalLM.register(LMConfig, Transformer, exist_ok=True)

__all__ = ["LMConfig", "Transformer", "CheckpointMismatchError"]
