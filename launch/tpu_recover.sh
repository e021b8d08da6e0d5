#!/usr/bin/env bash
# Bring a preempted Spot / queued-resource TPU back and resume its run.
#
# A preempted Spot TPU VM stays in the PREEMPTED state (a queued resource in
# SUSPENDED or FAILED): it cannot be restarted, only deleted and created
# again, and the new VM has a fresh disk. So, in order:
#   1. query the state, waiting while it is transitional (CREATING,
#      STARTING, REPAIRING, ...; queued: PROVISIONING, WAITING_FOR_RESOURCES,
#      ...); READY (queued: ACTIVE) skips 2-3; a query that fails for any
#      other reason than "not found" stops here, deleting nothing;
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
         [--config.FIELD=VALUE ...] [--spot | --preemptible] [--queued]
         [--branch=main] [--python=auto] [--env=NAMES] [--stage_data=DIR]
         [--project=PROJECT] [--eval] [--force_recreate] [--poll=30]
         [--wait_timeout=1800] [--dry-run]

Recreate a preempted Spot or queued-resource TPU and resume its run from
the checkpoints in --workdir. Give the same --config, --config.* and
--workdir as the interrupted run.

  --name, --zone, --project      the TPU
  --accelerator_type, --version  as for tpu_create.sh (a smaller slice also
                                 resumes, if the global batch divides by its
                                 devices)
  --spot, --preemptible, --queued
                                 as for tpu_create.sh (give the ones the
                                 TPU was created with)
  --repo, --branch, --python     as for tpu_setup.sh
  --config, --workdir, --config.FIELD=VALUE, --eval, --env, --stage_data
                                 as for tpu_train.sh
  --force_recreate               delete and create even if the TPU is READY
  --poll, --wait_timeout         seconds between state queries while the TPU
                                 is in a transitional state, and at most how
                                 long to wait (0: no limit)
  --dry-run                      print every command instead of running it
EOF
}

NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" VERSION="" REPO="" BRANCH=main
CONFIG="" WORKDIR="" SPOT=0 PREEMPTIBLE=0 QUEUED=0 EVAL=0 FORCE_RECREATE=0
PYTHON="" ENV="" STAGE_DATA="" POLL=30 WAIT_TIMEOUT=1800
parse_flags "name zone project accelerator_type version repo branch config workdir python env stage_data poll wait_timeout config.*" \
  "spot preemptible queued eval force_recreate" "$@"
require_flags name zone accelerator_type version repo config workdir
[[ $SPOT == 0 || $PREEMPTIBLE == 0 ]] || die "--spot and --preemptible are exclusive: give the one the TPU was created with"
[[ $QUEUED == 0 || $PREEMPTIBLE == 0 ]] || die "--preemptible does not exist for queued resources: use --spot"
[[ $POLL =~ ^[1-9][0-9]*$ ]] || die "--poll=$POLL: expected a positive number of seconds"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait_timeout=$WAIT_TIMEOUT: expected a number of seconds (0: no limit)"
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

# tpu_state: the TPU VM's (queued: the queued resource's) state, NOT_FOUND
# when gcloud says it does not exist; dies on any other failed query.
tpu_state() {
  local what=(tpu-vm) field=state out
  if [[ $QUEUED == 1 ]]; then
    what=(queued-resources)
    field=state.state
  fi
  if out=$(gcloud compute tpus "${what[@]}" describe "$NAME" "${TPU_SCOPE[@]}" \
    --format="value($field)" 2>&1); then
    printf '%s' "${out:-UNKNOWN}"
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* || $out == *"was not found"* ]]; then
    printf NOT_FOUND
  else
    die "could not query $NAME (nothing deleted): $out"
  fi
}

recreate=1
if [[ $DRY_RUN == 0 && $FORCE_RECREATE == 0 ]]; then
  start=$SECONDS
  while :; do
    state=$(tpu_state)
    printf '%s: %s is %s\n' "$SCRIPT_NAME" "$NAME" "$state" >&2
    case $state in
      # In transition: what it becomes decides.
      CREATING | STARTING | RESTARTING | REIMAGING | REPAIRING | STOPPING | \
        DELETING | HIDING | UNHIDING | ACCEPTED | PROVISIONING | \
        WAITING_FOR_RESOURCES | SUSPENDING) ;;
      READY | ACTIVE)
        recreate=0
        break
        ;;
      PREEMPTED | TERMINATED | STOPPED | SUSPENDED | FAILED | NOT_FOUND) break ;;
      *) die "$NAME is $state, which this script does not handle: see gcloud compute tpus describe, or use --force_recreate" ;;
    esac
    if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
      die "$NAME still $state after ${WAIT_TIMEOUT}s (nothing deleted): rerun later, or --force_recreate"
    fi
    sleep "$POLL"
  done
fi

if [[ $recreate == 1 ]]; then
  # Deleting a TPU that does not exist fails: fine, it is gone.
  bash "$HERE/tpu_delete.sh" "${scope[@]}" ${queued[@]+"${queued[@]}"} --yes \
    ${pass[@]+"${pass[@]}"} || true
  create=("${scope[@]}" "--accelerator_type=$ACCELERATOR_TYPE" "--version=$VERSION")
  [[ $SPOT == 0 ]] || create+=(--spot)
  [[ $PREEMPTIBLE == 0 ]] || create+=(--preemptible)
  bash "$HERE/tpu_create.sh" "${create[@]}" ${queued[@]+"${queued[@]}"} \
    ${pass[@]+"${pass[@]}"}
fi
setup=("${scope[@]}" "--repo=$REPO" "--branch=$BRANCH")
[[ -z $PYTHON ]] || setup+=("--python=$PYTHON")
bash "$HERE/tpu_setup.sh" "${setup[@]}" ${pass[@]+"${pass[@]}"}
if [[ $recreate == 0 ]]; then
  bash "$HERE/tpu_kill.sh" "${scope[@]}" ${pass[@]+"${pass[@]}"}
fi
train=("${scope[@]}" "--config=$CONFIG" "--workdir=$WORKDIR")
[[ $EVAL == 0 ]] || train+=(--eval)
[[ -z $ENV ]] || train+=("--env=$ENV")
[[ -z $STAGE_DATA ]] || train+=("--stage_data=$STAGE_DATA")
bash "$HERE/tpu_train.sh" "${train[@]}" \
  ${CONFIG_OVERRIDES[@]+"${CONFIG_OVERRIDES[@]}"} ${pass[@]+"${pass[@]}"}
