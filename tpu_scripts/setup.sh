#!/usr/bin/env bash
# Set up every worker of the slice: install w2s-jax with JAX for TPU (pip install 'w2s-jax[tpu]'),
# make the remote directories, and check that JAX sees all TPU chips of the slice.
#
#   tpu_scripts/setup.sh --name w2s --zone us-east5-a                       # this checkout's HEAD
#   tpu_scripts/setup.sh --package 'git+https://github.com/ORG/w2s-jax@v0.1.0'
#   tpu_scripts/setup.sh --package dist/w2s_jax-0.1.0.tar.gz
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<USAGE
usage: $(basename "$0") [options]

Install w2s-jax (with the 'tpu' extra: jax[tpu] and libtpu) on all workers at once.

  --package SPEC   what to install: a pip URL (git+https://...@REF), a local .tar.gz/.whl file
                   (copied to the workers), or 'head' (default: 'git archive' of this checkout's
                   HEAD, copied to the workers)         [W2S_PACKAGE]
  --python PY      the workers' Python (default python3) [W2S_PYTHON]
  --no-verify      skip the check that JAX sees every chip of the slice

$COMMON_HELP
USAGE
}

parse_common "$@"
PACKAGE="${W2S_PACKAGE:-head}"
PY="${W2S_PYTHON:-python3}"
VERIFY=1
set -- "${REST[@]+"${REST[@]}"}"
REST=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --package) need_value "$1" $#; PACKAGE="$2"; shift 2 ;;
    --package=*) PACKAGE="${1#*=}"; shift ;;
    --python) need_value "$1" $#; PY="$2"; shift 2 ;;
    --no-verify) VERIFY=0; shift ;;
    *) REST+=("$1"); shift ;;
  esac
done
check_no_rest

R="$W2S_REMOTE_DIR"
qR="$(quote "$R")"
on_workers all "mkdir -p $qR/configs $qR/logs $qR/dist"

case "$PACKAGE" in
  git+* | http://* | https://*)
    spec="w2s-jax[tpu] @ $PACKAGE"
    ;;
  *)
    if [[ "$PACKAGE" == head ]]; then
      repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
      archive="${TMPDIR:-/tmp}/w2s-jax-head.tar.gz"
      run git -C "$repo" archive --format=tar.gz --prefix=w2s-jax/ -o "$archive" HEAD
    else
      archive="$PACKAGE"
      if [[ "$W2S_DRY_RUN" != 1 && ! -f "$archive" ]]; then die "package file $archive does not exist"; fi
    fi
    base="$(basename "$archive")"
    copy_to_workers "$archive" "$R/dist/$base"
    spec="w2s-jax[tpu] @ file://\$HOME/$R/dist/$base"
    ;;
esac

on_workers all "set -e; $(quote "$PY") -m pip install --upgrade --quiet pip; $(quote "$PY") -m pip install --upgrade \"$spec\""

if [[ "$VERIFY" == 1 ]]; then
  # all workers must start JAX together: each prints its process index and the slice's chip count
  on_workers all "W2S_DISTRIBUTED=1 $(quote "$PY") -c 'from w2s_jax import distributed; distributed.initialize(); import jax; print(\"worker\", jax.process_index(), \"of\", jax.process_count(), \"devices\", jax.device_count(), jax.devices()[0].device_kind)'"
fi
