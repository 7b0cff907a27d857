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
    # `LMConfig` to that submodule, and a property is what still answers with the class. The setter ignores that
    # one binding only; anything else assigned (a user's patched class) is kept and answered from then on.
    @property
    def LMConfig(self):
        if "_assigned_LMConfig" in self.__dict__:
            return self.__dict__["_assigned_LMConfig"]
        from .LMConfig import LMConfig
        return LMConfig

    @LMConfig.setter
    def LMConfig(self, value):
        if isinstance(value, types.ModuleType) and value.__name__ == __name__ + ".LMConfig":
            return
        self.__dict__["_assigned_LMConfig"] = value

    @property
    def Transformer(self):
        from .model import Transformer
        return Transformer

    @property
    def CheckpointMismatchError(self):
        from .model import CheckpointMismatchError
        return CheckpointMismatchError


sys.modules[__name__].__class__ = _Package
