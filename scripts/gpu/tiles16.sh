#!/usr/bin/env bash
# Issue 16: the fused sparse conv's tile per dtype (TF32 ran 5x slower than bf16 in it, 11.7 vs 2.3 ms a frame, until
# the K-major weight tile). Carry folders: scripts/gpu/carry_dirs.sh. Two calls on one warm machine:
#   CALL=0  the checkpoint moved out of the tree; carry both bundle parts + .gpu_k0 (see the stage's comment).
#   CALL=3  the checkpoint back in the tree; carry .gpu_data + .gpu_real3: the pipeline (7 real + 40 v1 frames) at
#           this card's current tf32 tile and at CALL=0's fastest tf32 / bf16 tiles. RUNS (default
#           'tf32cur:1 tf32:1 bf16:1') picks them as PRECISION:VIEWS, tf32cur = tf32 at the current tile.
. "$(dirname "$0")/common.sh"
FILT_EXTRA="capacity overflow"
# the pipeline benches at tiles $T (tf32) / $B (bf16)
pipes() {
  # the current tile's tf32 pipeline first (the baseline on this very card), then the fastest tiles
  for pv in ${RUNS:-tf32cur:1 tf32:1 bf16:1}; do p=${pv%:*}; v=${pv#*:}; a=$T; b=""; t=$T
    [ $p = bf16 ] && { a=""; b=$B; t=$B; }; [ $p = tf32cur ] && { p=tf32; a=""; t=current; }; [ -n "$t" ] || continue
    tag=${p}_tile_${t//,/_}
    log "pipeline graph $p, $v view(s), tile $t"
    TO=${PIPE_TO:-110} bench_with "$(tiles_py "$a" "$b")" bench_pipeline --device cuda --no-messages --kitti $K \
      --kitti /tmp/fresh_v1/training --checkpoint '' --engine graph --precision $p --views $v --frames 100 \
      --warmup ${WARM:-40} --profile 3 --verbose --label "$v view(s) graph $p demo, conv tile $t" \
      --json $OUT/bench_${v}view_graph_${tag}_demo.json 2>&1 | filt | tail -9
  done
}
case ${CALL:-0} in
0)
  # one call, no checkpoint (random weights: the convolutions' speed depends on the frame's sites, not the weights):
  # carry both bundle parts + .gpu_k0 (real frames 000000, 000009). The fused kernels' CUDA tests, the tile
  # candidates (fastest per dtype kept in /tmp/fastest for CALL=3), then (ENGINE=1) the backbone engine at the
  # current and fastest tiles
  $J setup || exit 3
  K0=.gpu_k0/training
  log "the fused kernels' CUDA tests (tile flags, SPLIT accuracy)"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -rfE test/test_engine_triton.py 2>&1 | filt | tail -5
  log "tile candidates, frame 000000, random weights"
  timeout ${TILE_S:-200} python3 bench/bench_sparse_conv.py --checkpoint none --kitti $K0 --frame 0 --reps 10 \
    --json $OUT/sparse_conv_tiles_000000_random.json 2>&1 | filt | tail -40
  python3 -c "import json; f=json.load(open('$OUT/sparse_conv_tiles_000000_random.json'))['fastest']; print(f['tf32'], f['bf16'])" > /tmp/fastest
  read T B < /tmp/fastest; log "fastest tiles: tf32 ${T:-?} bf16 ${B:-?}"
  [ -n "${ENGINE:-}" ] && for t in current ${T:+$T/$B}; do log "backbone engine, tiles $t"
    a=""; b=""; [ $t = current ] || { a=${t%/*}; b=${t#*/}; }
    TO=80 bench_with "$(tiles_py "$a" "$b")" bench_engine --device cuda --checkpoint none --kitti $K0 \
      --generated 0 --frames 6 --warmup 2 --dtypes fp32,tf32,bf16 \
      --json $OUT/bench_engine_tiles_${t//[,\/]/_}_random.json 2>&1 | filt | tail -7
  done ;;
3)
  # after CALL=0 on the warm machine (bundle unpacked, /tmp/fastest): the pipeline with the demo checkpoint at this card's current tf32 tile, then at the
  # fastest tf32 / bf16 tiles; 7 real + 40 generated v1 frames of seed 2027 (never trained on)
  $J setup || exit 3
  FRESH_GEN=/tmp/fresh_v1 FRESH_SEED=2027 FRESH_N=40 FRESH_PROFILE=v1 $J gen_fresh
  real_frames
  read T B < /tmp/fastest; log "fastest tiles: tf32 ${T:-?} bf16 ${B:-?}"
  pipes ;;
esac
log done
