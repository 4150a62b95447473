"""CUDA end to end: loading straight to the GPU, prefill and decoding, the Triton kernel inside the
model, CUDA-graph decoding, a training step and the CLI's bf16 default. Every test here needs a GPU
and is skipped, with that reason, on a machine without one (benchmarks/gpu.sh runs them there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_mixtral

# Deterministic training on CUDA needs cuBLAS's fixed workspace, set before cuBLAS starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return hf_mixtral(tmp_path_factory.mktemp("hf"), num_local_experts=8, initializer_range=0.1)


@pytest.fixture(scope="module")
def ckpt32k(tmp_path_factory) -> Path:
    """With Mixtral's vocabulary and a tokenizer.json, for the commands that tokenize text."""
    from conftest import hf_tokenizer_json

    path = hf_mixtral(tmp_path_factory.mktemp("hf32k"), vocab_size=32000, hidden_size=32, intermediate_size=48)
    hf_tokenizer_json(path)
    return path


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(seed))


def test_loads_straight_to_the_gpu_and_equals_the_cpu(ckpt):
    from mixlab import load_model

    gpu = load_model(ckpt, device="cuda")
    assert all(p.is_cuda for p in gpu.parameters())
    cpu = load_model(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(gpu(_ids().cuda()).cpu(), cpu(_ids()), rtol=1e-4, atol=1e-4)


def test_the_model_runs_the_triton_kernel_on_cuda(ckpt, monkeypatch):
    pytest.importorskip("triton")
    from mixlab import load_model
    from mixlab.ops import moe as moe_ops

    calls = []
    real = moe_ops.IMPLS["triton"]
    monkeypatch.setitem(moe_ops.IMPLS, "triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = load_model(ckpt, device="cuda")
    with torch.no_grad():
        model(_ids().cuda())
    assert calls, "moe_ffn did not choose the Triton kernel on CUDA"


def test_generate_on_cuda_equals_cpu(ckpt):
    from mixlab import generate, load_model

    prompts = [[5, 9, 13, 3], [7, 8]]
    want = generate(load_model(ckpt), prompts, max_new_tokens=12)
    assert generate(load_model(ckpt, device="cuda"), prompts, max_new_tokens=12) == want


def test_cuda_graph_decoding_equals_generate(ckpt):
    pytest.importorskip("triton")
    from mixlab import generate, load_model
    from mixlab.graphs import StaticDecoder

    model = load_model(ckpt, device="cuda")
    prompts = [[5, 9, 13, 4], [7, 8], [3, 3, 3, 3, 3, 3]]
    want = generate(model, prompts, max_new_tokens=16)
    for B in (1, 4):
        dec = StaticDecoder(model, batch_size=max(B, len(prompts)) if B > 1 else 1, max_len=64, graph=True)
        got = [dec.generate([p], 16)[0] for p in prompts] if B == 1 else dec.generate(prompts, 16)
        assert got == want


def test_bfloat16_model_on_cuda_keeps_the_router_in_float32(ckpt):
    from mixlab import load_model

    model = load_model(ckpt, dtype="bfloat16", device="cuda")
    with torch.no_grad():
        routing = model.forward_output(_ids().cuda()).routing
    assert routing[0].logits_TE.dtype == torch.float32


def test_a_training_step_on_cuda_equals_the_cpu(ckpt):
    from mixlab import load_model

    losses = []
    for device in ("cpu", "cuda"):
        model = load_model(ckpt, device=device).train()
        x = _ids(16, seed=1).to(device)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        gnorm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
        losses.append((loss.item(), gnorm.item()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_cli_generate_on_cuda(ckpt32k):
    """`mixlab generate --device cuda` (bf16 by default there)."""
    r = subprocess.run([sys.executable, "-m", "mixlab", "generate", "--model", str(ckpt32k), "--device", "cuda",
                        "--prompt", "hello", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_trainer_on_cuda_resumes_exactly(tmp_path):
    """`mixlab train --device cuda` (bf16 autocast, the Triton experts' backward): a run stopped and
    resumed equals a straight run."""
    import json

    from mixlab.train.data import prepare, read_documents
    from mixlab.train.loop import load_train_config, train

    src = tmp_path / "src" / "prose"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text("".join(json.dumps({"text": f"The {i}th cat sat on the mat. " * 4}) + "\n"
                                             for i in range(40)))
    prepare(read_documents([tmp_path / "src"]), tmp_path / "ds")
    tiny = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "ffn_dim": 96,
            "max_seq_len": 64, "moe": {"num_experts": 4, "top_k": 2}}

    def cfg(out):
        return load_train_config(None, data=str(tmp_path / "ds"), out=str(out), model="tiny-moe",
                                 model_overrides=tiny, seq_len=32, batch_size=4, steps=6, warmup=2, lr=3e-3,
                                 eval_every=0, ckpt_every=0, log_every=1, progress=False, tensorboard=False,
                                 export_hf=False, deterministic=True, device="cuda", dtype="bfloat16")

    straight = train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b"), stop_after=3)
    resumed = train(cfg(tmp_path / "b"), resume=True)
    assert [r["loss"] for r in straight.history][3:] == [r["loss"] for r in resumed.history]
    assert all(p.is_cuda for p in straight.model.parameters())


def test_eval_on_cuda_equals_the_cpu(ckpt32k, tmp_path):
    """`mixlab eval --device cuda` gives the CPU's token log-likelihoods (float32)."""
    import json

    from mixlab.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "The cat sat on the mat. " * (i + 3)}) + "\n" for i in range(3)))
    res = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert main(["eval", "--model", str(ckpt32k), "--data", str(data), "--context", "32", "--dtype", "float32",
                     "--device", device, "--json", str(out), "--quiet"]) == 0
        res[device] = json.loads(out.read_text())["overall"]
    assert res["cuda"]["tokens"] == res["cpu"]["tokens"]
    assert res["cuda"]["bits_per_byte"] == pytest.approx(res["cpu"]["bits_per_byte"], rel=1e-4)


def test_server_on_cuda(ckpt32k):
    """The engine and the OpenAI-compatible server over a model on the GPU: a completion equals
    `mixlab.generate` on the same model."""
    from fastapi.testclient import TestClient

    from mixlab import generate, load_model, load_tokenizer
    from mixlab.engine import Engine
    from mixlab.serve import ServerConfig, create_app

    model, tok = load_model(ckpt32k, device="cuda"), load_tokenizer(ckpt32k)
    moe = model.config.moe
    info = {"layers": model.config.n_layers, "experts": moe.num_experts, "experts_per_token": moe.top_k,
            "vocab_size": model.config.vocab_size}
    cfg = ServerConfig(model_name="m", context_len=256, model_info=info)
    with Engine(model, tok, max_batch=4) as engine:
        client = TestClient(create_app(engine, tok, cfg))
        r = client.post("/v1/completions", json={"model": "m", "prompt": "Hello there", "max_tokens": 8,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    ids = tok.encode("Hello there", bos=True)
    full = tok.decode(ids + generate(model, [ids], max_new_tokens=8)[0])
    assert text == full[len(tok.decode(ids)):]


def test_sft_on_cuda(ckpt32k, tmp_path):
    """`mixlab sft --device cuda` runs and exports."""
    import json

    from mixlab.cli import main

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                                     {"role": "assistant", "content": f"{i} {i} {i}"}]}) + "\n"
                            for i in range(12)))
    assert main(["sft", "--model", str(ckpt32k), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--seq-len", "64", "--batch-size", "2", "--device", "cuda", "--lora-rank", "2", "--merge"]) == 0
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
