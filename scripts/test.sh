#!/usr/bin/env bash
# Set up .venv with the test and peer dependencies, then lint, type-check and run the tests.
# llama-cpp-python compiles llama.cpp on first install (about 10 minutes on 2 cores); pip caches it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,peers
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
