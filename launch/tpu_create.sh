#!/usr/bin/env bash
# Create a Cloud TPU VM: one host (v4-8, v5litepod-8, ...) or a pod slice
# (v4-64, v5litepod-16, ...). The same command makes both: the slice size is in
# --accelerator_type, and every later script addresses all of its workers.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE --accelerator_type=TYPE --version=RUNTIME
         [--project=PROJECT] [--spot | --preemptible] [--queued [--no_wait]
         [--wait_timeout=0] [--poll_seconds=30]] [--dry-run]

Create a TPU VM (single host or pod slice).

  --name              TPU name (also the queued-resource id with --queued)
  --zone              e.g. us-central2-b (v4), us-west4-a (v5e)
  --accelerator_type  e.g. v4-8 (1 host), v4-64 (8 hosts), v5litepod-16 (4 hosts)
  --version           TPU software runtime, e.g. tpu-ubuntu2204-base (v4),
                      v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e)
  --project           GCP project (default: gcloud's configured project)
  --spot              Spot VM: cheaper, can be reclaimed at any time
  --preemptible       legacy preemptible VM (not with --queued; use --spot)
  --queued            ask through queued resources (waits for capacity):
                      gcloud compute tpus queued-resources create, then poll
                      its state until ACTIVE (the TPU VM then exists and
                      tpu_setup.sh can run); fails if it FAILED or was
                      SUSPENDED
  --no_wait           with --queued: return right after the request
  --wait_timeout      with --queued: give up after this many seconds
                      (default 0: wait as long as it takes)
  --poll_seconds      with --queued: seconds between state queries (30)
  --dry-run           print the gcloud command instead of running it
EOF
}

NAME="" ZONE="" ACCELERATOR_TYPE="" VERSION="" PROJECT=""
SPOT=0 PREEMPTIBLE=0 QUEUED=0 NO_WAIT=0 WAIT_TIMEOUT=0 POLL_SECONDS=30
parse_flags "name zone accelerator_type version project wait_timeout poll_seconds" \
  "spot preemptible queued no_wait" "$@"
require_flags name zone accelerator_type version
[[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator_type=$ACCELERATOR_TYPE is not of the form v4-8, v5litepod-16, v5p-32, v6e-8"
[[ $SPOT == 0 || $PREEMPTIBLE == 0 ]] ||
  die "--spot and --preemptible are exclusive: pick one"
[[ $QUEUED == 0 || $PREEMPTIBLE == 0 ]] ||
  die "--preemptible does not exist for queued resources: use --spot"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait_timeout=$WAIT_TIMEOUT: expected seconds"
[[ $POLL_SECONDS =~ ^[1-9][0-9]*$ ]] || die "--poll_seconds=$POLL_SECONDS: expected seconds > 0"
require_cmd gcloud
tpu_scope_flags

if [[ $QUEUED == 1 ]]; then
  cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME"
    "${TPU_SCOPE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
    --runtime-version="$VERSION")
else
  cmd=(gcloud compute tpus tpu-vm create "$NAME" "${TPU_SCOPE[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
fi
[[ $SPOT == 0 ]] || cmd+=(--spot)
[[ $PREEMPTIBLE == 0 ]] || cmd+=(--preemptible)
run "${cmd[@]}"
if [[ $QUEUED == 1 && $NO_WAIT == 0 ]]; then
  wait_queued_active "$WAIT_TIMEOUT" "$POLL_SECONDS"
fi
