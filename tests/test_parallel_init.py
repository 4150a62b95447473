"""`init_from` under expert parallelism / FSDP reads each process's pieces straight from the files:
every process ends with the weights the old path gave it (the whole checkpoint loaded by
`checkpoints.load_init`, then sharded), bit for bit, from every format `init_from` reads, and never
holds the whole model while it does.

Like tests/test_parallel.py, each group of processes (gloo, loopback, forked) runs a list of jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import hf_mixtral
from mixlab import save_model
from mixlab.train import checkpoints
from mixlab.train.data import TokenDataset
from mixlab.train.loop import build_model_config, load_train_config, make_optimizer
from processes import run_group

pytestmark = pytest.mark.slow  # groups of processes: ~1 minute on 2 busy cores
LAYOUTS = [(2, False), (1, True), (2, True)]  # (ep, fsdp) on 2 processes


def _state(model: Any) -> dict[str, Any]:
    """A training checkpoint's state.json fields that `init_from` reads, as `train` writes them."""
    mc = model.config
    return {"model_config": mc.to_hf_dict() | {"moe": dataclasses.asdict(mc.moe)}}


def _compare_job(rank: int, job: dict[str, Any]) -> None:
    """For each source and layout: `build(init_from=)` equals `load_init` then `parallelize`, each
    local tensor bit for bit, and so do the logits. Then a sharded run's checkpoint (DCP) is written
    from the last layout and read back under every layout the same way, and the last is exported."""
    from mixlab.model import Transformer
    from mixlab.parallel.mesh import init
    from mixlab.parallel.train import DistributedTraining, _local

    def compare(src: str, ep: int, fsdp: bool) -> tuple[DistributedTraining, Transformer]:
        par = DistributedTraining(init(ep=ep, fsdp=fsdp))
        cfg = checkpoints.init_config(src)
        want = checkpoints.load_init(src, cfg)  # the old path: the whole model, then this process's share
        par.parallelize(want)
        got = par.build(cfg, device=torch.device("cpu"), std=0.02, seed=0, init_from=src)
        params = dict(want.named_parameters())
        assert params.keys() == dict(got.named_parameters()).keys()
        for name, p in got.named_parameters():
            a, b = _local(p), _local(params[name])
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), (src, ep, fsdp, rank, name)
        x = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)
        return par, got

    for src in job["sources"]:
        for ep, fsdp in LAYOUTS:
            par, model = compare(src, ep, fsdp)
    cfg = load_train_config(None, data=job["data"], out=job["dcp"], model="tiny-moe", init_from=job["sources"][0])
    par.save(Path(job["dcp"]) / "checkpoints", step=1, model=model, optimizer=make_optimizer(model, cfg),
             state=_state(model), keep=1)
    for ep, fsdp in LAYOUTS:
        par, model = compare(job["dcp"], ep, fsdp)
    # the consolidated export, in shards of at most 10 kB (the model is ~50 kB)
    par.export(model, Path(job["export"]), functools.partial(save_model, max_shard_bytes=10_000))


class _Built(Exception):
    """Raised where `train` makes its optimizer: the model is built, nothing trained yet."""


def _memory_job(rank: int, job: dict[str, Any]) -> None:
    """`train`'s setup of this process's model from `init_from`, measured: writes how much the
    process's peak resident memory grew and the whole float32 model's bytes."""
    from mixlab.config import get_preset
    from mixlab.model import Transformer
    from mixlab.parallel.mesh import init
    from mixlab.parallel.train import DistributedTraining
    from mixlab.train import loop

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak() -> int:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln.split()[1] for ln in status if ln.startswith("VmHWM:"))) * 1024  # kB

    def built(model: torch.nn.Module, cfg: Any) -> None:
        with torch.device("meta"):
            full = Transformer(model.config)
        whole = sum(p.numel() * p.element_size() for p in full.parameters())
        Path(job["report"]).with_suffix(f".{rank}.json").write_text(json.dumps({"grown": peak() - before,
                                                                                  "model": whole}))
        raise _Built

    loop.make_optimizer = built  # type: ignore[assignment]  # a fresh process of its own: nothing else trains
    par = DistributedTraining(init(ep=2, fsdp=job["fsdp"]))
    with torch.device("meta"):  # the meta device's first use imports ~100 MB of torch code: not measured
        Transformer(get_preset("tiny-moe"))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) := the current resident memory
    before = resident()
    with contextlib.suppress(_Built):
        loop.train(load_train_config(None, **job["cfg"]), parallel=par)


def _job(rank: int, job: dict[str, Any]) -> None:
    (_compare_job if job["kind"] == "compare" else _memory_job)(rank, job)


def test_each_process_reads_the_weights_the_whole_load_gave_it(small_data: Path, tmp_path: Path) -> None:
    """Sources: transformers' own save_pretrained (fused experts, float32 and bfloat16), mixlab's
    per-expert transformers names (bfloat16), the Mistral format (rotary q / k rows), a one-process
    training checkpoint and a sharded run's; an odd vocabulary, 3 query heads and 1 key/value head,
    so that FSDP's row shards cut the embedding unevenly and wqkv inside q. Layouts: --ep 2,
    --fsdp, both."""
    from mixlab import load_model

    shape = dict(vocab_size=67, hidden_size=24, intermediate_size=20, num_attention_heads=3, num_key_value_heads=1,
                 head_dim=8)
    from transformers import MixtralForCausalLM

    sources = [hf_mixtral(tmp_path / "transformers", **shape)]
    MixtralForCausalLM.from_pretrained(sources[0], dtype=torch.bfloat16).save_pretrained(tmp_path / "transformers-bf16")
    sources.append(tmp_path / "transformers-bf16")
    model = load_model(sources[0])
    save_model(model, tmp_path / "per-expert", fmt="hf", dtype="bfloat16")
    save_model(model, tmp_path / "mistral", fmt="mistral")
    sources += [tmp_path / "per-expert", tmp_path / "mistral"]
    cfg = load_train_config(None, data=str(small_data), out=str(tmp_path / "run"), model="tiny-moe",
                            init_from=str(sources[0]))
    checkpoints.save(tmp_path / "run" / "checkpoints", step=1, model=model, optimizer=make_optimizer(model, cfg),
                     state=_state(model), keep=1)
    sources.append(tmp_path / "run")
    assert checkpoints.init_config(sources[-1]) == model.config
    assert json.loads((sources[1] / "config.json").read_text())["dtype"] == "bfloat16"
    run_group(_job, [{"kind": "compare", "sources": [str(s) for s in sources], "data": str(small_data),
                     "dcp": str(tmp_path / "dcp"), "export": str(tmp_path / "export")}])
    assert checkpoints.validate(tmp_path / "dcp" / "checkpoints" / "step_00000001")["format"] == "dcp"
    _check_export(tmp_path / "export", sources[0], tmp_path / "single")


def _check_export(path: Path, src: Path, single: Path) -> None:
    """A sharded export (`path`, of the weights of `src`): size-bounded shards and transformers' index,
    which transformers and mixlab load with the logits of the one-process export (`single`) of the
    same weights, bit for bit."""
    from transformers import MixtralForCausalLM

    from mixlab import load_model

    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert max(f.stat().st_size for f in shards) < 10_000 + 2_000  # the bound, a header, one tensor at most
    save_model(load_model(src), single)
    x = torch.randint(0, 67, (2, 9), generator=torch.Generator().manual_seed(3))
    got, want = load_model(path), load_model(single)
    for (n, p), (_, q) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert torch.equal(got(x), want(x))
    hf_got, hf_want = (MixtralForCausalLM.from_pretrained(p).eval() for p in (path, single))
    with torch.no_grad():
        assert torch.equal(hf_got(x).logits, hf_want(x).logits)
        torch.testing.assert_close(hf_got(x).logits, got(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets and reads the peak memory in /proc")
@pytest.mark.parametrize("fsdp", [False, True])
def test_no_process_loads_the_whole_checkpoint(small_data: Path, tmp_path: Path, fsdp: bool) -> None:
    """`train` with `init_from` under --ep 2 (and --fsdp) on a ~100 MB model whose experts are most of
    it: each process reads its half of the experts (and its FSDP shard of the rest); every process
    used to load the whole checkpoint, then keep its share."""
    big = {"dim": 256, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64, "ffn_dim": 512,
           "moe": {"num_experts": 8, "top_k": 2}}
    base = dict(data=str(small_data), out=str(tmp_path / "run"), model="tiny-moe", seq_len=16, batch_size=2, steps=1,
                eval_every=0, progress=False, tensorboard=False, threads=1)
    from mixlab.model import Transformer

    cfg = load_train_config(None, **base, model_overrides=big)
    model = Transformer(build_model_config(cfg, TokenDataset(small_data)))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "init")
    del model
    run_group(_job, [{"kind": "memory", "fsdp": fsdp, "report": str(tmp_path / "mem"),
                     "cfg": base | {"init_from": str(tmp_path / "init")}}])
    for rank in range(2):
        got = json.loads((tmp_path / f"mem.{rank}.json").read_text())
        # half the experts (~47%) + the dense weights + slack for the allocator; the whole model before
        assert got["grown"] < 0.75 * got["model"], (rank, got)


def _partition(shape: tuple[int, ...], cut: float) -> list[tuple[slice, ...]]:
    """Pieces that together cover a tensor of `shape` once: dim 0 cut at `cut`, its first part cut
    again on dim 1."""
    a, rest = max(1, int(shape[0] * cut)), tuple(slice(0, n) for n in shape[1:])
    if len(shape) == 1:
        return [(slice(0, a),), (slice(a, shape[0]),)]
    b = int(shape[1] * cut)
    return [(slice(0, a), slice(0, b), *rest[1:]), (slice(0, a), slice(b, shape[1]), *rest[1:]),
            (slice(a, shape[0]), *rest)]


@pytest.mark.parametrize("fmt", ["hf", "hf-fused", "mistral"])
def test_pieces_read_only_their_elements(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process: every weight cut into pieces along its first two dimensions at uneven places
    (inside q, across an expert's w1 / w3 rows, between experts): each piece equals that slice of the
    whole `load_init`, and together they read each stored byte once (the Mistral format's rotary q / k
    rows, which are no run of wqkv's, read wqkv whole for each of its pieces)."""
    import mixlab.checkpoint.io as io
    from mixlab import load_model

    src = hf_mixtral(tmp_path / "transformers", vocab_size=67, hidden_size=24, intermediate_size=20,
                     num_attention_heads=3, num_key_value_heads=1, head_dim=8)
    save_model(load_model(src), tmp_path / fmt, fmt=fmt, dtype="bfloat16")
    cfg = checkpoints.init_config(tmp_path / fmt)
    whole = dict(checkpoints.load_init(tmp_path / fmt, cfg).named_parameters())
    read = [0]
    pread = io._pread_into

    def counted(fd: int, buf: memoryview, *args: Any) -> None:
        read[0] += len(buf)
        pread(fd, buf, *args)

    monkeypatch.setattr(io, "_pread_into", counted)
    for cut in (0.3, 0.55):
        for name, w in whole.items():
            for index in _partition(tuple(w.shape), cut):
                dest = torch.full(w[index].shape, float("nan"))
                checkpoints.load_init_pieces(tmp_path / fmt, cfg, {name: (dest, index)}, dict)
                assert torch.equal(dest, w[index]), (name, index)
    stored = sum(i.nbytes for i in io.scan(tmp_path / fmt).values())
    rotary = sum(whole[f"layers.{i}.attn.wqkv.weight"].numel() * 2 for i in range(cfg.n_layers))  # bf16 bytes
    assert read[0] == 2 * (stored + (3 - 1) * rotary * (fmt == "mistral")), (read[0], stored)


def test_a_piece_holding_nan_is_warned_of(tmp_path: Path) -> None:
    """As `load_model` warns of a tensor holding NaN or Inf, so does a piece read alone; a piece
    without one is read silently."""
    import warnings

    from mixlab import load_model

    model = load_model(hf_mixtral(tmp_path / "transformers"))
    with torch.no_grad():
        model.tok_embeddings.weight[100, 3] = float("nan")
    save_model(model, tmp_path / "nan")
    cfg = checkpoints.init_config(tmp_path / "nan")
    dest = torch.empty(64, cfg.dim)

    def rows(a: int) -> dict[str, checkpoints.Piece]:
        return {"tok_embeddings.weight": (dest, (slice(a, a + 64), slice(0, cfg.dim)))}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoints.load_init_pieces(tmp_path / "nan", cfg, rows(0), dict)
    with pytest.warns(UserWarning, match=r"model.safetensors: tensor 'tok_embeddings.weight' \(model.embed_tokens"
                                         r".weight\) holds NaN or Inf values"):
        checkpoints.load_init_pieces(tmp_path / "nan", cfg, rows(64), dict)
