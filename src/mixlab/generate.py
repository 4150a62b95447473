"""Generation: prefill and decode with a KV cache, sampling, stop conditions, streaming.

A batch of prompts of different lengths is left-padded: padding slots get position -1, which the
model's attention mask hides, so every prompt sees exactly its own tokens (what transformers does
with an attention mask). The prompt is prefilled in chunks of at most `prefill_chunk` tokens
(bounding activation memory, and required by the rolling cache of sliding-window models); then
each step feeds one token per prompt through `decode_step`, the one seam a faster decoder
(CUDA graphs, torch.compile, speculative decoding) replaces.

Every argument is checked before any compute, so a bad value fails at once with its name.

Shape legend: B batch (prompts), T tokens, V vocabulary, L MoE layers, K experts per token.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from mixlab.cache import KVCache
from mixlab.engine import Engine, Handle, RequestOutput, SamplingParams
from mixlab.engine.api import _int, _is_array, _number
from mixlab.engine.runner import bytes_per_token
from mixlab.engine.sampling import Sampler, greedy_token, penalize, seed_generator
from mixlab.errors import GenerationError
from mixlab.model import Transformer, check_model
from mixlab.model.native import shared_decoder
from mixlab.ops import registry
from mixlab.tokenizer import check_text, check_tokenizer

if TYPE_CHECKING:
    from mixlab.engine import Structured
    from mixlab.tokenizer import StreamDecoder, Tokenizer

__all__ = ["Sampler", "Step", "decode_step", "generate", "generate_stream", "greedy_step", "prefill"]


@dataclass
class Step:
    """One decoding step: the new token of each prompt (None once that prompt has stopped) and,
    when asked (`record_experts`), the experts `[B, L, K]` each MoE layer sent that token to as it ran
    through the model (a token runs in the forward pass after the one that predicted it, so such a
    step comes one forward pass later, and the last runs once more for them). With a tokenizer (and
    without `cache=`), `text`: the text each token completes, as the engine streams it: a stop string
    and what follows it in its token are left out (OpenAI's convention, the server's), text that may
    begin one held until it cannot; the text still held when a structured output ends before a token
    its constraint refused comes with no token (None)."""

    tokens: list[int | None]
    experts_BLK: torch.Tensor | None = None
    text: list[str] | None = None


def _forward(
    model: Transformer, tokens_BT: torch.Tensor, positions_BT: torch.Tensor, cache: KVCache, record_experts: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last-position logits `[B, V]` (float32) and, optionally, that position's experts `[B, L, K]`."""
    B = tokens_BT.shape[0]
    # Only the last position's output is needed: the last layer's feed-forward block and the output
    # projection run for it alone.
    out = model.forward_output(tokens_BT, positions_BT=positions_BT, cache=cache, logits=False, last_only=True)
    h_BTD, routings = out.hidden_BTD, out.routing
    experts_BLK = None
    if record_experts and routings:
        experts_BLK = torch.stack([r.idx_TK.view(B, -1, r.idx_TK.shape[-1])[:, -1] for r in routings], dim=1)
    return model.output(h_BTD[:, -1]).float(), experts_BLK


@torch.no_grad()
def prefill(
    model: Transformer, tokens_BT: torch.Tensor, positions_BT: torch.Tensor, cache: KVCache, *,
    chunk: int, record_experts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write the (left-padded) prompts into `cache` in chunks; return the last position's logits.
    No autograd, as in `decode_step` (so `greedy_step`): with grad mode on, each call's cache writes
    chained onto the last, and a decoding loop kept every step's activations alive."""
    _check_cache(model, cache)
    T = tokens_BT.shape[1]
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    for s in range(0, T, chunk):
        out = _forward(model, tokens_BT[:, s : s + chunk], positions_BT[:, s : s + chunk], cache, record_experts)
    assert out is not None
    return out


@torch.no_grad()
def decode_step(
    model: Transformer, tokens_B1: torch.Tensor, positions_B1: torch.Tensor, cache: KVCache, *,
    record_experts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed one token per prompt; return next-token logits `[B, V]` (float32) and optional experts.

    A model prepared for CPU inference decodes a single prompt through its native kernels
    (`mixlab.model.native`) when the kernel registry chooses them; everything else runs the PyTorch
    forward pass, the reference the kernels are tested against (~10x slower on CPU: a decoding loop
    of one's own over a model not prepared takes `greedy_step`, native either way)."""
    logits_BV, experts_BLK, _ = _step_top(model, tokens_B1, positions_B1, cache, record_experts)
    return logits_BV, experts_BLK


@torch.no_grad()
def greedy_step(model: Transformer, token: int, position: int, cache: KVCache) -> int:
    """One greedy decoding step of one sequence: feed `token` at `position` (written into `cache`,
    batch 1) and return the next token, the argmax of the next-token logits (the first index on
    ties; GenerationError when they hold NaN). What `decode_step` and an argmax do, for a decoding
    loop of its own: the native decoder finds the argmax as its threads write the logits, instead of
    Python reading them again (~45 us per token, ~2% of an int4 step). A model not prepared for
    inference decodes natively too, from its own weights, as `generate` does (`shared_decoder`,
    which checks each call that the weights have not changed: ~0.1 ms)."""
    _check_cache(model, cache)
    dec = model.native_decoder
    if dec is None and cache.pos_BC.device.type == "cpu" and not torch.compiler.is_compiling():
        registry.prepare_native()  # loads the kernels (building them once), as the engine does
        dec = shared_decoder(model)
    if dec is not None and dec.chooses(1, cache.pos_BC.device.type) and dec.accepts_cache(cache):
        logits_1V, _, top = dec.step_top(token, position, cache)
    else:
        device = cache.pos_BC.device
        logits_1V, _ = decode_step(model, torch.tensor([[token]], device=device),
                                   torch.tensor([[position]], device=device), cache)
        top = None
    return top if top is not None else greedy_token(logits_1V)


def _step_top(
    model: Transformer, tokens_B1: torch.Tensor, positions_B1: torch.Tensor, cache: KVCache, record_experts: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """`decode_step`, also returning the greedy token when the native step computed it."""
    _check_cache(model, cache)
    dec = model.native_decoder
    if dec is not None and dec.chooses(tokens_B1.numel(), tokens_B1.device.type) and dec.accepts(tokens_B1, cache):
        logits_1V, chosen_LK, top = dec.step_top(tokens_B1, positions_B1, cache)
        experts_BLK = chosen_LK.long()[None] if record_experts and model.config.moe is not None else None
        return logits_1V, experts_BLK, top
    return (*_forward(model, tokens_B1, positions_B1, cache, record_experts), None)


def _check_cache(model: Transformer, cache: KVCache) -> None:
    """ValueError unless `cache` holds this model's keys and values (layers, kv heads, head dim):
    a step over another model's cache failed deep in attention, or, natively, wrote past its buffers."""
    c, m = cache.config, model.config
    if (c.n_layers, c.n_kv_heads, c.head_dim) != (m.n_layers, m.n_kv_heads, m.head_dim):
        raise ValueError(f"the cache was made for another model: {c.n_layers} layers of {c.n_kv_heads} kv heads of "
                         f"{c.head_dim}, where this one has {m.n_layers} of {m.n_kv_heads} of {m.head_dim}")


def _check_prompts(
    model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, truncate: bool
) -> list[list[int]]:
    cfg = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"invalid max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if max_new_tokens >= cfg.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {cfg.max_seq_len} tokens")
    if _is_array(prompts, 2):
        prompts = prompts.tolist()  # [B, T] ids without padding (a tensor or a NumPy array)
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists (tokenize text first; "
                         "wrap a single prompt as [ids])")
    out = []
    room = cfg.max_seq_len - max_new_tokens
    for b, p in enumerate(prompts):
        if _is_array(p, 1):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise ValueError(f"prompt {b} must be a list of token ids, got {type(p).__name__} "
                             "(a single prompt must be wrapped as [ids])")
        try:
            ids = [operator.index(i) for i in p]
        except TypeError:
            raise ValueError(f"prompt {b} contains a non-integer token id") from None
        bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has token id {bad[0]} outside the model's vocabulary [0, {cfg.vocab_size})")
        if not ids:
            ids = [cfg.bos_id]  # an empty prompt: generate from the start-of-text token alone
        if len(ids) > room:
            if not truncate:
                raise ValueError(
                    f"prompt {b} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that needs "
                    f"{len(ids) + max_new_tokens} positions but the model's context is {cfg.max_seq_len} "
                    f"(pass truncate=True to keep the last {room} prompt tokens)"
                )
            keep_bos = ids[0] == cfg.bos_id
            ids = [cfg.bos_id] + ids[len(ids) - room + 1 :] if keep_bos else ids[len(ids) - room :]
        out.append(ids)
    return out


def _check_stop(
    stop: Sequence[int | str] | int | str | None, tokenizer: Tokenizer | None, vocab_size: int
) -> tuple[set[int], list[str]]:
    if stop is None:
        return set(), []
    if isinstance(stop, (bytes, bytearray)) or (not isinstance(stop, (int, str)) and isinstance(stop, Sequence)
                                                and any(isinstance(s, (bytes, bytearray)) for s in stop)):
        raise ValueError(f"invalid stop={stop!r}: bytes are not accepted; pass stop strings as str (e.g. "
                         "b'x'.decode()) or token ids as int")
    items = [stop] if isinstance(stop, (int, str)) else list(stop)
    ids: set[int] = set()
    strings: list[str] = []
    for s in items:
        if isinstance(s, str):
            if not s:
                raise ValueError("stop strings must not be empty")
            check_text(s, f"stop string {s!r}")
            strings.append(s)
        elif isinstance(s, int) and not isinstance(s, bool) and 0 <= s < vocab_size:
            ids.add(s)
        else:
            raise ValueError(f"invalid stop item {s!r}: expected a token id in [0, {vocab_size}) or a string")
    if strings and tokenizer is None:
        raise ValueError(f"stop strings {strings!r} need a tokenizer: pass tokenizer=")
    return ids, strings


def generate_stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    stop: Sequence[int | str] | int | str | None = None,
    stop_at_eos: bool = True,
    tokenizer: Tokenizer | None = None,
    truncate: bool = False,
    prefill_chunk: int = 512,
    record_experts: bool = False,
    cache: KVCache | None = None,
    engine: Engine | None = None,
    decode_alone: bool = False,
    structured: Structured | None = None,
    speculative_tokens: int = 0,
) -> Iterator[Step]:
    """Yield one `Step` per generated position, as soon as it is sampled.

    `prompts`: token-id lists (an empty one becomes `[bos]`). A prompt stops after emitting a stop
    token (`stop` ints, and each of the model's `config.eos_ids` unless `stop_at_eos=False`) or the token
    that completes a `stop` string (needs `tokenizer`); the stop token is included. `seed` seeds a private
    `torch.Generator` per prompt, prompt b's with `seed + b`, so equal seeds give equal samples (the
    first prompt's those of a run of it alone) and a prompt repeated gives different ones. Sampling
    as `SamplingParams` describes it: `repetition_penalty` over prompt and output, `presence_penalty`
    / `frequency_penalty` (OpenAI's) over the output, then temperature, top-k, top-p, min-p.
    `truncate=True` drops the oldest prompt tokens (keeping BOS) instead of raising when prompt +
    max_new_tokens exceeds the context.

    `cache`: for one prompt, a `KVCache` (batch 1) kept across calls, as a chat does: the tokens it
    already holds that begin this prompt (`cache.tokens`, recorded here) are not prefilled again,
    the rest of it is overwritten. It must have room for the prompt and `max_new_tokens`.

    Without `cache=`, the prompts run as requests of a `mixlab.engine.Engine` driven from this
    thread (one sequence each, batched in every step; the native kernels without preparing the
    model). `engine`: an engine (not started) kept across calls, as a chat does: a prompt that
    begins with tokens one of its free slots holds (the earlier turns) skips prefilling them.
    `decode_alone=True` (engine path): the text is the reply decoded alone, as a chat shows it (the
    first word without the leading space SentencePiece gives it), and stop strings match that text.
    `structured` (engine path, with `tokenizer`): the output follows it (JSON, a schema, a regex...:
    `mixlab.engine.Structured`), and ends once it is complete.
    `speculative_tokens=k` (engine path): greedy decoding drafts up to k tokens per step by prompt
    lookup and verifies them in one forward pass (`SamplingParams.speculative_tokens`): the same
    tokens, in fewer steps when the output repeats its input; sampling ignores it.
    """
    # Everything is validated here, eagerly; the returned generator does the compute.
    check_model(model)
    sampler = Sampler(temperature, top_k, top_p, min_p, repetition_penalty)
    penalties = (_number("presence_penalty", presence_penalty), _number("frequency_penalty", frequency_penalty))
    ids = _check_prompts(model, prompts, max_new_tokens, truncate)
    check_tokenizer(tokenizer, model.config.vocab_size)
    stop_ids, stop_strings = _check_stop(stop, tokenizer, model.config.vocab_size)
    if stop_at_eos:
        stop_ids.update(model.config.eos_ids)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"invalid seed={seed!r}: expected an integer in [-2**63, 2**64) or None")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"invalid prefill_chunk={prefill_chunk!r}: expected an integer >= 1")
    if record_experts and model.config.moe is None:
        raise ValueError("record_experts=True needs a MoE model; this one is dense")
    if cache is not None:
        weight = model.tok_embeddings.weight
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache= takes a mixlab.cache.KVCache, not {type(cache).__name__}")
        if len(ids) != 1 or cache.batch_size != 1:
            raise ValueError("cache= reuses the cache of a single prompt; pass one prompt and a batch-1 KVCache")
        if cache.max_len < len(ids[0]) + max_new_tokens:
            raise ValueError(f"the cache holds {cache.max_len} tokens; this prompt ({len(ids[0])}) and "
                             f"max_new_tokens={max_new_tokens} need {len(ids[0]) + max_new_tokens}")
        if cache.k[0].device != weight.device or cache.config != model.config:
            raise ValueError("the cache was made for another model or device")
        if cache.k[0].dtype != weight.dtype:  # else attention fails deep inside on mixed dtypes
            raise ValueError(f"the cache holds {cache.k[0].dtype} keys and values; this model computes in "
                             f"{weight.dtype}: make it with KVCache(..., dtype={weight.dtype})")
    if decode_alone and cache is not None:
        raise ValueError("decode_alone=True decodes through the engine; it excludes cache=")
    if structured is not None and cache is not None:
        raise ValueError("structured= decodes through the engine; it excludes cache=")
    if _int("speculative_tokens", speculative_tokens, 0, "an integer >= 0 (0 = off)") and cache is not None:
        raise ValueError("speculative_tokens= decodes through the engine; it excludes cache=")
    if engine is not None:
        if cache is not None or engine.model is not model:
            raise ValueError("engine= must be an engine over this model, and excludes cache=")
        if stop_strings and engine.tokenizer is None:  # else only the first step would say so
            raise ValueError(f"stop strings {stop_strings!r} need an engine made with a tokenizer: "
                             "Engine(model, tokenizer)")
        if len(ids) > engine.runner.n_slots:
            raise ValueError(f"{len(ids)} prompts need an engine with as many slots; it has {engine.runner.n_slots}")
        if max(map(len, ids)) + max_new_tokens > engine.runner.max_len:
            raise ValueError(f"prompt + max_new_tokens = {max(map(len, ids)) + max_new_tokens} tokens exceed the "
                             f"engine's {engine.runner.max_len} per sequence")
    if cache is None:
        params = SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, stop_token_ids=sorted(stop_ids), stop=stop_strings,
            return_experts=record_experts, ignore_eos=True,  # EOS, when it stops, is in stop_ids
            decode_alone=decode_alone, structured=structured, speculative_tokens=speculative_tokens)
        return _through_engine(model, ids, params, tokenizer, prefill_chunk, engine)
    return _generate(model, ids, max_new_tokens, sampler, penalties, seed, stop_ids, stop_strings, tokenizer,
                     prefill_chunk, record_experts, cache)


def _through_engine(model: Transformer, prompts: list[list[int]], params: SamplingParams,
                    tokenizer: Tokenizer | None, prefill_chunk: int, engine: Engine | None) -> Iterator[Step]:
    """The prompts as requests of an engine driven from this thread, regrouped into `Step`s: step i
    holds the i-th new token of every prompt that has one."""
    B = len(prompts)
    longest = max(map(len, prompts)) + params.max_tokens
    if engine is None:
        engine = Engine(model, tokenizer, max_batch=B, max_queue=B, token_budget=max(prefill_chunk, B),
                        prefill_chunk=prefill_chunk, max_seq_len=longest,
                        cache_bytes=B * longest * bytes_per_token(model), prefix_cache=False)
    # Prompt b samples with seed + b (as the server's n choices): one seed for all made a batch of one
    # prompt repeated, k samples of it, k copies of one (transformers' batch draws differ per row too).
    seeds = [params.seed if params.seed is None or not b else (params.seed + b) % 2**64 for b in range(B)]
    handles = [engine.submit(p, replace(params, seed=seed)) for p, seed in zip(prompts, seeds, strict=True)]
    try:
        yield from _regroup(engine, handles, params, model)
    finally:  # an abandoned stream (a chat's Ctrl-C) frees its slots
        for h in handles:
            if not h.finished:
                engine.cancel(h)
        engine.run_until_idle()


def _regroup(engine: Engine, handles: list[Handle], params: SamplingParams, model: Transformer) -> Iterator[Step]:
    B = len(handles)
    pending: list[deque[RequestOutput]] = [deque() for _ in range(B)]
    ended = [False] * B
    while True:
        while not all(ended[b] or pending[b] for b in range(B)):
            engine.step()
            for b, h in enumerate(handles):
                for out in h.poll():
                    if out.finish_reason == "error":  # this prompt's own failure (NaN logits, say)
                        raise GenerationError(f"generation failed: {out.error}")
                    if out.token_id is not None or out.text:  # (a last output without a token: held text)
                        pending[b].append(out)
                    ended[b] = ended[b] or out.finish_reason is not None
        if not any(pending):
            return
        outs = [pending[b].popleft() if pending[b] else None for b in range(B)]
        experts_BLK = None
        if params.return_experts:
            L, K = model.config.n_layers, model.config.moe.top_k if model.config.moe else 1
            experts_BLK = torch.tensor([o.experts if o is not None and o.experts is not None else [[-1] * K] * L
                                        for o in outs])
        text = [o.text if o is not None else "" for o in outs] if engine.tokenizer is not None else None
        yield Step([o.token_id if o is not None else None for o in outs], experts_BLK, text)


def _generate(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler,
    penalties: tuple[float, float], seed: int | None,
    stop_ids: set[int], stop_strings: list[str], tokenizer: Tokenizer | None, prefill_chunk: int,
    record_experts: bool, cache: KVCache | None,
) -> Iterator[Step]:
    cfg = model.config
    weight = model.tok_embeddings.weight
    device, dtype = weight.device, weight.dtype
    B = len(prompts)
    lens = [len(p) for p in prompts]
    T = max(lens)
    tokens_BT = torch.zeros(B, T, dtype=torch.long)
    positions_BT = torch.full((B, T), -1, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: the last token of every prompt is in column T-1
        tokens_BT[b, T - len(p) :] = torch.tensor(p)
        positions_BT[b, T - len(p) :] = torch.arange(len(p))
    tokens_BT, positions_BT = tokens_BT.to(device), positions_BT.to(device)
    chunk = min(prefill_chunk, T)
    if cache is None:
        cache = KVCache(cfg, batch_size=B, max_len=T + max_new_tokens, dtype=dtype, device=device, prefill_chunk=chunk)
    else:  # one prompt: keep the cached prefix it shares, prefill the rest (at least its last token)
        held = cache.tokens[: cache.t] if cache.t <= cache.capacity else []
        shared = 0
        while shared < min(len(held), T - 1) and held[shared] == prompts[0][shared]:
            shared += 1
        cache.rewind(shared)
        tokens_BT, positions_BT = tokens_BT[:, shared:], positions_BT[:, shared:]
        chunk = min(prefill_chunk, T - shared)
        if cache.window is not None:  # a chunk must not evict keys its own queries still need
            chunk = min(chunk, cache.capacity - cache.window + 1)
    cache.tokens = list(prompts[0]) if B == 1 else []

    generator = None
    if not sampler.greedy:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            seed_generator(generator, seed)
    seen_BV = None
    if sampler.repetition_penalty != 1.0:
        seen_BV = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen_BV[b, p] = True
    counts_BV = torch.zeros(B, cfg.vocab_size, device=device) if any(penalties) else None  # output token counts
    decoders: list[StreamDecoder] = []
    texts = [""] * B
    longest_stop = max((len(s) for s in stop_strings), default=0)
    if stop_strings:
        assert tokenizer is not None
        decoders = [tokenizer.stream(context=p[-4:]) for p in prompts]
    done = [False] * B
    positions_B1 = torch.tensor(lens, device=device)[:, None]

    # Grad mode is entered around each computation, never across a `yield`: a context held open
    # over a yield would leak inference mode into the caller's loop body.
    with torch.inference_mode():
        logits_BV, _ = prefill(model, tokens_BT, positions_BT, cache, chunk=chunk)
    # Greedy decoding of one prompt takes the argmax the native step computed, when it did.
    greedy_1 = B == 1 and sampler.greedy and seen_BV is None and counts_BV is None
    top: int | None = None
    for step in range(max_new_tokens):
        with torch.inference_mode():
            if top is not None:
                next_B = torch.tensor([top], device=device)
            else:
                # The repetition penalty, then presence/frequency (as sample_row orders them).
                logits_BV = sampler.repeat(logits_BV, seen_BV)
                if counts_BV is not None:
                    logits_BV = penalize(logits_BV, counts_BV, *penalties)
                next_B = sampler(logits_BV, generator=generator)
        out: list[int | None] = []
        for b, tok in enumerate(next_B.tolist()):
            if done[b]:
                out.append(None)
                continue
            out.append(tok)
            if tok in stop_ids:
                done[b] = True
            elif decoders:
                piece = decoders[b].push(tok)
                texts[b] += piece
                # Search only where a match could end in the new text.
                tail = texts[b][max(0, len(texts[b]) - len(piece) - longest_stop + 1) :]
                if piece and any(s in tail for s in stop_strings):
                    done[b] = True
        last = all(done) or step == max_new_tokens - 1
        if not record_experts:
            yield Step(out)
            if last:
                return
        with torch.inference_mode():
            if seen_BV is not None:
                seen_BV[torch.arange(B, device=device), next_B] = True
            if counts_BV is not None:
                counts_BV[torch.arange(B, device=device), next_B] += 1
            logits_BV, experts_BLK, top = _step_top(model, next_B[:, None], positions_B1, cache, record_experts)
            top = top if greedy_1 else None
            positions_B1 = positions_B1 + 1
        if B == 1:
            cache.tokens.append(int(next_B[0]))
        if record_experts:  # these tokens have run: their own experts
            yield Step(out, experts_BLK)
            if last:
                return


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    stop: Sequence[int | str] | int | str | None = None,
    stop_at_eos: bool = True,
    tokenizer: Tokenizer | None = None,
    truncate: bool = False,
    prefill_chunk: int = 512,
    experts_out: list[torch.Tensor] | None = None,
    cache: KVCache | None = None,
    speculative_tokens: int = 0,
) -> list[list[int]]:
    """The new token ids of each prompt (stop token included); arguments as in `generate_stream`.

    Pass a list as `experts_out` to receive, per prompt, a `[N, L, K]` tensor of the experts every
    MoE layer sent each of its N new tokens to (`Step`).
    """
    record = experts_out is not None
    steps = generate_stream(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, seed=seed, stop=stop, stop_at_eos=stop_at_eos,
        tokenizer=tokenizer, truncate=truncate, prefill_chunk=prefill_chunk, record_experts=record, cache=cache,
        speculative_tokens=speculative_tokens,
    )
    out: list[list[int]] = [[] for _ in range(len(prompts))]
    experts: list[list[torch.Tensor]] = [[] for _ in range(len(prompts))]
    for step in steps:
        for b, tok in enumerate(step.tokens):
            if tok is not None:
                out[b].append(tok)
                if step.experts_BLK is not None:
                    experts[b].append(step.experts_BLK[b])
    if experts_out is not None:
        experts_out[:] = [torch.stack(e) for e in experts]
    return out
