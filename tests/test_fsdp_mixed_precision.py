"""FSDP's bf16 mixed precision (`--fsdp --dtype bfloat16`, parallel/train.py `apply_fsdp`): two
processes (gloo, loopback) under `mixlab train --fsdp`, `--ep 2 --fsdp` and `mixlab sft --fsdp` (also
with activation checkpointing: the same losses) train as one process under bf16 autocast: the first
step's loss the same (the same bf16 products), the rest within a measured tolerance; inside their
sharded forward passes the blocks' and experts' parameters arrive gathered in bf16, while the router
(its weight and its logits), the norm scales, the embedding and the residual stream stay float32,
and so do the sharded master weights AdamW updates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mixlab.train.finetune import finetune, load_finetune_config
from mixlab.train.loop import load_train_config, train
from processes import run_group
from test_finetune_parallel import _settings, files

pytestmark = pytest.mark.slow  # four two-process runs and two one-process ones: ~10-15 s on 2 busy cores
__all__ = ["files"]  # the fixture: test_finetune_parallel.py's base model and conversations

TINY = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 48,
        "max_seq_len": 64, "moe": {"num_experts": 4, "top_k": 2, "jitter": 0.0, "z_loss_coef": 0.001}}
STEPS = 8


def _cfg(data: Path, out: Path) -> dict[str, Any]:
    return dict(data=str(data), out=str(out), model="tiny-moe", model_overrides=TINY, seq_len=32, batch_size=4,
                grad_accum=1, steps=STEPS, warmup=2, lr=3e-3, eval_every=0, ckpt_every=0, log_every=1,
                progress=False, tensorboard=False, export_hf=False, deterministic=True, threads=1,
                dtype="bfloat16")


def _job(rank: int, job: dict[str, Any]) -> None:
    """`train` (or `finetune`) under --fsdp (and --ep), the dtypes its forward passes see recorded by
    hooks on the sharded model."""
    from torch.distributed.tensor import DTensor

    from mixlab.model.moe import MoEBlock
    from mixlab.parallel.mesh import init
    from mixlab.parallel.train import DistributedTraining

    par = DistributedTraining(init(ep=job["ep"], fsdp=True))
    report = Path(job["report"])
    seen: dict[str, set[str]] = {}

    def note(key: str, t: torch.Tensor) -> None:  # its dtype, and whether it is a shard (FSDP's DTensor)
        seen.setdefault(key, set()).add(str(t.dtype).removeprefix("torch.") + (" shard" * isinstance(t, DTensor)))

    def hooked(*args: Any, **kw: Any) -> Any:
        model = build(*args, **kw)
        for block in model.layers:  # pre-hooks run after FSDP's own: the parameters are gathered
            block.register_forward_pre_hook(lambda m, a: note("block weight (gathered)", m.attn.wqkv.weight))
            block.register_forward_pre_hook(lambda m, a: note("block input", a[0]))
            for norm in (block.attn_norm, block.ffn_norm):
                norm.register_forward_pre_hook(lambda m, a: note("norm weight (gathered)", m.weight))
            assert isinstance(block.ffn, MoEBlock)
            block.ffn.register_forward_pre_hook(lambda m, a: note("experts' w13 (gathered)", m.experts.w13))
            block.ffn.gate.register_forward_pre_hook(lambda m, a: note("router weight (gathered)", m.weight))
            block.ffn.gate.register_forward_hook(lambda m, a, out: note("router logits", out.logits_TE))
            block.register_forward_hook(lambda m, a, out: note("block output", out[0]))
        model.tok_embeddings.register_forward_hook(lambda m, a, out: note("embedding output", out))
        for p in model.parameters():
            note("sharded parameters", p)
        return model

    build, par.build = par.build, hooked  # type: ignore[method-assign]
    r = (train(load_train_config(None, **job["cfg"]), parallel=par) if "task" not in job["cfg"] else
         finetune(load_finetune_config(None, **job["cfg"]), parallel=par))
    for p in r.model.parameters():  # trained: AdamW's master weights
        note("trained parameters", p)
    report.with_name(f"{report.name}.{rank}.json").write_text(json.dumps({k: sorted(v) for k, v in seen.items()}))


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(ln)]


RUNS = {"train": 1, "train_ep2": 2, "sft": 1, "sft_ac": 1}  # each two-process run: its --ep


@pytest.fixture(scope="module")
def runs(small_data: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process bf16 runs here, the two-process --fsdp ones in one group of processes."""
    root = tmp_path_factory.mktemp("fsdp_bf16")
    cfgs = {name: _cfg(small_data, root / name) if name.startswith("train") else
            _settings(files, "sft", root / name, dtype="bfloat16", steps=STEPS, eval_every=4, ckpt_every=0,
                      activation_checkpointing=name == "sft_ac")
            for name in RUNS}
    train(load_train_config(None, **(cfgs["train"] | {"out": str(root / "one_train")})))
    finetune(load_finetune_config(None, **(cfgs["sft"] | {"out": str(root / "one_sft")})))
    run_group(_job, [{"cfg": cfgs[name], "ep": ep, "report": str(root / name)} for name, ep in RUNS.items()],
              timeout=180)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp_gathers_blocks_in_bf16_and_routes_in_float32(runs: Path, name: str) -> None:
    for rank in (0, 1):
        seen = json.loads((runs / f"{name}.{rank}.json").read_text())
        assert seen == {
            "sharded parameters": ["float32 shard"], "trained parameters": ["float32 shard"],  # AdamW's
            # gathered in bf16: half the all-gather's bytes and half the gathered block
            "block weight (gathered)": ["bfloat16"], "experts' w13 (gathered)": ["bfloat16"],
            # routing in float32, from the float32 weights (model/moe.py); the norms scale in float32 and the
            # residual stream is float32, as under autocast without FSDP: the embedding (the root) gathered
            # in float32, no input cast
            "router weight (gathered)": ["float32"], "router logits": ["float32"],
            "norm weight (gathered)": ["float32"], "embedding output": ["float32"], "block input": ["float32"],
            "block output": ["float32"],
        }, rank


@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp_bf16_trains_as_one_bf16_autocast_process(runs: Path, name: str) -> None:
    want, got = _losses(runs / f"one_{name.split('_')[0]}"), _losses(runs / name)
    assert len(got) == len(want) == STEPS
    rel = [abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)]
    # The first step's loss (before any update) is one process's: the same bf16 products (a weight gathered
    # in bf16 is autocast's cast of it), a float32 residual stream and router; measured equal. A bf16
    # residual stream (the root gathered in bf16 or the inputs cast) moved it by 5.6e-6, a router gathered
    # in bf16 by 1.1e-6: 3e-7 is 2-3 float32 ulps of a loss near 4.
    assert rel[0] <= 3e-7, rel
    # Then bf16 gradients summed in another order (each process's half-batch, the reduce-scatter) drift
    # apart: measured at most 3.3e-4 relative over these 8 steps (sft; train 5.4e-5); the float32-gathering
    # FSDP before the policy drifted as far (3.8e-4), with bf16 norm scales sft drifted 5.2e-4 at step 2.
    assert max(rel) <= 1e-3, rel


def test_fsdp_bf16_with_activation_checkpointing_recomputes_the_same_numbers(runs: Path) -> None:
    """The recomputed blocks gather their units again in the backward, in the same dtypes."""
    assert _losses(runs / "sft_ac") == _losses(runs / "sft")
