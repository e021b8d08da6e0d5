#!/usr/bin/env bash
# Install the project on EVERY worker of a TPU VM (one ssh to --worker=all).
# Idempotent: each step checks before it acts (apt packages, venv) or is a
# no-op when already done (git fetch + fast-forward, pip install), so running
# it twice, or after adding code, is safe and just updates the checkout.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE --repo=GIT_URL [--branch=main]
         [--project=PROJECT] [--jax_version=0.10.2] [--python=python3]
         [--repo_dir=$DEFAULT_REPO_DIR] [--venv=$DEFAULT_VENV] [--dry-run]

On every worker: apt-get git, tmux and PYTHON-venv if missing; create the venv
if absent; clone the repo (or fetch + fast-forward it); pip install
requirements.txt, the project (-e) and "jax[tpu]==JAX_VERSION" (last, so the
TPU pin wins).

  --name         TPU name
  --zone         zone of the TPU
  --repo         git URL of this project, readable from the workers
  --branch       branch or tag to check out (default: main)
  --project      GCP project (default: gcloud's configured project)
  --jax_version  jax[tpu] version (default 0.10.2, the requirements.txt pin;
                 empty = latest)
  --python       interpreter for the venv: python3, python3.11, ...
  --repo_dir     checkout on the workers (default: $DEFAULT_REPO_DIR)
  --venv         virtualenv on the workers (default: $DEFAULT_VENV)
  --dry-run      print the gcloud command instead of running it
EOF
}

NAME="" ZONE="" PROJECT="" REPO="" BRANCH="main" JAX_VERSION="0.10.2"
PYTHON="python3" REPO_DIR=$DEFAULT_REPO_DIR VENV=$DEFAULT_VENV
parse_flags "name zone project repo branch jax_version python repo_dir venv" \
  "" "$@"
require_flags name zone repo branch repo_dir venv
# A bare interpreter name: it also names the apt package (python3.11-venv).
[[ $PYTHON =~ ^python3(\.[0-9]+)?$ ]] ||
  die "--python=$PYTHON: expected python3 or python3.N"
[[ -z $JAX_VERSION || $JAX_VERSION =~ ^[0-9][0-9a-z.]*$ ]] ||
  die "--jax_version=$JAX_VERSION is not a version number"
require_cmd gcloud

repo_dir=$(remote_path "$REPO_DIR")
venv_py="$(remote_path "$VENV")/bin/python"
pip="$venv_py -m pip install -q"
steps=(
  'set -eu'
  # apt waits for the lock that unattended-upgrades holds on a fresh VM.
  "if ! command -v git >/dev/null || ! command -v tmux >/dev/null || ! $PYTHON -c 'import ensurepip' 2>/dev/null; then sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq git tmux $PYTHON-venv; fi"
  "if [ ! -x $venv_py ]; then $PYTHON -m venv $(remote_path "$VENV"); fi"
  "$pip -U pip"
  "if [ -d $repo_dir/.git ]; then git -C $repo_dir fetch -q origin $(shq "$BRANCH") && git -C $repo_dir checkout -q $(shq "$BRANCH") && git -C $repo_dir merge -q --ff-only FETCH_HEAD; else git clone -q --branch $(shq "$BRANCH") $(shq "$REPO") $repo_dir; fi"
  "$pip -r $repo_dir/requirements.txt"
  "$pip --no-deps -e $repo_dir"
  "$pip -U $(shq "jax[tpu]${JAX_VERSION:+==$JAX_VERSION}")"
  # Imports only: initialising the TPU backend on a pod needs all workers.
  "$venv_py -c 'import jax, bayesncl_jax; print(\"jax\", jax.__version__, \"ok\")'"
)
tpu_ssh_all "$(join_steps "${steps[@]}")"
