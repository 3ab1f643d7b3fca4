#!/usr/bin/env bash
# The whole round trip: create the slice, set up every worker, mount the bucket, run the config on
# all workers (attached), and delete the slice at the end (also on failure; --keep keeps it).
#
#   tpu_scripts/run_all.sh --name w2s --zone us-east5-a --accelerator-type v5p-128 --queued \
#       --bucket gs://my-bucket --config configs/my_run.yaml
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"

usage() {
  cat <<USAGE
usage: $(basename "$0") [options] [-- EXTRA ARGS FOR w2s]

create.sh, setup.sh, data.sh mount (with --bucket), launch.sh --foreground, delete.sh.

  --stage NAME     passed to launch.sh (default run)
  --package SPEC   passed to setup.sh
  --keep           do not delete the slice at the end

$COMMON_HELP
USAGE
}

parse_common "$@"
KEEP=0
LAUNCH=()
SETUP=()
set -- "${REST[@]+"${REST[@]}"}"
REST=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --keep) KEEP=1; shift ;;
    --stage) need_value "$1" $#; LAUNCH+=(--stage "$2"); shift 2 ;;
    --package) need_value "$1" $#; SETUP+=(--package "$2"); shift 2 ;;
    --) shift; LAUNCH+=(-- "$@"); break ;;
    *) REST+=("$1"); shift ;;
  esac
done
check_no_rest
[[ -n "$W2S_CONFIG" ]] || die "no config: give --config FILE or set W2S_CONFIG"

# the sub-scripts read the resolved settings from the environment
export W2S_TPU_NAME W2S_PROJECT W2S_ZONE W2S_ACCELERATOR_TYPE W2S_RUNTIME_VERSION W2S_BUCKET W2S_CONFIG \
  W2S_QUEUED W2S_SPOT W2S_DRY_RUN W2S_MOUNT W2S_REMOTE_DIR

"$HERE/create.sh"
if [[ "$KEEP" != 1 ]]; then
  trap '"$HERE/delete.sh"' EXIT
fi
"$HERE/setup.sh" "${SETUP[@]+"${SETUP[@]}"}"
if [[ -n "$W2S_BUCKET" ]]; then
  "$HERE/data.sh" mount
fi
"$HERE/launch.sh" --foreground "${LAUNCH[@]+"${LAUNCH[@]}"}"
