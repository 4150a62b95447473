"""End-to-end generation speed: mixlab `generate` against transformers `generate`, side by side.

Both run the same random weights (mixlab's `init_weights`, handed to transformers through
`save_model(fmt="hf")`), greedy, batch 1, the same prompt, exactly N new tokens (EOS ignored),
alternating run by run so a busy machine slows both alike. For each library:

  prefill tokens/s = prompt length / time(generate 1 token)
  decode tokens/s  = (N - 1) / (time(generate N tokens) - time(generate 1 token))
  end-to-end       = N / time(generate N tokens)

Usage: .venv/bin/python benchmarks/generate.py [--preset mini-moe] [--dtype bfloat16] [--threads 2]
       [--prompt-len 128] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import mixlab
from mixlab import save_model
from mixlab.cli import positive
from mixlab.config import get_preset
from mixlab.dtypes import DTYPES
from mixlab.generate import generate
from mixlab.model import Transformer
from mixlab.model.inference import prepare_for_inference


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--plain", action="store_true", help="the model as loaded, without prepare_for_inference")
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--prompt-len", type=positive, default=128)
    ap.add_argument("--new-tokens", type=positive, default=64)
    ap.add_argument("--repeats", type=positive, default=3)
    args = ap.parse_args()
    if args.new_tokens < 2:  # the decode rate is (N - 1) tokens over the N-token run minus the 1-token run
        ap.error(f"--new-tokens: expected at least 2, got {args.new_tokens}")

    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    cfg = get_preset(args.preset)
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"mixlab {mixlab.__version__}")
    print(f"cpu: {_cpu()}, {os.cpu_count()} cores, torch threads {args.threads}; load average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: {args.preset} ({cfg.param_counts()['total'] / 1e9:.2f} B parameters, random weights), "
          f"{args.dtype}; batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats} runs")

    ours = Transformer(cfg)
    ours.init_weights(seed=0)
    ours = ours.to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp, fmt="hf")
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    if not args.plain:  # what `mixlab generate` runs: native decoding kernels (model/inference.py)
        ours = prepare_for_inference(ours)
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0

    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    input_ids = torch.tensor([prompt])
    mask = torch.ones_like(input_ids)

    def run_ours(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        out = generate(ours, [prompt], max_new_tokens=n, stop_at_eos=False)[0]
        return time.perf_counter() - t, out

    def run_theirs(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = theirs.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, out[0, args.prompt_len :].tolist()

    runners = {"mixlab": run_ours, "transformers": run_theirs}
    for run in runners.values():  # warm-up: first-call allocations and kernel selection
        run(4)
    times: dict[str, dict[int, list[float]]] = {k: {1: [], args.new_tokens: []} for k in runners}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for n in (1, args.new_tokens):
            for name, run in runners.items():  # alternate, so load spikes hit both
                seconds, out = run(n)
                times[name][n].append(seconds)
                outputs[name] = out

    print(f"\n{'':14}{'prefill tok/s':>15}{'decode tok/s':>15}{'end-to-end tok/s':>19}{'total s':>10}")
    rates = {}
    for name in runners:
        t1 = statistics.median(times[name][1])
        tn = statistics.median(times[name][args.new_tokens])
        rates[name] = (args.new_tokens - 1) / (tn - t1)
        print(f"{name:14}{args.prompt_len / t1:15.1f}{rates[name]:15.2f}{args.new_tokens / tn:19.2f}{tn:10.2f}")
    for name in runners:
        print(f"{name} run times (s): 1 token {[round(t, 2) for t in times[name][1]]}, "
              f"{args.new_tokens} tokens {[round(t, 2) for t in times[name][args.new_tokens]]}")
    print(f"decode speed ratio mixlab / transformers: {rates['mixlab'] / rates['transformers']:.2f}x")
    same = sum(a == b for a, b in zip(outputs["mixlab"], outputs["transformers"], strict=True))
    print(f"greedy tokens equal to transformers': {same}/{args.new_tokens} ({args.dtype}: rounding may diverge)")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("command: .venv/bin/python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
