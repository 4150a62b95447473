"""Shared fixtures: tiny configs, seeded RNG, and checkpoints written by transformers."""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Any

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


def hf_tokenizer_json(folder: Path, model: Path | None = None) -> Path:
    """A tokenizer.json laid out like Mixtral-8x7B-Instruct's on the Hub (legacy Llama: Prepend +
    Replace normaliser, BPE with byte fallback), built from Mixtral's SentencePiece model (or `model`,
    whose control tokens, [INST] and the like in a v3 one, become special added tokens as on the Hub);
    no BOS is added on encoding (no post-processor)."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    from mixlab import load_tokenizer

    sp = load_tokenizer(model)._b.sp  # type: ignore[attr-defined]
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    control = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if sp.IsControl(i)]  # <s>, </s>, [INST]...
    scores = {p: sp.get_score(i) for p, i in vocab.items()}
    merges = generate_merges(vocab, scores, skip_tokens={"<unk>", *control})
    t = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", *control)])
    t.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder / "tokenizer.json"


def llama_cpp_converter() -> Path | None:
    """llama.cpp's own `convert_hf_to_gguf.py` (with its gguf-py and conversion/ beside it), the
    peer that writes the GGUF files the import tests read. It ships in llama-cpp-python's sdist: taken
    from `LLAMA_CPP_CONVERT`, `../shared/llama.cpp/`, or extracted once from the sdist of the
    installed llama-cpp-python (pip download: from pip's cache after setup built it) into
    ~/.cache/mixlab. None when none can be had (the tests then skip with that reason)."""
    import importlib.metadata
    import shutil
    import subprocess
    import sys
    import tarfile

    env = os.environ.get("LLAMA_CPP_CONVERT")
    if env:
        return Path(env) if Path(env).is_file() else None
    shared = SHARED / "llama.cpp" / "convert_hf_to_gguf.py"
    if shared.is_file():
        return shared
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path.home() / ".cache" / "mixlab" / f"llama.cpp-{version}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    dl = root.parent / f".sdist-{version}-{os.getpid()}"
    tmp = root.parent / f".llama.cpp-{version}-{os.getpid()}"
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(dl)], check=True, timeout=600,
                       capture_output=True)
        (sdist,) = dl.glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
        keep = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(keep) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, root)
    except (subprocess.SubprocessError, OSError, ValueError, tarfile.TarError):
        return None
    finally:
        shutil.rmtree(dl, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return script if script.is_file() else None

def _moe_impl_missing(impl: str) -> str | None:
    """Why `impl` cannot run on this machine (None when it can): a parametrised test then skips with
    that reason instead of silently testing the implementation the kernel falls back to."""
    if impl == "triton" and not torch.cuda.is_available():
        return "the Triton kernel needs CUDA (tests/test_triton_moe.py runs it in the interpreter on a CPU)"
    if impl == "native":
        from mixlab.ops import native

        if native.load() is None or not native.fast(torch.float32):  # load: collection may come first
            return "the native MoE kernel is unavailable here (no C compiler, MIXLAB_NATIVE=0 or no AVX-512)"
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    return None


def moe_impls(*, reference: bool = False, auto: bool = False, exclude: tuple[str, ...] = ()) -> list[object]:
    """Every MoE implementation as pytest params, each skipping with its reason where it cannot run."""
    from mixlab.ops.moe import IMPLS

    names = [k for k in IMPLS if (reference or k != "reference") and k not in exclude] + (["auto"] if auto else [])
    out: list[object] = []
    for k in names:
        why = _moe_impl_missing(k)
        out.append(pytest.param(k, marks=pytest.mark.skip(reason=why)) if why else k)
    return out


def gguf_test_model(kind: str):
    """The GGUF tests' random model ("moe" or "dense") with Mixtral's vocabulary; routers scaled up
    for decisive routing (no near-ties for weight rounding to flip)."""
    from mixlab.config import get_preset
    from mixlab.model import MoEBlock, Transformer

    # no sliding window: llama.cpp's `llama` architecture has none (write_gguf warns)
    cfg = get_preset("tiny-moe" if kind == "moe" else "tiny-dense").replace(vocab_size=32000, sliding_window=None)
    model = Transformer(cfg)
    model.init_weights(std=0.1, seed=0)
    with torch.no_grad():
        for block in model.layers:
            if isinstance(block.ffn, MoEBlock):
                block.ffn.gate.weight.mul_(10)
    return model.eval()


def kquant_source(folder: Path) -> Path:
    """A random MoE (Mixtral's vocabulary, width 256: K-quant blocks fit; one layer) as an f32 GGUF
    file in `folder`, for llama.cpp's quantiser (`llama_quantize`)."""
    from mixlab.checkpoint.gguf import write_gguf
    from mixlab.model import Transformer

    cfg = gguf_test_model("moe").config.replace(dim=256, ffn_dim=256, head_dim=64, n_layers=1)
    model = Transformer(cfg)
    model.init_weights(std=0.1, seed=0)
    with torch.no_grad():
        model.layers[0].ffn.gate.weight.mul_(10)  # decisive routing, as gguf_test_model's
    return write_gguf(model.eval(), folder / "m-f32.gguf", quant="f32")


def llama_quantize(src: Path, ftype: str) -> Path:
    """`src` quantised by llama.cpp's own quantiser to `ftype` ("Q4_K_M", "Q4_0", ...) with its mix of
    types, beside it as m-FTYPE.gguf (made once)."""
    from mixlab.cli.benchmark import llama_quantize as quantize

    dst = src.with_name(f"m-{ftype}.gguf")
    return dst if dst.exists() else quantize(src, dst, ftype)


def metric(url: str, name: str) -> float:
    """The value of the sample `name` (with its labels) in a server's `/metrics` at `url`."""
    import httpx

    m = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def until(predicate: Any, timeout: float = 20.0) -> bool:
    """Whether `predicate()` came true within `timeout` seconds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def openai_typed(kind: Any, obj: Any, extensions: Any = ()) -> Any:
    """`obj` (a body, chunk or event as sent) validated strictly by the `openai` package's type `kind` (its client
    builds its objects without validating them); it fails on a field the type lacks (pydantic's `model_extra`, at
    any depth) unless its path is among `extensions`, written `$.choices[].stop_reason` (list indices as `[]`)."""
    import pydantic

    typed = pydantic.TypeAdapter(kind).validate_python(obj, strict=True)
    extra: set[str] = set()

    def walk(m: Any, path: str) -> None:
        if isinstance(m, pydantic.BaseModel):
            extra.update(f"{path}.{k}" for k in m.model_extra or {})
            for k in type(m).model_fields:
                walk(getattr(m, k), f"{path}.{k}")
        elif isinstance(m, list):
            for x in m:
                walk(x, path + "[]")
        elif isinstance(m, dict):
            for k, x in m.items():
                walk(x, f"{path}.{k}")

    walk(typed, "$")
    assert extra <= set(extensions), (sorted(extra - set(extensions)), obj)
    return typed


def completion_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    """A completion (or a streamed chunk of one) with the nulls OpenAI's own API sends and the `openai` package's
    `Completion` has no room for read as values: a streamed choice's `finish_reason` until its end, an echoed
    prompt's first token's logprob and top_logprobs."""
    choices = []
    for ch in obj["choices"]:
        lp = ch.get("logprobs")
        if lp is not None:
            lp = {**lp, "token_logprobs": [0.0 if x is None else x for x in lp["token_logprobs"]],
                  "top_logprobs": [{} if x is None else x for x in lp["top_logprobs"] or []]}
        choices.append({**ch, "finish_reason": ch["finish_reason"] or "length", "logprobs": lp})
    return {**obj, "choices": choices}


def step_clock(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    """`module.time.perf_counter` as a clock that a training loop reads at each step's start and end:
    step k takes k seconds, with 100 s of something else (an evaluation, a checkpoint) before each."""
    calls, now = [0], [0.0]

    def perf_counter() -> float:
        calls[0] += 1
        now[0] += calls[0] // 2 if calls[0] % 2 == 0 else 100.0
        return now[0]

    monkeypatch.setattr(module, "time", type("Clock", (), {"perf_counter": staticmethod(perf_counter)}))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset of one domain (code): 20 short documents, a tenth held out."""
    import json

    from mixlab.train.data import prepare, read_documents

    src = tmp_path_factory.mktemp("small") / "src" / "code"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 8}) + "\n"
                                             for i in range(20)), encoding="utf-8")
    data = src.parents[1] / "ds"
    prepare(read_documents([src.parent]), data, valid_fraction=0.1)
    return data
