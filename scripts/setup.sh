#!/usr/bin/env bash
# Make .venv in the repo root and install mixlab into it (editable).
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev,peers
# torch: if the venv has none, torch 2.13.0 is installed: the CPU build where pip's index serves it
# (this project's machines; elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, since
# PyPI's Linux wheel is the CUDA one); bring your own torch by installing it into .venv first (any
# version >= 2.13 is kept as it is). PYTHON picks the interpreter (default python3; 3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    py="${PYTHON:-python3}"
    if ! { command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; }; then
        found=$(command -v "$py" >/dev/null && "$py" -V 2>&1 || echo "not found")
        echo "setup failed: mixlab needs Python 3.11 or newer; $py: $found (PYTHON=python3.11 bash $0)" >&2
        exit 1
    fi
    "$py" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# llama.cpp's AMX kernels, which -march=native compiles into llama-cpp-python on Intel CPUs with AMX, stop
# the process with an illegal instruction on such hosts (a tile instruction without the tile state:
# ggml-org/llama.cpp#26954; seen on this project's Xeon hosts), so the peers get a build without them.
amx_host=false
[[ ",$extras," == *",peers,"* ]] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null && amx_host=true
build_llama_without_amx() {  # pip's wheel cache may hold a build with AMX: build from source
    local flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    echo "setup: building llama-cpp-python without AMX kernels (a few minutes)" >&2
    CFLAGS="$flags" CXXFLAGS="$flags" .venv/bin/python -m pip install -q --no-cache-dir --no-binary llama-cpp-python \
        "$@" 2>&1 | { grep -v -e "^WARNING: Location" -e "^$" || true; }
}
if $amx_host && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    build_llama_without_amx "llama-cpp-python>=0.3"
fi
# pip's own status decides (pipefail), not grep's: a failed install of an extra stops here
if ! .venv/bin/python -m pip install -q -e "$spec" 2>&1 | { grep -v -e "^WARNING: Location" -e "^$" || true; }; then
    echo "setup failed: pip could not install $spec (its message is above)" >&2
    exit 1
fi
if $amx_host && .venv/bin/python -c "import sys, llama_cpp
sys.exit(b'AMX_INT8 = 1' not in llama_cpp.llama_print_system_info())" 2>/dev/null; then  # an earlier setup's build
    build_llama_without_amx --force-reinstall --no-deps \
        "llama-cpp-python==$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
fi
.venv/bin/python -c "import mixlab" || { echo "setup failed: mixlab does not import" >&2; exit 1; }
