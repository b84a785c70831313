#!/usr/bin/env bash
# GPU jobs run through the device tool (H200, Python 3.12, torch preinstalled, offline). The spconv-cu118 bundle is
# built here with ../shared/tools/gpu_bundle.sh .gpu_bundle and carried (git-ignored).
# usage: scripts/gpu/job.sh STAGE...   stages: setup gputest gen gen_fresh probe train_full train_lidar eval
#        eval_fresh bench bench1 bench3 engine split_ckpt
# The bundle (43.6 MiB) and the tracked tree (41 MiB with the demo checkpoint) do not fit one call's 64 MiB together:
# split it (split -b 31500000 -d .gpu_bundle/gpu_site.tar.xz .gpu_bundle/gpu_site.part: 31.5 + 14.2 MB, so the second
# part fits beside the tree with the checkpoint) and carry one part per call
# (.gpu_bundle/gpu_site.part00 with the first, .gpu_bundle/gpu_site.part01 with the next, while the machine is warm:
# carried files stay there between calls); setup joins the parts (xz's checksums refuse a missing or truncated part).
# The CPU runs the same stages at toy size: DEVICE=cpu WORKERS=0 GEN_WORKERS=2 RUN_ROOT=/tmp/x OUT=/tmp/x/out.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/../.." && pwd); cd "$ROOT"
SITE=${SITE:-/tmp/site}  # where setup unpacks the bundle
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$ROOT NCCL_NVLS_ENABLE=0 CMFIOU_SHARE_DIR=${CMFIOU_SHARE_DIR:-$ROOT}
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-12}; RUN_ROOT=${RUN_ROOT:-/tmp}
GEN=${GEN:-/tmp/gen}; NGEN=${NGEN:-400}; MIN=${MIN:-12}  # gen: GEN_PROFILE (v1|kitti_v2), GEN_SEED, GEN_VAL, GEN_MIX
# eval_fresh: scenes of a seed never used in training (FRESH_SEED, FRESH_N, FRESH_PROFILE) in FRESH_GEN
FRESH_GEN=${FRESH_GEN:-/tmp/gen_fresh}; FRESH_SEED=${FRESH_SEED:-2028}; FRESH_N=${FRESH_N:-120}
FRESH_PROFILE=${FRESH_PROFILE:-kitti_v2}  # FRESH_TAG: suffix of eval_fresh's JSON names
log() { echo "=== $(date +%T) $*"; }
for stage in "$@"; do case $stage in
setup)
  log setup
  if [ ! -d $SITE/spconv ]; then
    mkdir -p $SITE
    if [ -f .gpu_bundle/gpu_site.tar.xz ]; then tar -C $SITE -xJf .gpu_bundle/gpu_site.tar.xz
    else parts=$(ls .gpu_bundle/gpu_site.part* 2>/dev/null); log "bundle from parts: ${parts:-none}"
      cat $parts /dev/null | tar -C $SITE -xJ || { echo "setup: the bundle parts (${parts:-none}) do not make" \
        "the whole .gpu_bundle/gpu_site.tar.xz: carry the missing part"; rm -rf $SITE/*; exit 3; }; fi
  fi
  $PY -c "import torch, spconv, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'spconv', spconv.__version__, 'numpy', numpy.__version__)" ;;
gen)
  log "gen $NGEN scenes"
  [ -f $GEN/kitti_infos_train.json ] || {
    $PY -m cmfiou_core.tools.gen_scenes --out $GEN --num $NGEN --seed ${GEN_SEED:-7} --profile ${GEN_PROFILE:-v1} \
      --val-fraction ${GEN_VAL:-0.2} --workers ${GEN_WORKERS:-16} &&
    if [ "${GEN_MIX:-0}" -gt 0 ]; then
      # GEN_MIX more scenes of profile GEN_MIX_PROFILE (seed GEN_SEED+1, ids from NGEN on) in the same root; gen_scenes
      # writes ImageSets for its own ids only, so the first run's lists are kept and the second's appended
      mkdir -p $GEN/.sets && cp $GEN/ImageSets/*.txt $GEN/.sets/ &&
      $PY -m cmfiou_core.tools.gen_scenes --out $GEN --num $GEN_MIX --seed $(( ${GEN_SEED:-7} + 1 )) --start $NGEN \
        --profile ${GEN_MIX_PROFILE:-v1} --val-fraction ${GEN_VAL:-0.2} --workers ${GEN_WORKERS:-16} &&
      for f in train val trainval; do cat $GEN/.sets/$f.txt $GEN/ImageSets/$f.txt > $GEN/.sets/$f.all &&
        mv $GEN/.sets/$f.all $GEN/ImageSets/$f.txt; done && rm -rf $GEN/.sets &&
      echo "mixed: $(wc -l < $GEN/ImageSets/train.txt) train / $(wc -l < $GEN/ImageSets/val.txt) val"; fi &&
    $PY -m cmfiou_core.tools.make_depth --root $GEN --device $DEVICE &&
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
  # TRAIN_EXTRA's --init applies to the first call only (a resumed run has its weights; --init and --resume exclude
  # each other).
  name=${stage#train_}; d=$RUN_ROOT/run_$name; extra=""; [ $name = lidar ] && extra=--no-pseudo
  textra=${TRAIN_EXTRA:-}
  if [ -f $d/ckpt/latest.pth ] && [[ " $textra" == *" --init"* ]]; then
    textra=$(echo " $textra" | sed -E 's/ --init(=| +)[^ ]+//g'); log "resuming: --init dropped from TRAIN_EXTRA"; fi
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
     --data $GEN --device $DEVICE --batch-size ${BS:-2} --workers $WORKERS --amp ${AMP:-off} $sched --out $d \
     --no-progress --log-every ${LOG_EVERY:-50} --export-fp16 $d/export_fp16.pt $extra $args $textra 2>&1 \
     | grep --line-buffered -v "Warning\|^W11\|ret\[slices" | tail -14
  for f in metrics nonfinite_steps grad_probe; do cp $d/$f.jsonl $OUT/${f}_$name.jsonl 2>/dev/null; done; true ;;
eval)
  # EVAL_VIEWS: test-view presets to evaluate (identity, official_x_trans); results ap_<run>[_<preset>].json
  for name in ${EVAL_RUNS:-full lidar}; do
    ck=$RUN_ROOT/run_$name/export_fp16.pt; [ -f $ck ] || continue
    lo=""; [ $name = lidar ] && lo=--lidar-only
    for views in ${EVAL_VIEWS:-identity}; do
      cfg=/tmp/eval_$views.yaml; sfx=""; [ $views = identity ] || sfx=_$views
      sed "s/test_views: {preset: identity}/test_views: {preset: $views}/" config/cmfiou_kitti.yaml > $cfg
      log "eval $name ($views)"
      $PY -m cmfiou_core.tools.evaluate --data $GEN --split val --config $cfg --checkpoint $ck --device $DEVICE $lo \
        --json $OUT/ap_$name$sfx.json 2>&1 | grep --line-buffered -v Warning | tail -25
    done
    [ $name = full ] && [ -n "${EVAL_AMP:-}" ] && $PY -m cmfiou_core.tools.evaluate --data $GEN --split val --checkpoint $ck --device cuda --amp fp16 --json $OUT/ap_${name}_fp16.json 2>&1 | grep --line-buffered -v Warning | tail -25
  done ;;
gen_fresh|eval_fresh)
  # eval_fresh: the trained checkpoint(s) and the demo on FRESH_N scenes of FRESH_SEED (never used in training; all
  # in val; gen_fresh writes them, no spconv needed): ap_<run>_fresh.json / ap_demo_fresh.json with the headline (AP
  # beside its ceiling, object counts per difficulty)
  [ -f $FRESH_GEN/ImageSets/val.txt ] || { log "gen $FRESH_N fresh scenes (seed $FRESH_SEED, $FRESH_PROFILE)"
    $PY -m cmfiou_core.tools.gen_scenes --out $FRESH_GEN --num $FRESH_N --seed $FRESH_SEED --profile $FRESH_PROFILE \
      --val-fraction 1.0 --workers ${GEN_WORKERS:-16} 2>&1 | grep --line-buffered -v Warn | tail -3; }
  [ $stage = gen_fresh ] && continue
  for name in ${EVAL_RUNS:-full} ${FRESH_DEMO-demo}; do   # FRESH_DEMO= : the trained run(s) only
    if [ $name = demo ]; then ck=""; else ck=$RUN_ROOT/run_$name/export_fp16.pt; [ -f $ck ] || continue; fi
    lo=""; [ $name = lidar ] && lo=--lidar-only
    log "eval_fresh $name"
    $PY -m cmfiou_core.tools.evaluate --data $FRESH_GEN --split val --checkpoint "$ck" --device $DEVICE $lo \
      --json $OUT/ap_${name}_fresh${FRESH_TAG:-}.json 2>&1 | grep --line-buffered -v "Warn\|AP:\|AP@\|AP_R40\|ret\[slices" | tail -14
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
  # the export in 15 MB parts (files back from $OUT: 16 MiB each); here: cat ckpt_full.part* > x.pt, sha256 printed
  n=${CKNAME:-full}; ck=$RUN_ROOT/run_$n/export_fp16.pt
  [ -f $ck ] && split -b 15M -d $ck $OUT/ckpt_$n.part && sha256sum $ck && ls -la $OUT ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac; done
