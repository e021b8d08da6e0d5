#!/usr/bin/env bash
# Stop the training/evaluation job on EVERY worker and free the TPU.
#
# 1. SIGTERM to the Python process of bayesncl_jax.main / .evaluate itself —
#    not to the tmux server or the `sh -c` wrapper around it, whose command
#    lines also mention bayesncl_jax.main: killing those closes the pane and
#    Python dies of SIGHUP without saving. On SIGTERM main saves a checkpoint
#    (on a pod: all workers at the same step) and exits with status 143.
# 2. Wait up to --timeout seconds for it to exit (the checkpoint is being
#    written to the bucket), then SIGKILL whatever is left.
# 3. Kill any other holder of the TPU device files (/dev/accel* on v2-v4
#    runtimes, /dev/vfio/* on v5e/v5p/v6e) and remove the stale
#    /tmp/libtpu_lockfile a killed process leaves behind; without this the
#    next run fails with "TPU in use" / "unable to initialize backend 'tpu'".
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE [--project=PROJECT] [--timeout=300]
         [--venv=$DEFAULT_VENV] [--dry-run]

Stop bayesncl_jax jobs on all workers (checkpoint first) and free the TPU.

  --name     TPU name
  --zone     zone of the TPU
  --project  GCP project (default: gcloud's configured project)
  --timeout  seconds to wait for the job to save its checkpoint and exit
             after SIGTERM, before SIGKILL (default: 300)
  --venv     the venv the job runs from, as given to tpu_setup.sh (its
             python is the process that is signalled)
  --dry-run  print the gcloud command instead of running it
EOF
}

NAME="" ZONE="" PROJECT="" TIMEOUT=300 VENV=$DEFAULT_VENV
parse_flags "name zone project timeout venv" "" "$@"
require_flags name zone timeout venv
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout=$TIMEOUT: expected seconds"
require_cmd gcloud

# The job's own process: its command line STARTS with the venv's python
# (tpu_train.sh runs `VENV/bin/python -u -m bayesncl_jax.main ...`); the tmux
# server and the sh -c wrapper start with tmux / sh, and the remote shell
# running this very line starts with bash or sh, so none of them match.
venv_name=$(basename "$VENV")
[[ $venv_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--venv=$VENV: use a folder name of letters, digits, _ . -"
pattern=$(shq "^([^ ]*/)?$venv_name/bin/python[0-9.]* (-u )?-m bayesncl_jax[.](main|evaluate)( |\$)")
devices='/dev/accel* /dev/vfio/*'
# shellcheck disable=SC2016  # $(hostname), $i are for the worker's shell.
steps=(
  # sudo: the job may belong to another ssh user (each gcloud account is one).
  "if sudo pkill -TERM -f $pattern; then echo \"\$(hostname): SIGTERM sent, waiting up to ${TIMEOUT}s for the checkpoint\"; fi"
  "i=0; while sudo pgrep -f $pattern >/dev/null && [ \$i -lt $TIMEOUT ]; do sleep 1; i=\$((i + 1)); done"
  "if sudo pkill -KILL -f $pattern; then echo \"\$(hostname): still running after ${TIMEOUT}s: killed (no checkpoint)\"; fi"
  # Show, then kill, any other process still holding a TPU device (a pattern
  # that matches nothing stays literal: 2>/dev/null hides "no such file").
  "sudo lsof -w $devices 2>/dev/null || true"
  "sudo fuser -k $devices 2>/dev/null || true"
  'sudo rm -f /tmp/libtpu_lockfile'
  'echo "$(hostname): TPU free"'
)
tpu_ssh_all "$(join_steps "${steps[@]}")"
