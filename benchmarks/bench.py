"""Inference benchmark: mixlab vs transformers vs llama.cpp on mini-moe (see `mixlab bench --help`).

    .venv/bin/python benchmarks/bench.py            # the full run recorded in BENCHMARKS.md
    .venv/bin/python benchmarks/bench.py --quick    # a smoke run on a tiny model

On a shared machine, OpenMP threads that spin while waiting at a barrier lose their time slice to
other processes and stall every parallel op; passive waiting avoids that (it must be set before
OpenMP starts, hence here, before torch is imported). Set OMP_WAIT_POLICY yourself to override.
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mixlab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
