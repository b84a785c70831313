#!/usr/bin/env bash
# Where does the graph pipeline spend its time on the GPU? Per-frame progress and a Python stack dump every 20 s.
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD CMFIOU_SHARE_DIR=$PWD
scripts/gpu/job.sh setup
timeout ${T:-150} python3 -X faulthandler -c "
import faulthandler, sys; faulthandler.dump_traceback_later(${DUMP:-20}, repeat=True)
sys.path.insert(0, 'bench'); import bench_pipeline
bench_pipeline.main(sys.argv[1:])" --device cuda --frames ${FRAMES:-10} --warmup 3 --generated 8 --gen-dir /tmp/genb \
  --checkpoint ${CKPT:-none} --engine graph --verbose --profile 3 --profile-top 25 --no-messages 2>&1 | grep --line-buffered -v "Warn\|is_fx\|slices"
