#!/usr/bin/env bash
# Free the TPU on EVERY worker: stop bayesncl_jax.main / .evaluate (TERM, up
# to 10 s to exit, then KILL), kill whatever still holds the TPU device files
# (/dev/accel* on v2-v4 runtimes, /dev/vfio/* on v5e/v5p/v6e), and remove the
# stale /tmp/libtpu_lockfile a killed process leaves behind. Without this, the
# next run fails with "TPU in use" / "unable to initialize backend 'tpu'".
# The tmux session of a killed job closes by itself.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run]

Kill stale training/evaluation processes and TPU holders on all workers.

  --name     TPU name
  --zone     zone of the TPU
  --project  GCP project (default: gcloud's configured project)
  --dry-run  print the gcloud command instead of running it
EOF
}

NAME="" ZONE="" PROJECT=""
parse_flags "name zone project" "" "$@"
require_flags name zone
require_cmd gcloud

# [.] so that the pattern does not match the command line of the remote shell
# running this very command (pkill -f would kill the ssh session itself).
pattern=$(shq 'bayesncl_jax[.](main|evaluate)')
devices='/dev/accel* /dev/vfio/*'
# shellcheck disable=SC2016  # $(hostname) is for the worker's shell.
steps=(
  # sudo: the job may belong to another ssh user (each gcloud account is one).
  "sudo pkill -TERM -f $pattern || true"
  "for _ in 1 2 3 4 5 6 7 8 9 10; do pgrep -f $pattern >/dev/null || break; sleep 1; done"
  "sudo pkill -KILL -f $pattern || true"
  # Show, then kill, any other process still holding a TPU device (a pattern
  # that matches nothing stays literal: 2>/dev/null hides "no such file").
  "sudo lsof -w $devices 2>/dev/null || true"
  "sudo fuser -k $devices 2>/dev/null || true"
  'sudo rm -f /tmp/libtpu_lockfile'
  'echo "$(hostname): TPU free"'
)
tpu_ssh_all "$(join_steps "${steps[@]}")"
