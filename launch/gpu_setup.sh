#!/usr/bin/env bash
# Install the project on THIS GPU host (run it on every host of a multi-node
# job, or once on a shared filesystem): a venv with a Python >= 3.11, the
# pinned requirements and the CUDA 12 jax wheel of the pinned jax version,
# in ONE pip call (so pip resolves them together and the CUDA plugin matches
# jax), then the project itself (-e). Idempotent; a venv made by another
# Python version is rebuilt.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [--venv=.venv] [--python=auto] [--jax_version=0.10.2] [--dry-run]

  --venv         virtualenv to create or update (default: .venv in the repo)
  --python       auto (default): the first of python3.13, python3.12,
                 python3.11, python3 that is >= 3.11; or a path/name
  --jax_version  version of "jax[cuda12]" (default: the requirements.txt pin)
  --dry-run      print the commands instead of running them

Needs an NVIDIA driver for CUDA 12 (nvidia-smi); the CUDA libraries come
from pip (jax's cuda12 extra).
EOF
}

VENV="$REPO_ROOT/.venv" PYTHON=auto
JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO_ROOT/requirements.txt")
parse_flags "venv python jax_version" "" "$@"
require_flags venv python jax_version
[[ $JAX_VERSION =~ ^[0-9][0-9a-z.]*$ ]] || die "--jax_version=$JAX_VERSION is not a version number"

py_ok() {
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
if [[ $PYTHON == auto ]]; then
  PYTHON=""
  for candidate in python3.13 python3.12 python3.11 python3; do
    if py_ok "$candidate"; then
      PYTHON=$candidate
      break
    fi
  done
  [[ -n $PYTHON ]] || die "no Python >= 3.11 found (python3 is $(python3 -V 2>&1 || echo missing)).
  Install one (Ubuntu 22.04: sudo apt-get install python3.11 python3.11-venv;
  or uv python install 3.11) and pass --python=python3.11"
else
  py_ok "$PYTHON" || die "--python=$PYTHON is missing or older than Python 3.11"
fi
version='import sys; print(sys.version_info[:2])'
make_venv=1
if [[ -x $VENV/bin/python ]]; then
  if [[ "$("$VENV/bin/python" -c "$version" 2>/dev/null)" == "$("$PYTHON" -c "$version")" ]]; then
    make_venv=0
  else
    printf '%s: %s was made by another Python version: rebuilding it with %s\n' \
      "$SCRIPT_NAME" "$VENV" "$PYTHON" >&2
    run rm -rf "$VENV"
  fi
fi
[[ $make_venv == 0 ]] || run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/python" -m pip install -q -U pip
# One resolution: the pins of requirements.txt and the CUDA wheels of the
# same jax version; a separate `pip install -U jax[cuda12]` would pull the
# newest jax and a plugin that no longer matches the pinned jaxlib.
run "$VENV/bin/python" -m pip install -q -r "$REPO_ROOT/requirements.txt" \
  "jax[cuda12]==$JAX_VERSION"
run "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO_ROOT"
run "$VENV/bin/python" -c 'import jax; print("jax", jax.__version__, jax.devices())'
