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
        o = ours.forward_output(tokens)
        logits, routing = o.logits_BTV, o.routing
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    if kind == "mixtral":
        k = ours.config.moe.top_k
        for layer, r in enumerate(routing):
            theirs = torch.topk(out.router_logits[layer].float(), k, dim=-1).indices
            assert torch.equal(r.idx_TK, theirs), f"layer {layer} chose different experts"


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_decoding_matches_transformers(case, tmp_path):
    """The prepared model (native C decoding) against transformers' full forward pass, token by token."""
    from transformers import AutoModelForCausalLM

    from mixlab.cache import KVCache
    from mixlab.generate import decode_step, prefill
    from mixlab.model.inference import prepare_for_inference

    kind, kw = CASES[case]
    path = (hf_mixtral if kind == "mixtral" else hf_mistral)(tmp_path, **kw)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = prepare_for_inference(load_model(path))
    if getattr(ours, "native_decoder", None) is None:
        pytest.skip("native kernels unavailable")
    tokens = torch.randint(0, 128, (1, 20))
    cache = KVCache(ours.config, batch_size=1, max_len=20)
    with torch.no_grad():
        want = ref(tokens).logits[0, 7:19]
        got = [prefill(ours, tokens[:, :8], torch.arange(8)[None], cache, chunk=8)[0]]
        for t in range(8, 19):
            got.append(decode_step(ours, tokens[:, t : t + 1], torch.tensor([[t]]), cache)[0])
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=0)
