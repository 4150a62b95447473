"""Other streams' largest inter-token gap while a large request body arrives at `mixlab serve`.

A `mixlab serve` process (tiny-moe with Mixtral's 32,000-token vocabulary, random weights; Mixtral's
tokenizer) decodes one stream after another (400 tokens each, read as server-sent events) while 4 MB
chat bodies are posted to it, one at a time, `--rounds` times per shape: 90,000 short messages,
130,000 text parts, one 4 MB message. Per shape: how long each body took to be answered and the
largest gap between two of the stream's tokens while it was being read (and 50 ms after); "no
large body" is the same stream undisturbed. `--src` serves another tree's `src` (before / after).

    .venv/bin/python benchmarks/large_body.py [--rounds 5] [--src path/to/other/src]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES: dict[str, Any] = {
    "no large body": None,
    "90k messages": {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello there"}
                                  for i in range(90_000)]},
    "130k text parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}] * 130_000}]},
    "one 4 MB message": {"messages": [{"role": "user", "content": "hello world " * 340_000}], "max_tokens": 1},
}


def _serve(model: Path, src: Path) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen([sys.executable, "-m", "mixlab", "serve", "--model", str(model), "--port", "0",
                          "--log-level", "warning", "--max-batch", "4", "--threads", "1"],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(src)})
    assert p.stderr is not None
    for line in p.stderr:
        if m := re.search(r" on (http://\S+) ", line):
            threading.Thread(target=p.stderr.read, daemon=True).start()  # keep its pipe from filling
            return p, m.group(1)
    raise SystemExit(f"mixlab serve did not start (exit status {p.wait()})")


def _stream(url: str, stop: threading.Event, gaps: list[tuple[float, float]]) -> None:
    """Streams one after another until `stop`; (arrival, gap since the previous token) of each token."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            body = {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
            last = None
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    now = time.perf_counter()
                    if line.startswith("data: {"):
                        if last is not None:
                            gaps.append((now, now - last))
                        last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="bodies of each shape (default 5)")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the mixlab sources to serve (default this tree's)")
    args = ap.parse_args()

    import torch

    from mixlab.checkpoint import save_model
    from mixlab.config import get_preset
    from mixlab.model import Transformer

    with tempfile.TemporaryDirectory(prefix="mixlab-large-body-") as tmp:
        model = Transformer(dataclasses.replace(get_preset("tiny-moe"), vocab_size=32000))
        model.init_weights(seed=0)
        save_model(model.to(torch.bfloat16), Path(tmp) / "m", fmt="hf")
        server, url = _serve(Path(tmp) / "m", args.src)
        try:
            print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}, "
                  f"serving {args.src}")
            for name, shape in SHAPES.items():
                raw = json.dumps(shape).encode() if shape is not None else b""
                stop, gaps = threading.Event(), []
                streams = threading.Thread(target=_stream, args=(url, stop, gaps))
                streams.start()
                time.sleep(1.0)
                windows = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    if shape is None:
                        time.sleep(0.5)
                    else:
                        r = httpx.post(url + "/v1/chat/completions", content=raw, timeout=120,
                                       headers={"Content-Type": "application/json"})
                        assert r.status_code in (200, 400), r.text[:200]  # 400: longer than the context
                    windows.append((t0, time.perf_counter()))
                    time.sleep(0.5)
                stop.set()
                streams.join()
                worst = [max((g for at, g in gaps if a <= at <= b + 0.05), default=0.0) for a, b in windows]
                took = [b - a for a, b in windows]
                print(f"{name:17s} ({len(raw) / 1e6:.1f} MB): answered in {min(took) * 1e3:.0f}-{max(took) * 1e3:.0f} "
                      f"ms; streams' largest gap per body: {', '.join(f'{w * 1e3:.0f}' for w in worst)} ms",
                      flush=True)
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
