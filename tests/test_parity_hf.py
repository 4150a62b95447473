"""mixlab's logits and expert choices equal transformers' on checkpoints transformers wrote."""

import pytest
import torch

from conftest import hf_mistral, hf_mixtral
from mixlab import load_model

CASES = {
    "mixtral-8e-top2": ("mixtral", {"num_local_experts": 8}),
    "mixtral-4e-top1": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 1}),
    "mixtral-window": ("mixtral", {"sliding_window": 6, "num_local_experts": 8}),
    "mixtral-mha-3layers": ("mixtral", {"num_key_value_heads": 4, "num_hidden_layers": 3, "hidden_size": 96,
                                       "head_dim": 16}),
    "mistral-window": ("mistral", {}),
    "mistral-no-window": ("mistral", {"sliding_window": None, "num_key_value_heads": 1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_experts_match_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM

    kind, kw = CASES[case]
    path = (hf_mixtral if kind == "mixtral" else hf_mistral)(tmp_path, **kw)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path)
    tokens = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        out = ref(tokens, output_router_logits=kind == "mixtral")
        logits, routing = ours(tokens, return_routing=True)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    if kind == "mixtral":
        k = ours.config.moe.top_k
        for layer, r in enumerate(routing):
            theirs = torch.topk(out.router_logits[layer].float(), k, dim=-1).indices
            assert torch.equal(r.idx_TK, theirs), f"layer {layer} chose different experts"
