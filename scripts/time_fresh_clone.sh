#!/bin/bash
# README's main command as a new user runs it, timed: clone this checkout into a temporary folder, make a new
# virtual environment, then `pip install -e . && w2s run` with an empty pip cache and an empty weight cache.
# Prints the wall time of each step; /usr/bin/time's reports (CPU time, peak memory) are left in the folder.
#
#   bash scripts/time_fresh_clone.sh [WORKDIR]     (default: a new temporary folder)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
echo "working in $WORK (clone of $SRC at $(git -C "$SRC" rev-parse --short HEAD))"
date -u +"start %FT%TZ"
t0=$(date +%s.%N)
git clone -q "$SRC" "$WORK/w2s-jax"
cd "$WORK/w2s-jax"
python3 -m venv .venv
. .venv/bin/activate
export W2S_CACHE="$WORK/w2s-cache" PIP_CACHE_DIR="$WORK/pip-cache"
t1=$(date +%s.%N)
/usr/bin/time -v -o "$WORK/time_install.txt" pip install -q -e .
t2=$(date +%s.%N)
/usr/bin/time -v -o "$WORK/time_run.txt" w2s run
t3=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$t3" <<'PY'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:])
print(f"clone + venv {t1 - t0:.1f} s | pip install {t2 - t1:.1f} s | w2s run {t3 - t2:.1f} s | "
      f"total {t3 - t0:.1f} s ({(t3 - t0) / 60:.2f} min)")
PY
grep -E "User time|System time|Maximum resident" "$WORK/time_run.txt"
date -u +"end %FT%TZ"
