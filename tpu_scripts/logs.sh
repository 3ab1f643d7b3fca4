#!/usr/bin/env bash
# Stream (or print the end of) a stage's log from one worker or all of them.
#
#   tpu_scripts/logs.sh                     # follow worker 0's log of `w2s run`
#   tpu_scripts/logs.sh --worker all --lines 50 --no-follow
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
usage: $(basename "$0") [options]

  --stage NAME    whose log (default run; see launch.sh --stage)
  --worker W      worker index or 'all' (default 0; only worker 0 writes the run's reports)
  --lines N       start N lines from the end (default: the whole log)
  --no-follow     print and return instead of following

$COMMON_HELP
USAGE
}

parse_common "$@"
STAGE=run
WORKER=0
LINES=""
FOLLOW=1
set -- "${REST[@]+"${REST[@]}"}"
REST=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --stage) need_value "$1" $#; STAGE="$2"; shift 2 ;;
    --worker) need_value "$1" $#; WORKER="$2"; shift 2 ;;
    --lines) need_value "$1" $#; LINES="$2"; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    *) REST+=("$1"); shift ;;
  esac
done
check_no_rest
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all'"
[[ -z "$LINES" || "$LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number"

from="+1"
if [[ -n "$LINES" ]]; then from="$LINES"; fi
follow=""
if [[ "$FOLLOW" == 1 ]]; then follow=" -F"; fi
on_workers "$WORKER" "tail -n $from$follow $(quote "$W2S_REMOTE_DIR/logs/$STAGE.log")"
