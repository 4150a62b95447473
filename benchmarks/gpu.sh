#!/usr/bin/env bash
# The one prepared GPU check (issue 19), at most ~8 minutes on one H200:
#   1. the GPU tests (tests/test_triton_moe.py, tests/test_graphs.py, tests/test_cuda.py) on CUDA;
#   2. benchmarks/gpu.py: bandwidth and bf16 peak probes, the MoE layer at T = 1..8192 against
#      torch._grouped_mm and transformers, decode (batch 1 and 32, CUDA graphs) and 2k prefill for
#      mini-moe and a random-weight Mixtral-8x7B.
# Results: $OUT/gpu.json (or ./gpu.json) and $OUT/gpu-tests.log.
# Uses the machine's python3 with its torch and triton; mixlab runs from src/ (no install needed).
# Packages the machine may lack (mistral-common, gguf, hypothesis) are only needed by tests not run here.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-tests.log"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu-tests.log"
timeout 240 $py -m pytest -q -p no:cacheprovider -o addopts="" tests/test_triton_moe.py tests/test_graphs.py \
    tests/test_cuda.py 2>&1 | tee -a "$out/gpu-tests.log"
timeout 300 $py benchmarks/gpu.py --out "$out/gpu.json" 2>&1 | tee -a "$out/gpu-tests.log"
