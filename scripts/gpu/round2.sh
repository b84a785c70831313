#!/usr/bin/env bash
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD CMFIOU_SHARE_DIR=$PWD
log() { echo "=== $(date +%T) $*"; }
scripts/gpu/job.sh setup
log tests; timeout 150 python3 -m pytest -q -p no:cacheprovider test/test_engine_triton.py -x -rfE 2>&1 | grep --line-buffered -v Warn | tail -25
log engine; timeout 150 python3 bench/bench_engine.py --device cuda --checkpoint none --generated 8 --gen-dir /tmp/genb \
    --frames 20 --dtypes bf16 --profile-top ${TOP:-25} --json $OUT/engine.json 2>&1 | grep --line-buffered -v "Warn\|is_fx\|slices\|_warn"
log roi; T=${T:-150} bash scripts/gpu/debug_roi.sh
log done
