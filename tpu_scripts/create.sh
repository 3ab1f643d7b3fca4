#!/usr/bin/env bash
# Create the TPU slice: a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a queued
# resource (gcloud compute tpus queued-resources create) and wait until it is ACTIVE.
#
#   tpu_scripts/create.sh --name w2s --zone us-east5-a --accelerator-type v5p-128 [--queued] [--spot]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
usage: $(basename "$0") [options]

Create the TPU slice W2S_TPU_NAME (a TPU VM, or with --queued a queued resource named NAME-qr
whose node is NAME) and, for a queued resource, wait until it is ACTIVE.

  --reserved        queued resource: use reserved capacity
  --no-wait         queued resource: return once the request is accepted
  --wait-timeout S  queued resource: give up after S seconds (default 7200)

$COMMON_HELP
USAGE
}

parse_common "$@"
RESERVED=0
WAIT=1
WAIT_TIMEOUT=7200
set -- "${REST[@]+"${REST[@]}"}"
REST=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --reserved) RESERVED=1; shift ;;
    --no-wait) WAIT=0; shift ;;
    --wait-timeout) need_value "$1" $#; WAIT_TIMEOUT="$2"; shift 2 ;;
    *) REST+=("$1"); shift ;;
  esac
done
check_no_rest
location_flags

if [[ "$W2S_QUEUED" == 1 ]]; then
  args=(gcloud compute tpus queued-resources create "$(queued_name)" --node-id "$W2S_TPU_NAME"
    "${LOCATION[@]}" --accelerator-type "$W2S_ACCELERATOR_TYPE" --runtime-version "$W2S_RUNTIME_VERSION")
  if [[ "$W2S_SPOT" == 1 ]]; then args+=(--spot); fi
  if [[ "$RESERVED" == 1 ]]; then args+=(--reserved); fi
  run "${args[@]}"
  if [[ "$WAIT" == 1 ]]; then
    describe=(gcloud compute tpus queued-resources describe "$(queued_name)" "${LOCATION[@]}"
      --format='value(state.state)')
    if [[ "$W2S_DRY_RUN" == 1 ]]; then
      run "${describe[@]}"
      echo "# (repeated every 30 s until the state is ACTIVE)"
    else
      start=$SECONDS
      while true; do
        state="$("${describe[@]}")"
        echo "queued resource $(queued_name): ${state:-unknown}" >&2
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource $(queued_name) is $state" ;;
        esac
        if ((SECONDS - start > WAIT_TIMEOUT)); then
          die "queued resource $(queued_name) not ACTIVE after ${WAIT_TIMEOUT}s (still $state)"
        fi
        sleep 30
      done
    fi
  fi
else
  args=(gcloud compute tpus tpu-vm create "$W2S_TPU_NAME" "${LOCATION[@]}"
    --accelerator-type "$W2S_ACCELERATOR_TYPE" --version "$W2S_RUNTIME_VERSION")
  if [[ "$W2S_SPOT" == 1 ]]; then args+=(--spot); fi
  run "${args[@]}"
fi
