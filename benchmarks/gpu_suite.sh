#!/usr/bin/env bash
# The GPU benchmark suite in one command, each workload in its own process with its own time limit
# (what `w2s bench --mode gpu` runs, then the variants behind the defaults: scanned against unrolled
# decode layers, XLA's against cuDNN's training attention, the SFT step under two XLA GPU flags often
# tuned for LLM training (not yet measured here), and `generate` with a static cache), so
# that one failing or slow workload cannot take the others with it. On one H200 (2026-11-26) JAX
# compiled a 7B decode program in 32 to 42 s and the 8-layer SFT step in 35 s (66 s with XLA's
# attention); plan the budget around those. Written for a single-GPU machine:
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh   # suite.log, results.tgz (a JSON per workload) under $OUT
#
# Environment: PY (python with jax[cuda], torch+cuda, transformers, peft; default python3),
# STAGES (space-separated subset, default all, in this order), BUDGET (seconds for the whole suite,
# default 560: a stage gets at most its own limit and what is left of the budget, and is skipped when
# under 20 s are left).
set -u
OUT=${OUT:-/tmp/w2s-gpu}
PY=${PY:-python3}
BUDGET=${BUDGET:-560}
STAGES=${STAGES:-"probe gen sft dpo lora score gen_loops sft_xla sft_flags sft_profile gen_static"}
END=$((SECONDS + BUDGET))
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
    TOKENIZERS_PARALLELISM=false
unset JAX_PLATFORMS
LOG=$OUT/suite.log
# one JSON per workload in a folder beside $OUT, packed into $OUT/results.tgz after every stage (so $OUT
# holds only a few files to copy back: suite.log, results.tgz and the profile)
J=${OUT%/}.json
rm -rf "$J" && mkdir -p "$J"  # no JSON of an earlier run gets packed
: >"$LOG"
M=${M:-"--preset llama2-7b --device cuda --dtype bfloat16"}  # model and sides (override for a smaller GPU)

stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    local left=$((END - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
        echo "== $name skipped: ${left}s of the budget left" | tee -a "$LOG"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit}s) $(date -u +%T): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
    tar czf "$OUT/results.tgz" -C "$J" .
}

for s in $STAGES; do
    case $s in
    probe)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv >>"$LOG" 2>&1
        stage probe 40 "$PY" -c "
import jax, torch, transformers, optax, flax
print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.get_device_name(),
      '| transformers', transformers.__version__, '| flax', flax.__version__, '| optax', optax.__version__)
from w2s_jax.train import loop as train
from w2s_jax.infer import sampler
from w2s_jax.infer import scoring  # noqa: F401
print('w2s_jax imports ok')" ;;
    gen) stage gen 200 "$PY" benchmarks/bench_generate.py $M --batches 1,16 --repeats 3 --out "$J/gen.json" ;;
    gen_loops) stage gen_loops 150 "$PY" benchmarks/bench_generate.py $M --batches 1 --repeats 2 \
        --layer-loops scan,unroll --out "$J/gen_loops.json" ;;
    gen_static) stage gen_static 200 "$PY" benchmarks/bench_generate.py $M --batches 1 --repeats 2 --hf-static \
        --out "$J/gen_static.json" ;;
    sft) stage sft 90 "$PY" benchmarks/bench_lora.py $M --layers 8 --seq 1024 --batch 8 --rank 0 --only sft \
        --out "$J/sft.json" ;;
    dpo) stage dpo 90 "$PY" benchmarks/bench_lora.py $M --layers 8 --seq 1024 --batch 4 --rank 0 --only dpo \
        --out "$J/dpo.json" ;;
    sft_xla) stage sft_xla 100 "$PY" benchmarks/bench_lora.py $M --layers 8 --seq 1024 --batch 8 --rank 0 \
        --only sft --attention xla --no-torch --out "$J/sft_xla.json" ;;
    sft_flags) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false \
--xla_gpu_enable_latency_hiding_scheduler=true" stage sft_flags 90 "$PY" benchmarks/bench_lora.py $M --layers 8 \
        --seq 1024 --batch 8 --rank 0 --only sft --no-torch --out "$J/sft_flags.json" ;;
    sft_profile)  # a JAX profiler trace of 2 SFT steps, packed into one file (what $OUT returns: 2 folders deep)
        stage sft_profile 90 "$PY" benchmarks/bench_lora.py $M --layers 8 --seq 1024 --batch 8 --rank 0 --only sft \
            --no-torch --rounds 2 --profile /tmp/w2s_sft_profile --out "$J/sft_profile.json"
        [ -d /tmp/w2s_sft_profile ] && tar czf "$OUT/sft_profile.tgz" -C /tmp w2s_sft_profile ;;
    lora) stage lora 120 "$PY" benchmarks/bench_lora.py $M --seq 1024 --batch 2 --rank 8 --out "$J/lora.json" ;;
    score) stage score 80 "$PY" benchmarks/bench_scoring.py $M --seq 1024 --out "$J/score.json" ;;
    *) echo "unknown stage $s" | tee -a "$LOG" ;;
    esac
done
echo "== summary" | tee -a "$LOG"
"$PY" - "$J" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    for row in r.get("rows", []):
        keys = [k for k in row if isinstance(row[k], (int, float)) and not isinstance(row[k], bool)]
        print(f.stem, row.get("workload", f"batch {row.get('batch')}"),
              " ".join(f"{k}={row[k]:.4g}" for k in keys))
EOF
