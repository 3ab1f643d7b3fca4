#!/usr/bin/env bash
# Launch the same w2s command on every worker of the slice at once (one JAX process per host;
# w2s_jax.parallel.distributed joins them into one program), in the background with a log and pid file per
# worker, then follow worker 0's log (Ctrl-C stops following, not the run).
#
#   tpu_scripts/launch.sh --config configs/my_run.yaml                     # w2s run CONFIG --out ...
#   tpu_scripts/launch.sh --config sft.yaml --stage sft --set train.lr=1e-5  # w2s sft --config CONFIG
#   tpu_scripts/launch.sh --stop                                           # kill the running stage
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
usage: $(basename "$0") [options] [-- EXTRA ARGS FOR w2s]

  --stage NAME     run (default): w2s run CONFIG --out OUT; any other w2s command (sft, dpo,
                   generate, ...): w2s NAME --config CONFIG
  --out DIR        run directory for 'run' (default: MOUNT/runs/NAME with --bucket, else
                   ~/w2s/runs/NAME); must be shared by all workers (the gcsfuse mount) on a
                   multi-host slice
  --set KEY=VALUE  config override, passed on to w2s (repeatable)
  --env KEY=VALUE  extra environment variable for the run on every worker (repeatable)
  --foreground     stay attached: stream every worker's output until the run ends
  --no-follow      start in the background and return
  --stop           stop this stage's running process on every worker (by its pid file)
  --python PY      the workers' Python (default python3)   [W2S_PYTHON]

$COMMON_HELP
USAGE
}

parse_common "$@"
STAGE=run
OUT=""
SETS=()
ENVS=()
EXTRA=()
MODE=follow
STOP=0
PY="${W2S_PYTHON:-python3}"
set -- "${REST[@]+"${REST[@]}"}"
REST=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --stage) need_value "$1" $#; STAGE="$2"; shift 2 ;;
    --stage=*) STAGE="${1#*=}"; shift ;;
    --out) need_value "$1" $#; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --set) need_value "$1" $#; SETS+=(--set "$2"); shift 2 ;;
    --env) need_value "$1" $#; ENVS+=("$2"); shift 2 ;;
    --foreground) MODE=foreground; shift ;;
    --no-follow) MODE=background; shift ;;
    --stop) STOP=1; shift ;;
    --python) need_value "$1" $#; PY="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) REST+=("$1"); shift ;;
  esac
done
check_no_rest
[[ "$STAGE" =~ ^[a-z][a-z0-9-]*$ ]] || die "bad --stage '$STAGE'"

# every user value that reaches the workers' shell goes through `quote` (a path with a space or `;`
# stays one word); the remote config file gets a name of safe characters
R="$W2S_REMOTE_DIR"
qR="$(quote "$R")"
LOG="$(quote "$R/logs/$STAGE.log")"
PID="$(quote "$R/logs/$STAGE.pid")"

if [[ "$STOP" == 1 ]]; then
  on_workers all "if [ -f $PID ]; then kill \$(cat $PID) 2>/dev/null && echo stopped \$(cat $PID) || echo not running; rm -f $PID; fi"
  exit 0
fi

[[ -n "$W2S_CONFIG" ]] || die "no config: give --config FILE or set W2S_CONFIG"

# 1. the config on every worker
config_name="$(basename "$W2S_CONFIG")"
remote_config="$R/configs/${config_name//[^A-Za-z0-9._-]/_}"
on_workers all "mkdir -p $qR/configs $qR/logs"
if [[ "$W2S_CONFIG" == gs://* ]]; then
  on_workers all "gsutil -q cp $(quote "$W2S_CONFIG") $(quote "$remote_config")"
else
  if [[ "$W2S_DRY_RUN" != 1 && ! -f "$W2S_CONFIG" ]]; then die "config $W2S_CONFIG does not exist"; fi
  copy_to_workers "$W2S_CONFIG" "$remote_config"
fi

# 2. the command line (quoted for the workers' shell)
if [[ "$STAGE" == run ]]; then
  if [[ -z "$OUT" ]]; then
    if [[ -n "$W2S_BUCKET" ]]; then OUT="$W2S_MOUNT/runs/$W2S_TPU_NAME"; else OUT="$R/runs/$W2S_TPU_NAME"; fi
  fi
  cmd=("$PY" -m w2s_jax.cli run "$remote_config" --out "$OUT")
else
  cmd=("$PY" -m w2s_jax.cli "$STAGE" --config "$remote_config")
fi
cmd+=("${SETS[@]+"${SETS[@]}"}" "${EXTRA[@]+"${EXTRA[@]}"}")
line="env W2S_DISTRIBUTED=1"
for e in "${ENVS[@]+"${ENVS[@]}"}"; do
  [[ "$e" == *=* ]] || die "--env expects KEY=VALUE, got '$e'"
  line+=" $(quote "$e")"
done
for a in "${cmd[@]}"; do
  line+=" $(quote "$a")"
done

# 3. start it on all workers at once
if [[ "$MODE" == foreground ]]; then
  on_workers all "set -o pipefail; cd ~ && $line 2>&1 | tee $LOG"
else
  on_workers all "cd ~ && if [ -f $PID ] && kill -0 \$(cat $PID) 2>/dev/null; then echo \"already running (pid file \"$PID\"); use --stop\" >&2; exit 1; fi; nohup $line > $LOG 2>&1 < /dev/null & echo \$! > $PID; echo started \$(cat $PID)"
  if [[ "$MODE" == follow ]]; then
    on_workers 0 "tail -n +1 -F $LOG"
  fi
fi
