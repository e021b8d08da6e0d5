#!/usr/bin/env bash
# Delete a TPU VM, or (--queued) the queued resource together with its node.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --name=NAME --zone=ZONE [--project=PROJECT] [--queued] [--yes] [--dry-run]

Delete the TPU VM NAME. Its local disks go with it: keep workdirs on gs://.

  --name      TPU name (the queued-resource id with --queued)
  --zone      zone of the TPU
  --project   GCP project (default: gcloud's configured project)
  --queued    it was created with tpu_create.sh --queued: delete the queued
              resource and, with --force, the TPU node it holds
  --yes       do not ask for confirmation (gcloud --quiet)
  --dry-run   print the gcloud command instead of running it
EOF
}

NAME="" ZONE="" PROJECT="" QUEUED=0 YES=0
parse_flags "name zone project" "queued yes" "$@"
require_flags name zone
require_cmd gcloud
tpu_scope_flags

if [[ $QUEUED == 1 ]]; then
  cmd=(gcloud compute tpus queued-resources delete "$NAME" "${TPU_SCOPE[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${TPU_SCOPE[@]}")
fi
[[ $YES == 0 ]] || cmd+=(--quiet)
run "${cmd[@]}"
