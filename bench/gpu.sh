#!/usr/bin/env bash
# Every GPU number of bench/RESULTS.md from one command.
#
#   bench/gpu.sh                 # on a CUDA machine (jax[cuda], CUDA torch)
#   bench/gpu.sh --tiny          # the same at toy sizes on the CPU (tests)
#   bench/gpu.sh --peak_flops=989e12 --smoke_seconds=180 --out=DIR \
#       --results=bench/RESULTS.md
#
# Step throughput (ResNet-18 224 px bf16 batch 256, CL/NCL/BayesNCL; JAX vs
# PyTorch eager vs torch.compile; MFU, peak memory), the device-crop input
# pipeline feeding the real step, and a bf16 training smoke. Writes JSON to
# bench/gpu_runs/ and appends Markdown tables naming the GPU to
# bench/RESULTS.md. Details: bench/gpu_suite.py.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo}"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
# JAX and PyTorch run in separate processes; still, do not let a JAX process
# grab 75% of the GPU up front.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
python="${PYTHON:-python}"

tiny=0
for arg in "$@"; do
  if [[ "${arg}" == "--tiny" ]]; then
    tiny=1
  fi
done
if [[ "${tiny}" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  unset XLA_FLAGS
elif ! command -v nvidia-smi > /dev/null 2>&1; then
  echo "bench/gpu.sh: no nvidia-smi, so no CUDA GPU here. Use" \
    "'bench/gpu.sh --tiny' for the CPU version." >&2
  exit 2
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

exec "${python}" bench/gpu_suite.py "$@"
