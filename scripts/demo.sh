#!/usr/bin/env bash
# Set up .venv and run the main job: `mixlab demo` (trains a tiny MoE on embedded data, then
# generates and summarises routing; plots in runs/demo/). Extra arguments go to `mixlab demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot
exec .venv/bin/mixlab demo --out runs/demo "$@"   # the run, loss.png and routing.png (replaced on a rerun)
