#!/usr/bin/env bash
# Delete the TPU slice (the TPU VM, or with --queued the queued resource and its node).
#
#   tpu_scripts/delete.sh --name w2s --zone us-east5-a [--queued]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
usage: $(basename "$0") [options]

Delete the TPU VM W2S_TPU_NAME, or with --queued the queued resource NAME-qr (--force also
deletes its node). Asks no questions.

  --async   return without waiting for the deletion to finish

$COMMON_HELP
USAGE
}

parse_common "$@"
ASYNC=()
set -- "${REST[@]+"${REST[@]}"}"
REST=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --async) ASYNC=(--async); shift ;;
    *) REST+=("$1"); shift ;;
  esac
done
check_no_rest
location_flags

if [[ "$W2S_QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$(queued_name)" "${LOCATION[@]}" --force --quiet \
    "${ASYNC[@]+"${ASYNC[@]}"}"
else
  run gcloud compute tpus tpu-vm delete "$W2S_TPU_NAME" "${LOCATION[@]}" --quiet "${ASYNC[@]+"${ASYNC[@]}"}"
fi
