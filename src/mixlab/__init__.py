"""mixlab: Mixtral-style sparse Mixture-of-Experts models, exact, fast and readable.

    import mixlab
    model = mixlab.load_model("path/to/checkpoint", dtype="bfloat16")
    tok = mixlab.load_tokenizer()
    out = mixlab.generate(model, [tok.encode("Hello")], max_new_tokens=32)
    print(tok.decode(out[0]))
"""

from mixlab.checkpoint import CheckpointError, from_state_dict, load_model, save_model, to_state_dict
from mixlab.config import PRESETS, ConfigError, ModelConfig, MoEConfig, get_preset
from mixlab.errors import DataError, GenerationError, MixlabError, OutputError, TrainingError
from mixlab.generate import generate, generate_stream
from mixlab.model import Transformer
from mixlab.tokenizer import Tokenizer, load_tokenizer

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
