#!/usr/bin/env bash
# Data and checkpoints in Cloud Storage: upload from here, mount the bucket on every worker with
# gcsfuse, or copy from the bucket onto every worker's disk.
#
#   tpu_scripts/data.sh upload data data                    # here -> gs://BUCKET/data
#   tpu_scripts/data.sh upload checkpoints/llama2-70b ckpt/llama2-70b
#   tpu_scripts/data.sh mount                               # gs://BUCKET on /mnt/gcs, all workers
#   tpu_scripts/data.sh download ckpt/llama2-70b /tmp/llama2-70b   # gs://BUCKET/... -> each worker
#   tpu_scripts/data.sh unmount
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
usage: $(basename "$0") ACTION [ARGS] [options]

actions:
  upload LOCAL [DEST]    copy a local file or directory to gs://BUCKET/DEST (default: its name)
  mount                  mount gs://BUCKET at --mount-dir on every worker (installs gcsfuse)
  unmount                unmount it
  download SRC DEST      copy gs://BUCKET/SRC (or a full gs:// URL) to DEST on every worker

  --mount-dir DIR        where the bucket is mounted (default /mnt/gcs)   [W2S_MOUNT]

$COMMON_HELP
USAGE
}

parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
REST=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --mount-dir) need_value "$1" $#; W2S_MOUNT="$2"; shift 2 ;;
    --mount-dir=*) W2S_MOUNT="${1#*=}"; shift ;;
    *) REST+=("$1"); shift ;;
  esac
done
((${#REST[@]})) || { usage >&2; exit 2; }
action="${REST[0]}"
args=("${REST[@]:1}")
[[ -n "$W2S_BUCKET" ]] || die "no bucket: give --bucket gs://BUCKET or set W2S_BUCKET"

# gs_url PATH: PATH itself when it is a gs:// URL, else under the bucket
gs_url() {
  if [[ "$1" == gs://* ]]; then echo "$1"; else echo "$W2S_BUCKET/${1#/}"; fi
}

case "$action" in
  upload)
    ((${#args[@]} >= 1 && ${#args[@]} <= 2)) || die "usage: upload LOCAL [DEST]"
    src="${args[0]%/}"
    dest="$(gs_url "${args[1]:-$(basename "$src")}")"
    if [[ -f "$src" ]]; then
      run gsutil -m cp "$src" "$dest"
    else
      [[ -d "$src" || "$W2S_DRY_RUN" == 1 ]] || die "$src does not exist"
      run gsutil -m rsync -r "$src" "$dest"
    fi
    ;;
  mount)
    ((${#args[@]} == 0)) || die "usage: mount"
    bucket="${W2S_BUCKET#gs://}"
    # shellcheck disable=SC2016  # expanded by the workers' shell
    repo='deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main'
    install="if ! command -v gcsfuse >/dev/null; then echo \"$repo\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get update -qq; sudo apt-get install -y -qq gcsfuse; fi"
    m="$(quote "$W2S_MOUNT")"
    on_workers all "set -e; $install; sudo mkdir -p $m; sudo chown \$(id -u):\$(id -g) $m; mountpoint -q $m || gcsfuse --implicit-dirs $(quote "$bucket") $m; ls $m | head -n 5"
    ;;
  unmount)
    m="$(quote "$W2S_MOUNT")"
    on_workers all "if mountpoint -q $m; then fusermount -u $m; fi"
    ;;
  download)
    ((${#args[@]} == 2)) || die "usage: download SRC DEST"
    src="$(gs_url "${args[0]}")"
    dest="$(quote "${args[1]}")"
    on_workers all "set -e; mkdir -p $dest; gsutil -m -q rsync -r $(quote "$src") $dest"
    ;;
  *)
    die "unknown action '$action' (upload, mount, unmount, download)"
    ;;
esac
