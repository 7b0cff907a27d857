"""nano-LLM's library: the model, its data, the shared training loop, generation and serving pieces.

A plain package that imports nothing by itself, so the data-only script data_process.py starts without torch:
import what you use from the module that owns it,

    from model.LMConfig import LMConfig      # every architecture knob (edit its defaults to change the model)
    from model.model import Transformer      # importing it registers the model with transformers' Auto classes

docs/architecture.md says which module owns what.
"""
