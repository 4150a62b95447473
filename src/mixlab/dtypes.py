"""The one table of dtype names: what users, TOML files and config.json write ("bfloat16", "bf16")
to a `torch.dtype` (`parse_dtype`), and back (`dtype_name`). The safetensors header names ("BF16")
are that format's own table, `mixlab.checkpoint.io.DTYPES`; GGUF's are in `mixlab.checkpoint.gguf`."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


# What a model's weights may be held in: the named dtypes, and float64 (passed as torch.float64) for
# high-precision comparisons. Not an integer dtype: `load_model(dtype=torch.int8)` would truncate the
# weights (int8 weights are `prepare_for_inference(quant="int8")`'s, with their scales).
WEIGHT_DTYPES = (*dict.fromkeys(DTYPES.values()), torch.float64)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (or a float `torch.dtype`, or None: as stored) as a `torch.dtype`, or ValueError
    naming it."""
    if dtype is None:
        return dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; expected one of "
                             f"{', '.join(map(str, WEIGHT_DTYPES))} (or its name)")
        return dtype
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        quant = " (int8 / int4 weights are a quantisation: --quant, or prepare_for_inference(quant=))"
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}"
                         + (quant if dtype in ("int8", "int4") else "")) from None


def dtype_name(dtype: torch.dtype) -> str:
    """The name config.json and mixlab's settings use: torch's own without the prefix ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def full_name(text: str) -> str:
    """Any spelling of `DTYPES` ("bf16") as its full name ("bfloat16"); other text as it is, for the
    caller's check to name (a --dtype flag and a run's `dtype` setting read the same spellings)."""
    return dtype_name(DTYPES[text]) if text in DTYPES else text
