"""n samples of one long prompt through the engine: the running prefix shared (the default) against
prefix_cache=False (each choice prefills the whole prompt), alternated round by round, medians.
With --scored: n endings of one context scored as an evaluation harness does (prompt logprobs with
one alternative, one token generated: lm-eval's multiple choice through `/v1/completions` with
echo), each ending --ending tokens.

    .venv/bin/python benchmarks/prefix_share.py --model DIR [--prompt 1024 --n 4 --rounds 3] [--scored]
"""

import argparse
import statistics
import time

import torch

import mixlab
from mixlab.cli import positive
from mixlab.engine import Engine, SamplingParams
from mixlab.errors import MixlabError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (loaded in bf16)")
    ap.add_argument("--prompt", type=positive, default=1024, help="prompt tokens (random ids, BOS first)")
    ap.add_argument("--n", type=positive, default=4, help="samples of the prompt")
    ap.add_argument("--max-tokens", type=positive, default=8)
    ap.add_argument("--rounds", type=positive, default=3)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--scored", action="store_true", help="n endings of the prompt with prompt logprobs")
    ap.add_argument("--ending", type=positive, default=8, help="tokens of each ending, with --scored")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        model = mixlab.load_model(args.model, dtype="bfloat16")
    except MixlabError as e:  # a missing or broken folder: one line, as argparse says a bad flag
        ap.error(f"--model: {e}")
    g = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, model.config.vocab_size, (args.prompt - 1,), generator=g).tolist()
    if args.scored:
        subs = [(prompt + torch.randint(3, model.config.vocab_size, (args.ending,), generator=g).tolist(),
                 SamplingParams(max_tokens=1, logprobs=1, prompt_logprobs=True)) for _ in range(args.n)]
    else:
        subs = [(prompt, SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, ignore_eos=True))
                for i in range(args.n)]
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds + 1):  # round 0 warms up (kernels, packing)
        for share in (True, False):
            eng = Engine(model, max_batch=args.n, prefix_cache=share)
            t = time.perf_counter()
            hs = [eng.submit(p, params) for p, params in subs]
            eng.run_until_idle()
            for h in hs:
                h.result()
            if r:
                times[share].append(time.perf_counter() - t)
                print(f"round {r}: {'shared' if share else 'prefix_cache=False'} {times[share][-1]:.2f} s, "
                      f"{eng.stats()['tokens_in']} tokens run", flush=True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"median: shared {on:.2f} s, prefix_cache=False {off:.2f} s: {off / on:.2f}x")


if __name__ == "__main__":
    main()
