"""mixlab's inference engine: continuous batching over one model, per-request sampling, streaming.

    from mixlab.engine import Engine, SamplingParams
    with Engine(model, tokenizer) as engine:
        for out in engine.submit(ids, SamplingParams(max_tokens=32, temperature=0.7, seed=1)):
            print(out.text, end="")

`api.py`: the public types; `core.py`: `Engine` (queue, scheduler, sampling, streaming, thread);
`runner.py`: the KV cache of the running sequences and the forward pass of a step;
`sampling.py`: logits to tokens and logprobs; `structured.py`: `Structured` outputs (JSON, schema,
regex, choice, grammar) as token masks, with llguidance.
"""

from mixlab.engine.api import Handle, QueueFull, RequestOutput, SamplingParams
from mixlab.engine.core import Engine
from mixlab.engine.structured import Structured

__all__ = ["Engine", "Handle", "QueueFull", "RequestOutput", "SamplingParams", "Structured"]
