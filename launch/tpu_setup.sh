#!/usr/bin/env bash
# Install the project on EVERY worker of a TPU VM (one ssh to --worker=all).
# Idempotent: each step checks before it acts (Python, apt packages, venv) or
# is a no-op when already done (git fetch + fast-forward, pip install), so
# running it twice, or after adding code, is safe and just updates the
# checkout.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE --repo=GIT_URL [--branch=main]
         [--project=PROJECT] [--jax_version=0.10.2] [--python=auto]
         [--repo_dir=$DEFAULT_REPO_DIR] [--venv=$DEFAULT_VENV] [--dry-run]

On every worker: find a Python >= 3.11 (the pinned jax, numpy, flax, orbax
and grain need it; the Ubuntu 22.04 TPU runtime images ship 3.10) or install
python3.11 with apt (Ubuntu's universe, else the deadsnakes PPA); apt-get git
and tmux if missing; create the venv (one made by another Python version is
rebuilt); clone the repo (or fetch + fast-forward it); pip install
requirements.txt, the project (-e) and "jax[tpu]==JAX_VERSION" (last, so the
TPU pin wins).

  --name         TPU name
  --zone         zone of the TPU
  --repo         git URL of this project, readable from the workers
  --branch       branch or tag to check out (default: main)
  --project      GCP project (default: gcloud's configured project)
  --jax_version  jax[tpu] version (default 0.10.2, the requirements.txt pin;
                 empty = latest)
  --python       auto (default): the first of python3.13, python3.12,
                 python3.11, python3 that is >= 3.11, else apt python3.11;
                 or python3.N to insist on one (apt-installed if missing)
  --repo_dir     checkout on the workers (default: $DEFAULT_REPO_DIR)
  --venv         virtualenv on the workers (default: $DEFAULT_VENV)
  --dry-run      print the gcloud command instead of running it
EOF
}

NAME="" ZONE="" PROJECT="" REPO="" BRANCH="main" JAX_VERSION="0.10.2"
PYTHON="auto" REPO_DIR=$DEFAULT_REPO_DIR VENV=$DEFAULT_VENV
parse_flags "name zone project repo branch jax_version python repo_dir venv" \
  "" "$@"
require_flags name zone repo branch python repo_dir venv
# A bare interpreter name: it also names the apt packages (python3.11-venv).
[[ $PYTHON == auto || $PYTHON =~ ^python3(\.[0-9]+)?$ ]] ||
  die "--python=$PYTHON: expected auto, python3 or python3.N"
[[ -z $JAX_VERSION || $JAX_VERSION =~ ^[0-9][0-9a-z.]*$ ]] ||
  die "--jax_version=$JAX_VERSION is not a version number"
require_cmd gcloud

repo_dir=$(remote_path "$REPO_DIR")
venv=$(remote_path "$VENV")
venv_py="$venv/bin/python"
pip="$venv_py -m pip install -q"
# apt waits for the lock that unattended-upgrades holds on a fresh VM.
apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
# Exit status 0 iff the running interpreter is Python >= 3.11.
py_ok='import sys; sys.exit(sys.version_info < (3, 11))'
py_version='import sys; print(sys.version_info[:2])'

# The worker's shell expands \$PY, \$1, \$c, \$@ and \$(...); this script
# expands the rest now.
steps=(
  'set -eu'
  "pyok() { command -v \"\$1\" >/dev/null 2>&1 && \"\$1\" -c '$py_ok' 2>/dev/null; }"
  "apt_install() { $apt update -qq && $apt install -y -qq \"\$@\"; }"
)
if [[ $PYTHON == auto ]]; then
  steps+=(
    "PY=; for c in python3.13 python3.12 python3.11 python3; do if pyok \$c; then PY=\$c; break; fi; done"
    # Ubuntu 22.04: python3.11 is in universe; deadsnakes is the fall-back.
    "if [ -z \"\$PY\" ]; then PY=python3.11; apt_install python3.11 python3.11-venv || { sudo add-apt-repository -y ppa:deadsnakes/ppa && apt_install python3.11 python3.11-venv; }; fi"
  )
else
  steps+=(
    "PY=$PYTHON"
    "pyok \$PY || apt_install $PYTHON $PYTHON-venv || true"
  )
fi
steps+=(
  "pyok \$PY || { echo \"\$(hostname): error: \$PY is missing or older than Python 3.11, which the pinned jax needs; use --python=auto\" >&2; exit 1; }"
  "if ! command -v git >/dev/null || ! command -v tmux >/dev/null || ! \$PY -c 'import ensurepip' 2>/dev/null; then apt_install git tmux \$PY-venv; fi"
  # A venv made by another interpreter (say the image's python3 3.10, by an
  # older setup) would keep it: rebuild it.
  "if [ -x $venv_py ] && [ \"\$($venv_py -c '$py_version' 2>/dev/null)\" != \"\$(\$PY -c '$py_version')\" ]; then echo \"\$(hostname): rebuilding the venv with \$PY\"; rm -rf $venv; fi"
  "if [ ! -x $venv_py ]; then \$PY -m venv $venv; fi"
  "$pip -U pip"
  "if [ -d $repo_dir/.git ]; then git -C $repo_dir fetch -q origin $(shq "$BRANCH") && git -C $repo_dir checkout -q $(shq "$BRANCH") && git -C $repo_dir merge -q --ff-only FETCH_HEAD; else git clone -q --branch $(shq "$BRANCH") $(shq "$REPO") $repo_dir; fi"
  "$pip -r $repo_dir/requirements.txt"
  "$pip --no-deps -e $repo_dir"
  "$pip -U $(shq "jax[tpu]${JAX_VERSION:+==$JAX_VERSION}")"
  # Imports only: initialising the TPU backend on a pod needs all workers.
  "$venv_py -c 'import sys, jax, bayesncl_jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__, \"ok\")'"
)
tpu_ssh_all "$(join_steps "${steps[@]}")"
