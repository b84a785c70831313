#!/usr/bin/env bash
# GPU jobs run through the device tool (H100, Python 3.12, torch preinstalled, offline). The spconv-cu118 bundle is
# built here with ../shared/tools/gpu_bundle.sh .gpu_bundle and carried (git-ignored).
# usage: scripts/gpu/job.sh STAGE...   stages: setup gputest gen probe train_full train_lidar eval bench bench1 bench3
#        split_ckpt
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/../.." && pwd); cd "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$ROOT NCCL_NVLS_ENABLE=0 CMFIOU_SHARE_DIR=${CMFIOU_SHARE_DIR:-$ROOT}
PY=python3
GEN=${GEN:-/tmp/gen}; NGEN=${NGEN:-400}; MIN=${MIN:-12}  # gen: GEN_PROFILE (v1|kitti_v2), GEN_SEED, GEN_VAL
log() { echo "=== $(date +%T) $*"; }
for stage in "$@"; do case $stage in
setup)
  log setup
  [ -d /tmp/site/spconv ] || { mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu_bundle/gpu_site.tar.xz; }
  $PY -c "import torch, spconv, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'spconv', spconv.__version__, 'numpy', numpy.__version__)" ;;
gen)
  log "gen $NGEN scenes"
  [ -f $GEN/kitti_infos_train.json ] || {
    $PY -m cmfiou_core.tools.gen_scenes --out $GEN --num $NGEN --seed ${GEN_SEED:-7} --profile ${GEN_PROFILE:-v1} \
      --val-fraction ${GEN_VAL:-0.2} --workers 16 &&
    $PY -m cmfiou_core.tools.make_depth --root $GEN --device cuda &&
    $PY -m cmfiou_core.tools.create_infos --root $GEN --raw-from-bin; } 2>&1 | grep --line-buffered -v Warn | tail -5 ;;
gputest)
  log "CUDA tests (image plane)"
  $PY -m pytest -q -p no:cacheprovider test/test_image_plane.py -rA 2>&1 | grep --line-buffered -v Warn | tail -15 ;;
probe)
  log "train-step bench"
  $PY bench/bench_train.py --mode step --data $GEN --device cuda --steps 20 --warmup 4 --amp fp32,fp16 --json $OUT/train_step.json 2>&1 | grep --line-buffered -v Warning | tail -8
  log "overfit"
  $PY bench/bench_train.py --mode overfit --data $GEN --device cuda --frames 4 --iters ${OVERFIT_ITERS:-200} --batch-size 2 --json $OUT/overfit.json 2>&1 | grep --line-buffered -v Warning | tail -25
  log "depth bench"
  $PY bench/bench_depth.py --device cuda --iters 200 --json $OUT/depth_h100.json 2>&1 | tail -12 ;;
train_full|train_lidar)
  # camera+LiDAR (train_full) or LiDAR-only (train_lidar, --no-pseudo) training of MIN minutes on the generated scenes
  # (time-driven one-cycle). A run may span several device calls: STOP_S ends this call's part with SIGTERM (the
  # trainer saves latest.pth); the next call finds latest.pth and resumes with the minutes that are left.
  name=${stage#train_}; d=/tmp/run_$name; extra=""; [ $name = lidar ] && extra=--no-pseudo
  if [ -n "${EPOCHS:-}" ]; then
    # epoch-driven one-cycle (EPOCHS epochs); a later call resumes from latest.pth
    args="--epochs $EPOCHS"; [ -f $d/ckpt/latest.pth ] && args="$args --resume $d/ckpt/latest.pth"
    log "train $name: $EPOCHS epochs ($args), at most ${STOP_S:-unlimited} s in this call"
  elif [ -f $d/ckpt/latest.pth ]; then
    used=$($PY -c "import torch; m=torch.load('$d/ckpt/latest.pth', map_location='cpu', weights_only=True); print(m.get('meta', m).get('time_used_s', 0))" 2>/dev/null || echo 0)
    left=$($PY -c "print(round(max($MIN - $used/60, 0.5), 2))"); log "resume $name: $used s used, $left min left"
    args="--resume $d/ckpt/latest.pth --max-minutes $left"
  else log "train $name: $MIN min budget, at most ${STOP_S:-unlimited} s in this call"; args="--max-minutes $MIN"; fi
  sched=--time-schedule; [ -n "${EPOCHS:-}" ] && sched=""
  timeout --foreground -s TERM ${STOP_S:-100000} $PY -m cmfiou_core.tools.train --config config/cmfiou_kitti.yaml \
     --data $GEN --device cuda --batch-size ${BS:-2} --workers 12 --amp ${AMP:-off} $sched --out $d \
     --no-progress --log-every 50 --export-fp16 $d/export_fp16.pt $extra $args ${TRAIN_EXTRA:-} 2>&1 \
     | grep --line-buffered -v "Warning\|^W11\|ret\[slices" | tail -14
  for f in metrics nonfinite_steps grad_probe; do cp $d/$f.jsonl $OUT/${f}_$name.jsonl 2>/dev/null; done; true ;;
eval)
  # EVAL_VIEWS: test-view presets to evaluate (identity, official_x_trans); results ap_<run>[_<preset>].json
  for name in ${EVAL_RUNS:-full lidar}; do
    ck=/tmp/run_$name/export_fp16.pt; [ -f $ck ] || continue
    lo=""; [ $name = lidar ] && lo=--lidar-only
    for views in ${EVAL_VIEWS:-identity}; do
      cfg=/tmp/eval_$views.yaml; sfx=""; [ $views = identity ] || sfx=_$views
      sed "s/test_views: {preset: identity}/test_views: {preset: $views}/" config/cmfiou_kitti.yaml > $cfg
      log "eval $name ($views)"
      $PY -m cmfiou_core.tools.evaluate --data $GEN --split val --config $cfg --checkpoint $ck --device cuda $lo \
        --json $OUT/ap_$name$sfx.json 2>&1 | grep --line-buffered -v Warning | tail -25
    done
    [ $name = full ] && [ -n "${EVAL_AMP:-}" ] && $PY -m cmfiou_core.tools.evaluate --data $GEN --split val --checkpoint $ck --device cuda --amp fp16 --json $OUT/ap_${name}_fp16.json 2>&1 | grep --line-buffered -v Warning | tail -25
  done ;;
bench|bench1|bench3)
  ck=${CKPT:-/tmp/run_full/export_fp16.pt}; ckarg=""; [ -f "$ck" ] && ckarg="--checkpoint $ck"
  kit=""; [ -d .gpu_data/kitti/training ] && kit="--kitti .gpu_data/kitti/training"
  [ $stage = bench3 ] || { log "pipeline bench 1 view"
  $PY bench/bench_pipeline.py --device cuda --frames ${FRAMES:-200} --warmup 10 $kit --generated 16 --gen-dir /tmp/genb $ckarg --label "1 view" --json $OUT/bench_1view.json --md $OUT/bench_1view.md 2>&1 | grep --line-buffered -v Warning | tail -24; }
  [ $stage = bench1 ] || { log "pipeline bench 3 views"
  $PY bench/bench_pipeline.py --device cuda --frames ${FRAMES:-200} --warmup 10 $kit --generated 16 --gen-dir /tmp/genb $ckarg --views 3 --label "3 views" --json $OUT/bench_3view.json --md $OUT/bench_3view.md 2>&1 | grep --line-buffered -v Warning | tail -24; } ;;
engine)
  # the static-shape backbone engine. CKPT='' (demo, needs models/ present) or none (random weights: the
  # sparse geometry and so the speed do not depend on the weights)
  ck=${CKPT-none}; F=${FRAMES:-60}
  for v in 1 3; do log "bench_engine $v view(s)"
    $PY bench/bench_engine.py --device cuda --checkpoint "$ck" --generated 8 --gen-dir /tmp/genb --frames $F --views $v \
      --json $OUT/bench_engine_${v}view.json 2>&1 | grep --line-buffered -v "Warn\|is_fx\|slices" | tail -8; done
  for e in eager graph; do log "bench_pipeline 1 view engine=$e"
    $PY bench/bench_pipeline.py --device cuda --frames $F --warmup 8 --generated 8 --gen-dir /tmp/genb \
      --checkpoint "$ck" --engine $e --label "1 view $e" --json $OUT/bench_1view_$e.json --md $OUT/bench_1view_$e.md \
      2>&1 | grep --line-buffered -v "Warn\|is_fx\|slices" | tail -22; done ;;
split_ckpt)
  n=${CKNAME:-full}; ck=/tmp/run_$n/export_fp16.pt; [ -f $ck ] && split -b 15M -d $ck $OUT/ckpt_$n.part && ls -la $OUT ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done
