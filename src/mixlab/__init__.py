"""mixlab: Mixtral-style sparse Mixture-of-Experts models, exact, fast and readable.

    import mixlab
    model = mixlab.load_model("path/to/checkpoint", dtype="bfloat16")
    tok = mixlab.load_tokenizer()
    out = mixlab.generate(model, [tok.encode("Hello")], max_new_tokens=32)
    print(tok.decode(out[0]))
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mixlab.checkpoint import CheckpointError, from_state_dict, load_model, save_model, to_state_dict
    from mixlab.config import PRESETS, ConfigError, ModelConfig, MoEConfig, get_preset
    from mixlab.errors import DataError, GenerationError, MixlabError, OutputError, TrainingError
    from mixlab.generate import generate, generate_stream
    from mixlab.model import Transformer
    from mixlab.tokenizer import Tokenizer, load_tokenizer

# The API's names are imported on first use (PEP 562), from the first of these modules that holds
# them: `import mixlab` does not wait seconds for torch, so the `mixlab` command (mixlab.cli, inside
# this package) runs, with its Ctrl-C handler, before torch loads.
_MODULES = ("mixlab.errors", "mixlab.config", "mixlab.checkpoint", "mixlab.generate",
            "mixlab.model", "mixlab.tokenizer")

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GenerationError",
    "MixlabError",
    "OutputError",
    "TrainingError",
    "ModelConfig",
    "MoEConfig",
    "Tokenizer",
    "Transformer",
    "from_state_dict",
    "generate",
    "generate_stream",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "save_model",
    "to_state_dict",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in __all__:  # a submodule (`from mixlab import atomic`) is then imported as usual
        raise AttributeError(f"module 'mixlab' has no attribute {name!r}")
    module = next(m for m in map(importlib.import_module, _MODULES) if name in vars(m))
    value = globals()[name] = vars(module)[name]
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds a submodule to its name in the package once it loads: the submodule
        # mixlab.generate would then hide the function mixlab.generate, as the eager import hid it.
        if not (name in __all__ and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
