"""Export a mixlab model to GGUF, the single-file format llama.cpp loads.

Mixtral and Mistral are written as llama.cpp's `llama` architecture, as llama.cpp's own
`convert_hf_to_gguf.py` does: MoE models add `llama.expert_count` / `llama.expert_used_count`, the
router as `blk.N.ffn_gate_inp` and the experts stacked per layer as `blk.N.ffn_{gate,up,down}_exps`.

Two conventions differ from mixlab's and are translated here:
- Rotary layout. mixlab (like transformers) rotates the two halves of each head ("rotate half");
  llama.cpp's `llama` rope rotates adjacent pairs (Meta's original layout). The q and k rows of
  each head are permuted so that llama.cpp's pairs are mixlab's (i, i + Hd/2) pairs.
- Dimension order. GGUF lists dimensions fastest-first; the writer reverses numpy's order, so a
  torch `[out, in]` matrix is llama.cpp's `{in, out}` and `w13 [E, 2F, D]` splits into
  `ffn_gate_exps` / `ffn_up_exps` `[E, F, D]`, exactly what llama.cpp expects.

Norms and the router stay float32 in every file (llama.cpp's converter does the same: they are
tiny, and routing decisions are sensitive to rounding). The file is streamed tensor by tensor and
renamed into place at the end (mixlab.atomic.atomic_file), so a failure never leaves a half-written
`.gguf`, and a killed export's temporary is removed by the next export to the same name.

llama.cpp's `llama` architecture has no sliding-window attention: a dense model with a window
gives the same logits only for sequences no longer than the window (`write_gguf` warns).

Shape legend: E experts, F expert FFN width, D width, H query heads, G kv heads, Hd head dim.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixlab.atomic import atomic_file, check_destination
from mixlab.checkpoint.gguf_read import EOG_TEXTS
from mixlab.config import ModelConfig, suffix_of
from mixlab.errors import OutputError
from mixlab.tokenizer import default_tokenizer_path

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def rope_permute(w_XD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from the rotate-half layout to llama.cpp's adjacent-pairs layout.

    Row j < Hd/2 of a head is paired with row j + Hd/2 in mixlab; llama.cpp pairs rows 2j, 2j+1.
    """
    X, D = w_XD.shape
    Hd = X // n_heads
    return w_XD.reshape(n_heads, 2, Hd // 2, D).transpose(1, 2).reshape(X, D)


Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # floats, or int4's (packed codes, scales)


def _rows(w: Weight, f: Callable[[torch.Tensor], Any]) -> Any:
    """`f` of a float weight, or `f` of an int4 weight's codes and scales, paired: a row operation
    (split, chunk, rotary permutation) applies to both alike."""
    if isinstance(w, torch.Tensor):
        return f(w)
    codes, scales = f(w[0]), f(w[1])
    return list(zip(codes, scales, strict=True)) if isinstance(codes, tuple | list) else (codes, scales)


def _tensors(model: torch.nn.Module, config: ModelConfig) -> Iterator[tuple[str, Weight, bool]]:
    """(GGUF name, weight, may be quantised) in llama.cpp's names, mixlab's values; an int4 weight
    (`Int4Linear`, `Int4Experts`: uint8 codes) as its (codes, scales)."""
    state = model.state_dict()

    def get(name: str) -> Weight:
        t = state[name]
        if t.dtype != torch.uint8:
            return t
        return t, state[name.removesuffix(".weight") + ".scale" if name.endswith(".weight") else name + "_scale"]

    q, kv = config.q_dim, config.kv_dim
    yield "token_embd.weight", state["tok_embeddings.weight"], True
    for i in range(config.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", state[p + "attn_norm.weight"], False
        wq, wk, wv = _rows(get(p + "attn.wqkv.weight"), lambda t: t.split([q, kv, kv], dim=0))
        yield b + "attn_q.weight", _rows(wq, lambda t: rope_permute(t, config.n_heads)), True
        yield b + "attn_k.weight", _rows(wk, lambda t: rope_permute(t, config.n_kv_heads)), True
        yield b + "attn_v.weight", wv, True
        yield b + "attn_output.weight", get(p + "attn.wo.weight"), True
        yield b + "ffn_norm.weight", state[p + "ffn_norm.weight"], False
        if config.moe is not None:
            yield b + "ffn_gate_inp.weight", state[p + "ffn.gate.weight"], False
            w1, w3 = _rows(get(p + "ffn.experts.w13"), lambda t: t.chunk(2, dim=1))  # [E, F, D] each
            yield b + "ffn_gate_exps.weight", w1, True
            yield b + "ffn_up_exps.weight", w3, True
            yield b + "ffn_down_exps.weight", get(p + "ffn.experts.w2"), True
        else:
            w1, w3 = _rows(get(p + "ffn.w13.weight"), lambda t: t.chunk(2, dim=0))
            yield b + "ffn_gate.weight", w1, True
            yield b + "ffn_up.weight", w3, True
            yield b + "ffn_down.weight", get(p + "ffn.w2.weight"), True
    yield "output_norm.weight", state["norm.weight"], False
    if not config.tie_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        yield "output.weight", get("output.weight"), True


def _shape(w: Weight) -> tuple[int, ...]:
    """The weight's float shape (an int4 weight's codes hold two inputs a byte)."""
    if isinstance(w, torch.Tensor):
        return tuple(w.shape)
    return (*w[0].shape[:-1], 2 * w[0].shape[-1])


def _encode(w: Weight, qtype: object) -> np.ndarray:
    """The bytes llama.cpp reads for weight `w` stored as `qtype` (a GGMLQuantizationType); an int4
    weight (groups of 32: Q4_0's layout, `mixlab.ops.quant`) as its Q4_0 blocks, each scale then its
    16 code bytes, as stored (nothing rounded again)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if not isinstance(w, torch.Tensor):
        codes, scales = (x.detach().cpu() for x in w)
        blocks = torch.cat([scales.contiguous().view(torch.uint8).reshape(*scales.shape, 2),
                            codes.reshape(*scales.shape, 16)], dim=-1)
        return blocks.numpy().reshape(-1)
    t = w
    if qtype == Q.BF16 and t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)  # exact: no round trip through f32
    a = t.detach().float().contiguous().numpy()
    return quants.quantize(a, qtype)  # type: ignore[arg-type]


def _vocab(config: ModelConfig, tokenizer: Path) -> tuple[list[bytes], list[float], list[int], dict[str, int]]:
    """Pieces, scores and token types of a SentencePiece model, padded to the model's vocabulary."""
    import sentencepiece as spm
    from gguf import TokenType

    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer}: tokenizer model not found (expected a SentencePiece .model file)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(tokenizer))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{tokenizer}: not a SentencePiece model ({e})") from None
    n = sp.GetPieceSize()
    if n > config.vocab_size:
        raise ValueError(
            f"{tokenizer}: the tokenizer has {n} pieces but the model's vocab_size is {config.vocab_size}; "
            "llama.cpp needs an embedding row for every piece (use a matching tokenizer)"
        )
    pieces, scores, types = [], [], []
    for i in range(n):
        pieces.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    for i in range(n, config.vocab_size):  # embedding rows the tokenizer never produces
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return pieces, scores, [int(t) for t in types], special


def gguf_writer(config: ModelConfig, *, name: str, file_type: int, tokenizer: str | Path | None = None) -> Any:
    """A `gguf.GGUFWriter` holding the metadata llama.cpp reads for a Llama/Mistral/Mixtral model of
    `config` (shapes, rope, experts, the SentencePiece vocabulary of `tokenizer`); tensors are the
    caller's."""
    import gguf

    pieces, scores, types, special = _vocab(config, Path(tokenizer) if tokenizer else default_tokenizer_path())
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.n_heads != config.dim:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.norm_eps))
    if config.moe is not None:
        w.add_expert_count(config.moe.num_experts)
        w.add_expert_used_count(config.moe.top_k)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(special["bos"])
    w.add_eos_token_id(special["eos"])
    # the model's other ids that end generation (config.eos_ids: an eos_token_id list, generation_config.json's):
    # llama.cpp ends generation at its end-of-turn and end-of-message ids too (`llama_vocab_is_eog`), and has no
    # key for a third; those it knows by their text (<|im_end|>) need none
    more = [i for i in config.eos_ids if i != special["eos"] and pieces[i].decode() not in EOG_TEXTS]
    if len(more) > 2:
        warnings.warn(f"the model ends generation at {len(more) + 1} ids; GGUF has keys for three "
                      f"(tokenizer.ggml.eos/eot/eom_token_id), so llama.cpp will not stop at {more[2:]}", stacklevel=3)
    for add, i in zip((w.add_eot_token_id, w.add_eom_token_id), more, strict=False):
        add(i)
    if special["unk"] >= 0:
        w.add_unk_token_id(special["unk"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return w


def write_gguf(
    model: torch.nn.Module,
    path: str | Path,
    *,
    quant: str = "bf16",
    tokenizer: str | Path | None = None,
    name: str = "mixlab",
    sources: list[str | Path] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write `model` (a mixlab `Transformer`) to the GGUF file `path`; returns the path.

    `quant`: how matrices are stored: "f32", "f16", "bf16", "q8_0" (llama.cpp's 8-bit blocks of 32
    with one f16 scale each) or "q4_0" (4-bit blocks of 32: mixlab's int4 at groups of 32, byte for
    byte); a matrix whose rows are not a multiple of 32 falls back to f16. A model holding int4
    weights in groups of 32 (`load_model(..., quant="int4")`, a Q4_0 GGUF's) is written as q4_0, its
    int4 matrices' bytes as they are (what q4_0 makes of their floats), its float ones rounded.
    `tokenizer`: a SentencePiece model file (default: Mixtral's, from mistral-common). An existing
    file is replaced only if it is a GGUF file (or `overwrite`); a folder or a source is refused
    before anything is written (mixlab.atomic). `progress`: a bar of the tensors written, where stderr
    is a terminal.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as FT

    from mixlab.checkpoint import refuse_adapters
    from mixlab.model.inference import inference_format, int4_groups

    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quantisation {quant!r}; expected one of {', '.join(QUANTS)}")
    refuse_adapters(model, "cannot write as GGUF")
    prepared = inference_format(model)
    if prepared == "int4" and quant == "q4_0":  # Q4_0 blocks are int4 in groups of 32, byte for byte
        groups = int4_groups(model)  # type: ignore[arg-type]
        if groups != {32}:
            raise ValueError(f"cannot write int4 weights in groups of {max(groups)} as q4_0, whose blocks are 32 "
                             "inputs: load the model with group=32 (the default)")
    elif prepared is not None:  # its state_dict holds packed bytes / scales, not the matrices written below
        q4 = " (int4 weights are written as q4_0 only)" if prepared == "int4" else ""
        raise ValueError(f"cannot write a model with {prepared} inference weights (prepared for inference, or "
                         f"loaded from a Q4_0 GGUF) as GGUF{q4}: write it before prepare_for_inference, load it "
                         "again from its checkpoint, or convert a GGUF with `mixlab convert` (which dequantises)")
    config: ModelConfig = model.config  # type: ignore[assignment]
    dst = Path(path)
    if suffix_of(dst) != ".gguf":
        raise OutputError(f"{dst}: a GGUF file name must end in .gguf")
    check_destination(dst, sources=sources or [], overwrite=overwrite, kind="file", magic=b"GGUF")
    if config.sliding_window is not None and config.sliding_window < config.max_seq_len:
        warnings.warn(f"{dst}: the model's sliding window ({config.sliding_window} tokens) is not written: "
                      "llama.cpp's llama architecture (and a mixlab load of the file) attends to the whole "
                      f"context, so the logits equal this model's only up to {config.sliding_window} tokens",
                      stacklevel=2)
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    ftype = {"f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "bf16": FT.MOSTLY_BF16, "q8_0": FT.MOSTLY_Q8_0,
             "q4_0": FT.MOSTLY_Q4_0}[quant]
    w = gguf_writer(config, name=name, file_type=int(ftype), tokenizer=tokenizer)

    # Tensor infos first (sizes are known without converting anything), then the data, streamed.
    plan: list[tuple[str, Weight, object]] = []
    unblocked: list[tuple[str, int]] = []
    for tname, t, quantisable in _tensors(model, config):
        shape = _shape(t)
        tq = qtype if quantisable and len(shape) >= 2 else Q.F32
        if tq in (Q.Q8_0, Q.Q4_0) and shape[-1] % 32:
            tq = Q.F16
            unblocked.append((tname, shape[-1]))
        block, type_size = gguf.GGML_QUANT_SIZES[tq]
        nbytes = math.prod(shape) // block * type_size
        w.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes, raw_dtype=tq)
        plan.append((tname, t, tq))
    if unblocked:  # as llama.cpp's quantiser does, but said
        warnings.warn(f"{len(unblocked)} matrices have rows that are not a multiple of 32 ({unblocked[0][0]}: "
                      f"{unblocked[0][1]} inputs), which {quant} blocks need: they are stored as f16", stacklevel=2)

    with atomic_file(dst, sources=sources or [], overwrite=overwrite, magic=b"GGUF") as tmp:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            from tqdm import tqdm

            for _tname, t, tq_ in tqdm(plan, desc=f"writing {dst}", unit="tensor", leave=False,
                                       disable=None if progress else True):  # terminal only
                w.write_tensor_data(_encode(t.detach().cpu() if isinstance(t, torch.Tensor) else t, tq_))
        finally:
            w.close()
    return dst
