#!/usr/bin/env bash
# The backgrounds-testbed ledger, NCL vs BayesNCL-STE at ResNet-18 width, on
# one GPU in at most 8 minutes.
#
#   bench/gpu_ledger.sh --stage     # here, once: Fashion-MNIST IDX files into
#                                   # .ledger_data/ (git-ignored), to carry
#   bench/gpu_ledger.sh [--ledger=DIR] [--out=DIR] [--steps=1172] [--seeds=0]
#                                   # on a CUDA machine (jax[cuda])
#   bench/gpu_ledger.sh --tiny      # the same at toy sizes on the CPU (tests)
#
# With the device tool: run(command="bench/gpu_ledger.sh --ledger=$OUT/ledger",
# carry=[".ledger_data"], timeout_s=540). Budget (5.0 epochs), model and data
# handling: bench/gpu_ledger.py.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo}"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export PYTHONUNBUFFERED=1
python="${PYTHON:-$(command -v python || command -v python3)}"

mode=gpu
for arg in "$@"; do
  case "${arg}" in
    --tiny) mode=tiny ;;
    --stage|--dry_run|-h|--help) mode=host ;;
  esac
done
if [[ "${mode}" == tiny ]]; then
  export JAX_PLATFORMS=cpu
  unset XLA_FLAGS
elif [[ "${mode}" == gpu ]]; then
  if ! command -v nvidia-smi > /dev/null 2>&1; then
    echo "bench/gpu_ledger.sh: no nvidia-smi, so no CUDA GPU here. Use" \
      "'bench/gpu_ledger.sh --tiny' for the CPU version." >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi

exec "${python}" bench/gpu_ledger.py "$@"
