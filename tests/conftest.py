"""Shared fixtures: tiny configs, seeded RNG, and checkpoints written by transformers."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


def hf_mixtral(tmp: Path, **kw: object) -> Path:
    """Save a random transformers Mixtral (float32) and return its folder."""
    from transformers import MixtralConfig, MixtralForCausalLM

    args: dict[str, object] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    )
    args.update(kw)
    torch.manual_seed(1)
    model = MixtralForCausalLM(MixtralConfig(**args)).eval()
    model.save_pretrained(tmp)
    return tmp


def hf_mistral(tmp: Path, **kw: object) -> Path:
    """Save a random transformers Mistral (float32, dense) and return its folder."""
    from transformers import MistralConfig, MistralForCausalLM

    args: dict[str, object] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=256,
    )
    args.update(kw)
    torch.manual_seed(2)
    model = MistralForCausalLM(MistralConfig(**args)).eval()
    model.save_pretrained(tmp)
    return tmp
