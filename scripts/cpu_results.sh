#!/usr/bin/env bash
# The AP tables of README "Results" that run on the CPU: the bundled demo checkpoint on generated validation scenes,
# 1 view / the official 3 test views / camera withheld (LiDAR-only input), on
#   seed7:    the 80 validation scenes of `cmfiou-gen-scenes --num 400 --seed 7 --val-fraction 0.2` (the split the demo
#             checkpoint was trained beside: its 320 training scenes are the other ids of the same call);
#   seed2027: 40 scenes of a seed never used in training (`--num 40 --seed 2027 --val-fraction 1.0`, all in val).
# Each evaluation writes $OUT/ap_demo_<set>_<setting>.json with provenance (commit, config + checkpoint SHA-256,
# device, command). Evaluation completes depth online in the pipeline (as the node does), so make_depth /
# create_infos (training inputs) are not needed here. One evaluation at a time, one thread.
# usage: OUT=/tmp/res scripts/cpu_results.sh [seed7] [seed2027]     (run from a clean checkout: git_dirty false)
# env: GEN (scene root, default /tmp/cmfiou_gen), SETTINGS (default "1view 3views nocam"), MAX_FRAMES (default all)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
OUT=${OUT:-/tmp/cmfiou_results}; GEN=${GEN:-/tmp/cmfiou_gen}; mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
PY=${PY:-python}
log() { echo "=== $(date -u +%T) $*"; }
cfg3=$OUT/cmfiou_kitti_official_x_trans.yaml
sed "s/test_views: {preset: identity}/test_views: {preset: official_x_trans}/" config/cmfiou_kitti.yaml > "$cfg3"
grep -q "preset: official_x_trans" "$cfg3" || { echo "could not set test_views in $cfg3" >&2; exit 2; }
mf=""; [ -n "${MAX_FRAMES:-}" ] && mf="--max-frames $MAX_FRAMES"
sets=("$@"); [ ${#sets[@]} -gt 0 ] || sets=(seed7 seed2027)
for set in "${sets[@]}"; do
  case $set in
    seed7) g=$GEN/seed7; gen_args="--num 400 --seed 7 --val-fraction 0.2" ;;
    seed2027) g=$GEN/seed2027; gen_args="--num 40 --seed 2027 --val-fraction 1.0" ;;
    *) echo "unknown set $set (seed7, seed2027)" >&2; exit 2 ;;
  esac
  if [ ! -f "$g/ImageSets/val.txt" ]; then
    log "generate $set: cmfiou-gen-scenes $gen_args"
    $PY -m cmfiou_core.tools.gen_scenes --out "$g" $gen_args --workers 1
  fi
  for s in ${SETTINGS:-1view 3views nocam}; do
    extra=""; case $s in 1view) ;; 3views) extra="--config $cfg3" ;; nocam) extra="--lidar-only" ;;
      *) echo "unknown setting $s" >&2; exit 2 ;; esac
    j=$OUT/ap_demo_${set}_$s.json
    [ -f "$j" ] && { log "$j exists, skipped"; continue; }
    log "evaluate $set $s -> $j"
    # script(1) gives evaluate a terminal, so its tqdm progress bar shows (it is off without one)
    script -qefc "$PY -m cmfiou_core.tools.evaluate --data $g --split val --device cpu $extra $mf --out $OUT/res_${set}_$s --json $j" /dev/null \
      | grep --line-buffered -v "Warning\|warn(" || true
    [ -f "$j" ] || { echo "evaluate wrote no $j" >&2; exit 1; }
  done
done
log done
