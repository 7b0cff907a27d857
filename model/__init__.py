"""nano-LLM model package: config, Transformer, datasets, shared trainer.

LMConfig and Transformer (and with them torch and transformers, seconds to import) load on first use, so the
data-only script data_process.py starts at once. Loading them registers the model with transformers' Auto
classes: after `from model import Transformer`, `AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works
in-process.
"""
import sys
import types

__all__ = ["LMConfig", "Transformer", "CheckpointMismatchError"]


class _Package(types.ModuleType):
    # Properties, not a module __getattr__: importing the submodule model/LMConfig.py binds the package's name
    # `LMConfig` to that submodule, and a property is what still answers with the class (the setter drops it).
    @property
    def LMConfig(self):
        from .LMConfig import LMConfig
        return LMConfig

    @LMConfig.setter
    def LMConfig(self, submodule):
        pass

    @property
    def Transformer(self):
        from .model import Transformer
        return Transformer

    @property
    def CheckpointMismatchError(self):
        from .model import CheckpointMismatchError
        return CheckpointMismatchError


sys.modules[__name__].__class__ = _Package
