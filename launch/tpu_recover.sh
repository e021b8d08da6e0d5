#!/usr/bin/env bash
# Bring a preempted Spot / queued-resource TPU back and resume its run.
#
# A preempted Spot TPU VM stays in the PREEMPTED state (a queued resource in
# SUSPENDED or FAILED): it cannot be restarted, only deleted and created
# again, and the new VM has a fresh disk. So, in order:
#   1. query the state; READY (queued: ACTIVE) skips 2-3;
#   2. delete the VM (queued: the queued resource and its node);
#   3. create it again (queued: and wait until ACTIVE);
#   4. set up every worker (tpu_setup.sh: Python, venv, checkout, pip);
#   5. stop anything left on the workers (tpu_kill.sh; kept VM only);
#   6. start the same training command (tpu_train.sh): main finds the last
#      checkpoint in the gs:// workdir and resumes there, data order included.
# Every step is the corresponding launch script; --dry-run prints them all
# (the state is not queried then, so steps 2-3 are shown).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HERE=$(dirname "${BASH_SOURCE[0]}")

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE --accelerator_type=TYPE --version=RUNTIME
         --repo=GIT_URL --config=CONFIG --workdir=gs://BUCKET/DIR
         [--config.FIELD=VALUE ...] [--spot] [--queued] [--branch=main]
         [--project=PROJECT] [--eval] [--force_recreate] [--dry-run]

Recreate a preempted Spot or queued-resource TPU and resume its run from
the checkpoints in --workdir. Give the same --config, --config.* and
--workdir as the interrupted run.

  --name, --zone, --project      the TPU
  --accelerator_type, --version  as for tpu_create.sh (a smaller slice also
                                 resumes, if the global batch divides by its
                                 devices)
  --spot, --queued               as for tpu_create.sh
  --repo, --branch               as for tpu_setup.sh
  --config, --workdir, --config.FIELD=VALUE, --eval
                                 as for tpu_train.sh
  --force_recreate               delete and create even if the TPU is READY
  --dry-run                      print every command instead of running it
EOF
}

NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" VERSION="" REPO="" BRANCH=main
CONFIG="" WORKDIR="" SPOT=0 QUEUED=0 EVAL=0 FORCE_RECREATE=0
parse_flags "name zone project accelerator_type version repo branch config workdir config.*" \
  "spot queued eval force_recreate" "$@"
require_flags name zone accelerator_type version repo config workdir
[[ $WORKDIR == gs://?* ]] ||
  die "--workdir=$WORKDIR: the run can only resume from a gs:// workdir (a recreated VM has a new disk)"
require_cmd gcloud
tpu_scope_flags

scope=("--name=$NAME" "--zone=$ZONE")
[[ -z $PROJECT ]] || scope+=("--project=$PROJECT")
pass=()
[[ $DRY_RUN == 0 ]] || pass+=(--dry-run)
queued=()
[[ $QUEUED == 0 ]] || queued+=(--queued)

recreate=1
if [[ $DRY_RUN == 0 && $FORCE_RECREATE == 0 ]]; then
  if [[ $QUEUED == 1 ]]; then
    state=$(queued_state)
    [[ $state != ACTIVE ]] || recreate=0
  else
    state=$(gcloud compute tpus tpu-vm describe "$NAME" "${TPU_SCOPE[@]}" \
      --format='value(state)' 2>/dev/null || echo NOT_FOUND)
    [[ $state != READY ]] || recreate=0
  fi
  printf '%s: %s is %s\n' "$SCRIPT_NAME" "$NAME" "$state" >&2
fi

if [[ $recreate == 1 ]]; then
  # Deleting a TPU that does not exist fails: fine, it is gone.
  bash "$HERE/tpu_delete.sh" "${scope[@]}" ${queued[@]+"${queued[@]}"} --yes \
    ${pass[@]+"${pass[@]}"} || true
  create=("${scope[@]}" "--accelerator_type=$ACCELERATOR_TYPE" "--version=$VERSION")
  [[ $SPOT == 0 ]] || create+=(--spot)
  bash "$HERE/tpu_create.sh" "${create[@]}" ${queued[@]+"${queued[@]}"} \
    ${pass[@]+"${pass[@]}"}
fi
bash "$HERE/tpu_setup.sh" "${scope[@]}" "--repo=$REPO" "--branch=$BRANCH" \
  ${pass[@]+"${pass[@]}"}
if [[ $recreate == 0 ]]; then
  bash "$HERE/tpu_kill.sh" "${scope[@]}" ${pass[@]+"${pass[@]}"}
fi
train=("${scope[@]}" "--config=$CONFIG" "--workdir=$WORKDIR")
[[ $EVAL == 0 ]] || train+=(--eval)
bash "$HERE/tpu_train.sh" "${train[@]}" \
  ${CONFIG_OVERRIDES[@]+"${CONFIG_OVERRIDES[@]}"} ${pass[@]+"${pass[@]}"}
