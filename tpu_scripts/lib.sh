# shellcheck shell=bash
# Shared settings and helpers for tpu_scripts/*.sh. Sourced, never run.
#
# Every setting comes from a flag or, when the flag is absent, from an environment variable:
#   --name NAME                W2S_TPU_NAME          TPU VM / queued-resource node name (w2s-tpu)
#   --project PROJECT          W2S_PROJECT           gcloud project (gcloud's default when unset)
#   --zone ZONE                W2S_ZONE              zone, e.g. us-east5-a (gcloud's default when unset)
#   --accelerator-type TYPE    W2S_ACCELERATOR_TYPE  gcloud accelerator type (v5p-128)
#   --runtime-version VER      W2S_RUNTIME_VERSION   TPU VM image (default: by accelerator type)
#   --bucket gs://BUCKET       W2S_BUCKET            bucket for data, checkpoints and runs
#   --config FILE              W2S_CONFIG            run config (local file or gs:// path)
#   --queued                   W2S_QUEUED=1          use a queued resource instead of a plain TPU VM
#   --spot                     W2S_SPOT=1            spot capacity
#   --dry-run                  W2S_DRY_RUN=1         print every command instead of running it
#
# Remote layout on every worker: ~/w2s/configs (configs), ~/w2s/logs (logs and pid files),
# /mnt/gcs (the bucket, mounted with gcsfuse by data.sh mount).

W2S_TPU_NAME="${W2S_TPU_NAME:-w2s-tpu}"
W2S_PROJECT="${W2S_PROJECT:-}"
W2S_ZONE="${W2S_ZONE:-}"
W2S_ACCELERATOR_TYPE="${W2S_ACCELERATOR_TYPE:-v5p-128}"
W2S_RUNTIME_VERSION="${W2S_RUNTIME_VERSION:-}"
W2S_BUCKET="${W2S_BUCKET:-}"
W2S_CONFIG="${W2S_CONFIG:-}"
W2S_QUEUED="${W2S_QUEUED:-0}"
W2S_SPOT="${W2S_SPOT:-0}"
W2S_DRY_RUN="${W2S_DRY_RUN:-0}"
W2S_MOUNT="${W2S_MOUNT:-/mnt/gcs}"
W2S_REMOTE_DIR="${W2S_REMOTE_DIR:-w2s}"
REST=()

# shellcheck disable=SC2034  # used by the scripts that source this file
COMMON_HELP="common options (flag, or environment variable when the flag is absent):
  --name NAME               W2S_TPU_NAME          TPU VM / node name (default w2s-tpu)
  --project PROJECT         W2S_PROJECT           gcloud project (default: gcloud's)
  --zone ZONE               W2S_ZONE              zone, e.g. us-east5-a (default: gcloud's)
  --accelerator-type TYPE   W2S_ACCELERATOR_TYPE  e.g. v5p-128, v5litepod-16, v6e-8 (default v5p-128)
  --runtime-version VER     W2S_RUNTIME_VERSION   TPU VM image (default: by accelerator type)
  --bucket gs://BUCKET      W2S_BUCKET            bucket for data, checkpoints and runs
  --config FILE             W2S_CONFIG            run config (local file or gs:// path)
  --queued                  W2S_QUEUED=1          queued resource instead of a plain TPU VM
  --spot                    W2S_SPOT=1            spot capacity
  --dry-run                 W2S_DRY_RUN=1         print every command instead of running it
  -h, --help                this help"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# need_value FLAG NEXT_ARG_COUNT: a flag that takes a value must have one
need_value() {
  [[ "$2" -ge 2 ]] || die "$1 needs a value"
}

# parse_common "$@": consume the common flags; whatever else is left goes to REST (in order).
parse_common() {
  REST=()
  while (($#)); do
    case "$1" in
      --name) need_value "$1" $#; W2S_TPU_NAME="$2"; shift 2 ;;
      --name=*) W2S_TPU_NAME="${1#*=}"; shift ;;
      --project) need_value "$1" $#; W2S_PROJECT="$2"; shift 2 ;;
      --project=*) W2S_PROJECT="${1#*=}"; shift ;;
      --zone) need_value "$1" $#; W2S_ZONE="$2"; shift 2 ;;
      --zone=*) W2S_ZONE="${1#*=}"; shift ;;
      --accelerator-type) need_value "$1" $#; W2S_ACCELERATOR_TYPE="$2"; shift 2 ;;
      --accelerator-type=*) W2S_ACCELERATOR_TYPE="${1#*=}"; shift ;;
      --runtime-version) need_value "$1" $#; W2S_RUNTIME_VERSION="$2"; shift 2 ;;
      --runtime-version=*) W2S_RUNTIME_VERSION="${1#*=}"; shift ;;
      --bucket) need_value "$1" $#; W2S_BUCKET="$2"; shift 2 ;;
      --bucket=*) W2S_BUCKET="${1#*=}"; shift ;;
      --config) need_value "$1" $#; W2S_CONFIG="$2"; shift 2 ;;
      --config=*) W2S_CONFIG="${1#*=}"; shift ;;
      --queued) W2S_QUEUED=1; shift ;;
      --spot) W2S_SPOT=1; shift ;;
      --dry-run) W2S_DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  if [[ -n "$W2S_BUCKET" && "$W2S_BUCKET" != gs://* ]]; then
    W2S_BUCKET="gs://$W2S_BUCKET"
  fi
  W2S_BUCKET="${W2S_BUCKET%/}"
  if [[ -z "$W2S_RUNTIME_VERSION" ]]; then
    W2S_RUNTIME_VERSION="$(default_runtime_version "$W2S_ACCELERATOR_TYPE")"
  fi
}

# The TPU VM software version for an accelerator type (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "unknown accelerator type '$1' (expected v4-N, v5p-N, v5litepod-N or v6e-N)" ;;
  esac
}

# quote ARG: the argument as a shell word (bare when it is safe, else single-quoted)
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD ARGS...: run it, or print it (prefixed with "+ ") in dry-run mode
run() {
  if [[ "$W2S_DRY_RUN" == 1 ]]; then
    local out="+" a
    for a in "$@"; do
      out+=" $(quote "$a")"
    done
    printf '%s\n' "$out"
  else
    "$@"
  fi
}

# location flags for gcloud compute tpus ...
LOCATION=()
location_flags() {
  LOCATION=()
  if [[ -n "$W2S_ZONE" ]]; then LOCATION+=(--zone "$W2S_ZONE"); fi
  if [[ -n "$W2S_PROJECT" ]]; then LOCATION+=(--project "$W2S_PROJECT"); fi
}

queued_name() {
  echo "${W2S_TPU_NAME}-qr"
}

# on_workers WORKER COMMAND: run a shell command on one worker (0, 1, ...) or on all of them at once
on_workers() {
  location_flags
  run gcloud compute tpus tpu-vm ssh "$W2S_TPU_NAME" "${LOCATION[@]}" --worker="$1" --command "$2"
}

# copy_to_workers LOCAL_PATH REMOTE_PATH: scp a file to every worker
copy_to_workers() {
  location_flags
  run gcloud compute tpus tpu-vm scp "$1" "$W2S_TPU_NAME:$2" "${LOCATION[@]}" --worker=all
}

# check_no_rest: fail on unknown arguments
check_no_rest() {
  if ((${#REST[@]})); then
    die "unknown argument(s): ${REST[*]} (see --help)"
  fi
}
