#!/usr/bin/env bash
# Set up .venv and run the main job: `mixlab demo` (trains a tiny MoE on embedded data, then
# generates and summarises routing). Extra arguments go to `mixlab demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot
exec .venv/bin/mixlab demo "$@"
