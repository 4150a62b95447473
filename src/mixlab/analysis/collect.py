"""Run a model over a multi-domain corpus and accumulate its routing, in bounded memory.

Owns: the tokenizer used for analysis (the domain folders and their documents are
`mixlab.corpus.find_domains`'s and `iter_documents`', which `mixlab eval` reads too),
cutting documents into model sequences, and the streaming loop that turns each batch's `Routing`
into counts (`stats.RoutingCounts`) plus a few token-level samples for the Figure 8 view. Nothing
here keeps per-token routing beyond one batch and the samples.

Sequences: each document is `[BOS] + tokens`, cut into consecutive windows of at most `seq_len`
tokens; each window is its own model row starting at position 0 (no packing, so no token ever
attends across documents). Windows are batched with right padding, which causal attention and
per-token routing leave without effect on the real tokens. Consecutive-token pairs are counted
inside a window only: never across documents, windows or padding.

Shape legend: B rows in a batch, S tokens per row, T = B*S flattened, K experts per token,
L MoE layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mixlab.analysis.stats import RoutingCounts, pair_mask
from mixlab.config import suffix_of
from mixlab.corpus import Domain, iter_documents
from mixlab.model import Transformer
from mixlab.model.moe import MoEBlock

# ----------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer(Protocol):
    """What the analysis needs of a tokenizer (`mixlab.tokenizer.Tokenizer` and the training
    tokenizers of `mixlab.corpus` both have it)."""

    bos_id: int
    vocab_size: int

    def encode(self, text: str, *, bos: bool = ..., eos: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def load_analysis_tokenizer(model_dir: str | Path | None = None, *, path: str | Path | None = None) -> Tokenizer:
    """The tokenizer the model was trained with: `path` if given; else a GGUF file's vocabulary or
    the model folder's tokenizer file (`tokenizer_file`); else the tokenizer named in its mixlab_data.json (written by
    `mixlab train`, e.g. bytes); else Mixtral's (tokenizer.model.v1 from mistral-common)."""
    from mixlab.tokenizer import load_tokenizer, tokenizer_file

    if path is not None:
        return load_tokenizer(path)
    if model_dir is not None and suffix_of(model_dir) == ".gguf" and Path(model_dir).is_file():
        return load_tokenizer(model_dir)  # the vocabulary in the file's metadata
    if model_dir is not None:
        folder = Path(model_dir)
        if tokenizer_file(folder) is not None:
            return load_tokenizer(folder)
        if (folder / "mixlab_data.json").is_file():
            from mixlab.corpus import get_tokenizer

            try:
                spec = json.loads((folder / "mixlab_data.json").read_text(encoding="utf-8"))["tokenizer"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
                raise ValueError(f"{folder / 'mixlab_data.json'}: no readable 'tokenizer' entry ({e})") from None
            return get_tokenizer(spec)
    return load_tokenizer()


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> None:
    """ValueError if the tokenizer gives ids past the model's vocabulary (another model's tokenizer)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab_size}: "
                         "pass the tokenizer the model was trained with (--tokenizer)")


def tokenizer_name(tokenizer: Tokenizer) -> str:
    for attr in ("path", "name"):
        if getattr(tokenizer, attr, None):
            return str(getattr(tokenizer, attr))
    return type(tokenizer).__name__


def token_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, by decoding growing prefixes. A character split over several
    byte tokens appears on its last byte (the earlier ones decode to an incomplete U+FFFD)."""
    out, shown = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1])
        if cur.endswith("\ufffd") and i + 1 < len(ids):
            out.append("")
            continue
        common = len(os.path.commonprefix([shown, cur]))
        out.append(cur[common:])
        shown = cur
    return out


# ----------------------------------------------------------------------------------------------
# Streaming collection


@dataclass
class Sample:
    """The start of one document with its routing, for the token-level view (paper Figure 8)."""

    domain: str
    source: str
    pieces: list[str]
    idx_LSK: np.ndarray  # expert ids per MoE layer, token, slot (first choice in slot 0)


@dataclass
class Collected:
    moe_layers: list[int]  # transformer layer index of each MoE layer
    num_experts: int
    top_k: int
    counts: dict[str, RoutingCounts]
    documents: dict[str, int]
    samples: list[Sample]
    settings: dict[str, Any]


def moe_layers(model: Transformer) -> list[int]:
    layers = [i for i, b in enumerate(model.layers) if isinstance(b.ffn, MoEBlock)]
    if not layers or model.config.moe is None:
        raise ValueError(
            "the model is dense (no MoE layer, so no router): routing analysis needs a mixture-of-experts "
            "model (config with num_local_experts / moe)"
        )
    return layers


def _windows(tokenizer: Tokenizer, text: str, seq_len: int) -> list[list[int]]:
    ids = tokenizer.encode(text, bos=True)
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


def _route_batch(
    model: Transformer,
    tokenizer: Tokenizer,
    domain: str,
    rows: list[list[int]],
    wanted: list[tuple[int, str, list[int]]],
    acc: RoutingCounts,
) -> list[Sample]:
    """Run one right-padded batch of rows through the model, add its routing to `acc`, and return
    the samples asked for in `wanted`."""
    B, S = len(rows), max(len(r) for r in rows)
    tokens_BS = torch.zeros(B, S, dtype=torch.long)
    segment_BS = torch.full((B, S), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens_BS[b, : len(r)] = torch.tensor(r)
        segment_BS[b, : len(r)] = b  # one segment per row: pairs never cross rows
    device = next(model.parameters()).device
    # Only the routing is needed: no output projection, and none of the last layer's experts.
    routings = model.forward_output(tokens_BS.to(device), routing_only=True).routing
    idx_per_layer = [r.idx_TK.cpu() for r in routings]
    acc.update(idx_per_layer, valid_T=segment_BS.reshape(-1) >= 0, pairs_ok=pair_mask(segment_BS),
               tokens_T=tokens_BS.reshape(-1))
    out = []
    for b, source, ids in wanted:
        idx_LSK = np.stack([i.view(B, S, -1)[b, : len(ids)].numpy() for i in idx_per_layer]).astype(np.int16)
        pieces = token_pieces(tokenizer, ids)
        if ids[0] == tokenizer.bos_id:  # BOS decodes to nothing; show that the model saw it
            pieces[0] = "<s>"
        out.append(Sample(domain, source, pieces, idx_LSK))
    return out


@torch.inference_mode()
def collect_routing(
    model: Transformer,
    tokenizer: Tokenizer,
    domains: Mapping[str, Domain],
    *,
    split: str | None = "valid",
    max_tokens: int = 50_000,
    seq_len: int = 512,
    batch_size: int = 8,
    samples_per_domain: int = 1,
    sample_tokens: int = 150,
    progress: bool = True,
) -> Collected:
    """Route up to `max_tokens` tokens of each domain through `model`; return counts and samples."""
    from tqdm.auto import tqdm

    layers = moe_layers(model)
    moe = model.config.moe
    assert moe is not None
    if not isinstance(domains, dict):  # a path or a list of names failed on 'no attribute items'
        raise ValueError(f"domains must map each domain's name to its folder or files, as find_domains(data) "
                         f"returns, not {type(domains).__name__}")
    check_vocabulary(tokenizer, model.config.vocab_size)
    if seq_len < 2 or max_tokens < 1:
        raise ValueError(f"need seq_len >= 2 and max_tokens >= 1, got seq_len={seq_len}, max_tokens={max_tokens}")
    if seq_len > model.config.max_seq_len:  # positions the model never saw: routing nobody would see in use
        raise ValueError(f"seq_len {seq_len} exceeds the model's context length {model.config.max_seq_len}")
    if batch_size < 1 or samples_per_domain < 0 or sample_tokens < 1:
        raise ValueError(f"need batch_size >= 1, samples >= 0 and sample_tokens >= 1, got batch_size={batch_size}, "
                         f"samples={samples_per_domain}, sample_tokens={sample_tokens}")
    # Routed in eval mode (no router jitter); the caller's mode is given back, as evaluate_texts does.
    was_training = model.training
    model.eval()
    try:
        counts: dict[str, RoutingCounts] = {}
        documents: dict[str, int] = {}
        samples: list[Sample] = []

        for domain, folder in domains.items():
            acc = RoutingCounts(len(layers), moe.num_experts, moe.top_k)
            rows: list[list[int]] = []
            wanted: list[tuple[int, str, list[int]]] = []  # (row in batch, source, ids) to keep as samples
            n_docs, budget = 0, max_tokens
            with tqdm(total=max_tokens, desc=f"routing {domain}", unit="tok", disable=None if progress else True,
                      leave=False) as bar:  # disable=None: drawn on a terminal only, not into a log file
                for source, text in iter_documents(folder, split=split):
                    if budget <= 0:
                        break
                    n_docs += 1
                    for w, window in enumerate(_windows(tokenizer, text, seq_len)):
                        window = window[:budget]
                        if not window:
                            break
                        if w == 0 and n_docs <= samples_per_domain:
                            wanted.append((len(rows), source, window[:sample_tokens]))
                        rows.append(window)
                        budget -= len(window)
                        if len(rows) == batch_size or budget <= 0:
                            samples += _route_batch(model, tokenizer, domain, rows, wanted, acc)
                            bar.update(sum(len(r) for r in rows))
                            rows, wanted = [], []
                if rows:
                    samples += _route_batch(model, tokenizer, domain, rows, wanted, acc)
                    bar.update(sum(len(r) for r in rows))
            counts[domain], documents[domain] = acc, n_docs
    finally:
        model.train(was_training)

    settings = {"split": split, "max_tokens_per_domain": max_tokens, "seq_len": seq_len, "batch_size": batch_size}
    return Collected(layers, moe.num_experts, moe.top_k, counts, documents, samples, settings)
