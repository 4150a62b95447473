"""mixlab: Mixtral-style sparse Mixture-of-Experts models, exact, fast and readable.

    import mixlab
    model = mixlab.load_model("path/to/checkpoint", dtype="bfloat16")
    tok = mixlab.load_tokenizer()
    out = mixlab.generate(model, [tok.encode("Hello")], max_new_tokens=32)
    print(tok.decode(out[0]))
"""

from mixlab.checkpoint import CheckpointError, load_model, save_model
from mixlab.config import PRESETS, ConfigError, ModelConfig, MoEConfig, get_preset
from mixlab.model import Transformer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "MoEConfig",
    "Transformer",
    "get_preset",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"
