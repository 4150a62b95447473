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


def test_padded_batch_hidden_states_attentions_and_router_logits_match_transformers(tmp_path):
    """A left- and a right-padded row (positions -1 against transformers' attention_mask): on the real
    tokens, each layer's residual stream (`hidden_states=True`, transformers' output_hidden_states),
    its attention weights (`attentions=True`, output_attentions under eager attention), the router
    logits and the logits equal transformers'."""
    from transformers import AutoModelForCausalLM

    path = hf_mixtral(tmp_path, num_hidden_layers=3, sliding_window=5)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_model(path)
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, -1)
    with torch.no_grad():
        out = ref(tokens, attention_mask=mask, output_router_logits=True, output_hidden_states=True,
                  output_attentions=True)
        o = ours.forward_output(tokens, positions_BT=positions, hidden_states=True, attentions=True)
    real = mask.bool()
    assert len(o.hidden_states) == len(out.hidden_states) == 4
    for layer, (h, theirs) in enumerate(zip(o.hidden_states[:-1], out.hidden_states[:-1], strict=True)):
        torch.testing.assert_close(h[real], theirs[real], atol=1e-5, rtol=0, msg=f"hidden state {layer}")
    torch.testing.assert_close(o.hidden_BTD[real], out.hidden_states[-1][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(o.hidden_states[-1]), o.hidden_BTD, atol=0, rtol=0)
    for layer, r in enumerate(o.routing):
        torch.testing.assert_close(r.logits_TE[real.reshape(-1)], out.router_logits[layer][real.reshape(-1)],
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(o.logits_BTV[real], out.logits[real], atol=1e-4, rtol=0)
    for layer, (a, theirs) in enumerate(zip(o.attentions, out.attentions, strict=True)):  # [B, H, T, S]
        assert a.shape == theirs.shape == (3, 4, 12, 12)
        torch.testing.assert_close(a.transpose(1, 2)[real], theirs.transpose(1, 2)[real], atol=1e-6, rtol=0,
                                   msg=f"attention weights {layer}")
    plain = ours.forward_output(tokens)
    assert plain.hidden_states is None and plain.attentions is None  # only when asked for


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


def test_training_gradients_match_transformers(tmp_path):
    """One MoE layer: mixlab's loss (cross-entropy + c x load balancing) and its gradients equal
    transformers' with router_aux_loss_coef = c / K (its load-balancing value is K times mixlab's,
    docs/training.md), for every weight, the router's included."""
    from transformers import AutoModelForCausalLM

    from mixlab.train.losses import lm_loss, router_losses

    c, K = 0.5, 2
    path = hf_mixtral(tmp_path, num_hidden_layers=1, router_aux_loss_coef=c / K, initializer_range=0.2)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    ours = load_model(path).train()
    tokens = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    out = ref(tokens, labels=tokens, output_router_logits=True)
    out.loss.backward()
    o = ours.forward_output(tokens)  # the router losses over all 20 tokens, as transformers'
    loss = lm_loss(o.logits_BTV[:, :-1], tokens[:, 1:]) + c * router_losses(o.routing)[0]
    assert abs(float(router_losses(o.routing)[0]) - 1.0) > 1e-3  # not at the uniform minimum
    loss.backward()
    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=1e-6)
    pairs = {"tok_embeddings.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "layers.0.ffn.gate.weight": "model.layers.0.mlp.gate.weight",
             "layers.0.attn.wo.weight": "model.layers.0.self_attn.o_proj.weight"}
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if n in pairs:
            g = theirs[pairs[n]].grad
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=n)
    norm = [torch.sqrt(sum(p.grad.square().sum() for p in m.parameters() if p.grad is not None)) for m in (ours, ref)]
    torch.testing.assert_close(norm[0], norm[1], rtol=1e-5, atol=0)


def test_tied_config_with_a_different_head_in_the_files_is_refused(tmp_path):
    """tie_word_embeddings true and an lm_head.weight in the files: an equal copy loads as tied (transformers'
    logits); a different one was silently dropped, while transformers 5 uses it (logits off by ~30), so it
    is refused by name; with the field set to false, the head is used, as transformers does."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from mixlab import CheckpointError

    path = hf_mistral(tmp_path, tie_word_embeddings=True)
    state = load_file(path / "model.safetensors")
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for head, refused in ((state["model.embed_tokens.weight"].clone(), False),
                          (torch.randn(state["model.embed_tokens.weight"].shape), True)):
        save_file({**state, "lm_head.weight": head}, str(path / "model.safetensors"), metadata={"format": "pt"})
        if refused:
            with pytest.raises(CheckpointError, match=r"model\.safetensors: config field 'tie_word_embeddings' is "
                                                      r"true, but tensor 'lm_head\.weight' differs"):
                load_model(path)
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
        ours = load_model(path)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours.forward_output(tokens).logits_BTV, ref(tokens).logits, atol=1e-5, rtol=0)
        assert (ours.output.weight is ours.tok_embeddings.weight) != refused
    # a head of another shape than the embeddings (no head of this model) was dropped without a word
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    save_file({**state, "lm_head.weight": torch.zeros(3, 5)}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: config field 'tie_word_embeddings' is true, but "
                                              r"tensor 'lm_head\.weight' has shape \[3, 5\], not the embeddings' "
                                              r"\[128, \d+\]$"):
        load_model(path)


def test_swish_is_silu(tmp_path):
    """hidden_act "swish" is transformers' other name for SiLU: it was refused ("only 'silu' is supported")."""
    from transformers import AutoModelForCausalLM

    path = hf_mistral(tmp_path, hidden_act="swish")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).forward_output(tokens).logits_BTV, ref(tokens).logits,
                                   atol=1e-5, rtol=0)


def _llama_with_eos_list(tmp_path):
    """A tiny transformers Llama whose eos_token_id is a list (as Llama 3 Instruct's) and whose greedy
    continuation of `prompt` reaches the list's second id at its third new token; the folder, the
    prompt, the list."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       bos_token_id=1, eos_token_id=2)).eval()
    prompt = [1, 17, 40, 99, 5]
    with torch.no_grad():
        free = ref.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    second = free[2]
    assert second not in free[:2], free  # the seed gives a continuation that reaches it only there
    first, third = [i for i in range(3, 128) if i not in free][:2]  # ids the continuation does not reach
    eos = [first, second, third]
    ref.config.eos_token_id = ref.generation_config.eos_token_id = eos
    ref.save_pretrained(tmp_path)
    return tmp_path, prompt, eos


def test_every_id_of_an_eos_token_id_list_ends_generation_as_in_transformers(tmp_path):
    """Llama 3 Instruct's eos_token_id [128001, 128008, 128009]: transformers stops at any of them;
    mixlab kept the first alone, so a chat reply ran on past <|eot_id|>."""
    from transformers import AutoModelForCausalLM

    from mixlab import generate
    from mixlab.engine import Engine, SamplingParams

    path, prompt, eos = _llama_with_eos_list(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert theirs[-1] == eos[1] and len(theirs) == 3
    ours = load_model(path)
    assert generate(ours, [prompt], max_new_tokens=12) == [theirs]
    engine = Engine(ours)
    h = engine.submit(prompt, SamplingParams(max_tokens=12))
    engine.run_until_idle()
    outs = list(h)
    assert [o.token_id for o in outs] == theirs and outs[-1].finish_reason == "stop"
    assert outs[-1].stop_reason is None  # EOS, as the first id is
    h = engine.submit(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    engine.run_until_idle()
    assert len(list(h)) == 12  # ignore_eos: none of them ends it
    h = engine.submit(prompt, SamplingParams(max_tokens=12, min_tokens=4))
    engine.run_until_idle()
    assert [o.token_id for o in h][2] != eos[1]  # min_tokens holds back every EOS id
    # speculative decoding: prompt lookup drafts the second id and more after the first new token; the
    # second is accepted and ends the output (it went on through the draft's 7, 8)
    h = engine.submit([*prompt, *theirs, 7, 8, *prompt, theirs[0]], SamplingParams(max_tokens=12, speculative_tokens=4))
    engine.run_until_idle()
    assert [o.token_id for o in h] == theirs[1:] and engine.stats()["accepted_tokens"] == 1


def test_an_eos_token_id_list_round_trips_through_save_model_and_transformers(tmp_path):
    from transformers import AutoConfig

    from mixlab import save_model

    path, _, eos = _llama_with_eos_list(tmp_path / "hf")
    save_model(load_model(path), tmp_path / "ours")
    assert AutoConfig.from_pretrained(tmp_path / "ours").eos_token_id == eos  # it wrote the first alone
    again = load_model(tmp_path / "ours").config
    assert again.eos_id == eos[0] and again.to_hf_dict()["eos_token_id"] == eos


def _greedy_everywhere(path, prompt, n=12):
    """Greedy continuations of `prompt` by transformers' generate and mixlab's generate and engine."""
    from transformers import AutoModelForCausalLM

    from mixlab import generate
    from mixlab.engine import Engine, SamplingParams

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    ours = load_model(path)
    engine = Engine(ours)
    h = engine.submit(prompt, SamplingParams(max_tokens=n))
    engine.run_until_idle()
    return theirs, generate(ours, [prompt], max_new_tokens=n)[0], [o.token_id for o in h]


@pytest.mark.parametrize("config_eos", ["first", "list"])
def test_generation_config_eos_ids_end_generation_as_in_transformers(config_eos, tmp_path):
    """transformers' generate takes eos_token_id from generation_config.json in place of config.json's: Llama 3
    Instruct's config.json names <|end_of_text|> alone and its generation_config.json adds <|eot_id|>. mixlab
    read config.json alone, so a reply ran past the list's second id ("first"), or stopped at an id of
    config.json's list that generation_config.json leaves out ("list")."""
    import json

    path, prompt, eos = _llama_with_eos_list(tmp_path)
    free, _, _ = _greedy_everywhere(path, prompt, n=2)  # eos[1] comes third
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = eos[0] if config_eos == "first" else [eos[0], free[1]]
    (path / "config.json").write_text(json.dumps(cfg))
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == eos
    theirs, ours, engine = _greedy_everywhere(path, prompt)
    assert len(theirs) == 3 and theirs[-1] == eos[1]
    assert ours == engine == theirs
    assert load_model(path).config.to_hf_dict()["eos_token_id"] == cfg["eos_token_id"]  # config.json's, as read


def test_a_bad_generation_config_is_named(tmp_path):
    from mixlab.checkpoint import CheckpointError

    path = hf_mistral(tmp_path)
    for text, match in [("{not json", "not valid JSON"), ('{"eos_token_id": "2"}', "field 'eos_token_id' must be"),
                        ('{"eos_token_id": [2, 1.5]}', "field 'eos_token_id' must be"),
                        ('{"eos_token_id": []}', "non-empty list"),
                        ('{"eos_token_id": [2, 128]}', r"in \[0, vocab_size=128\), got \[2, 128\]")]:
        (path / "generation_config.json").write_text(text)
        with pytest.raises(CheckpointError, match=rf"^{path / 'generation_config.json'}: .*{match}") as e:
            load_model(path)
        assert "\n" not in str(e.value)
    (path / "generation_config.json").write_text('{"eos_token_id": null, "do_sample": true}')
    assert load_model(path).config.eos_ids == (2,)  # no field: config.json's (transformers' stops at none)
    (path / "generation_config.json").write_text('{"eos_token_id": 5}')
    assert load_model(path).config.eos_ids == (5,)  # an id in place of config.json's, as transformers takes it


def test_save_model_keeps_generation_config_eos_ids(tmp_path):
    """A model loaded with generation_config.json's EOS ids and saved by `save_model` (no side files copied)
    writes them to its own generation_config.json, where transformers and `load_model` read them back: before,
    the folder stopped at config.json's id alone."""
    import json

    from transformers import GenerationConfig

    from mixlab import save_model

    path, _, eos = _llama_with_eos_list(tmp_path / "src")
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = eos[0]
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(path)
    assert model.config.eos_ids == tuple(eos)
    save_model(model, tmp_path / "out")
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == eos
    assert load_model(tmp_path / "out").config.eos_ids == tuple(eos)
    save_model(model, tmp_path / "copied", copy_files=[path / "generation_config.json"])  # the file itself wins
    copied = (tmp_path / "copied" / "generation_config.json").read_bytes()
    assert copied == (path / "generation_config.json").read_bytes()
