#!/usr/bin/env bash
# Real-time probe on the GPU host: CUDA tests of the engine, then the end-to-end graph pipeline with a profile of its
# kernels, then the backbone engine's op-level profile. Everything goes to $OUT/log as it happens (unbuffered, no pipe
# that holds output back).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD CMFIOU_SHARE_DIR=$PWD
F=${FRAMES:-40}
log() { echo "=== $(date +%T) $*"; }
scripts/gpu/job.sh setup
for step in ${STEPS:-tests pipe engine}; do case $step in
tests) log "CUDA tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider test/test_engine_triton.py test/test_engine_roi.py -x -rfE \
    -k "cuda or fused or sync_free" 2>&1 | grep --line-buffered -v Warn ;;
pipe) for e in ${ENGINES:-graph}; do log "bench_pipeline engine=$e"
  timeout 300 python3 bench/bench_pipeline.py --device cuda --frames $F --warmup 8 --generated 8 --gen-dir /tmp/genb \
    --checkpoint ${CKPT:-none} --engine $e --profile 5 --profile-top ${TOP:-30} --label "1 view $e" \
    --json $OUT/pipe_$e.json --md $OUT/pipe_$e.md 2>&1 | grep --line-buffered -v "Warn\|is_fx\|slices"; done ;;
engine) log "bench_engine"
  timeout 300 python3 bench/bench_engine.py --device cuda --checkpoint ${CKPT:-none} --generated 8 --gen-dir /tmp/genb \
    --frames 20 --dtypes fp32,bf16 --profile-top ${TOP:-30} --json $OUT/engine.json 2>&1 | grep --line-buffered -v "Warn\|is_fx\|slices" ;;
esac; done
log done
