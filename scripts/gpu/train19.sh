#!/usr/bin/env bash
# Issue 19's training round on the GPU host as two calls on one warm machine (/tmp survives between them; the 64 MiB
# carry keeps the spconv bundle's two parts, the demo checkpoint and the real frames apart; the carry folders:
# scripts/gpu/carry_dirs.sh):
#   CALL=1  carry .gpu_bundle/gpu_site.part01 with the checkpoint in the tree (58.9 MB): the checkpoint to
#           /tmp/demo.pt; NGEN kitti_v2 scenes (seed GEN_SEED) + GEN_MIX v1 scenes (seed GEN_SEED+1) with depth,
#           infos and the GT database; FRESH_N kitti_v2 scenes of seed 2028 and 40 v1 scenes of seed 2027 (never
#           trained on). No spconv needed.
#   CALL=2  carry .gpu_bundle/gpu_site.part00 + .gpu_data + .gpu_real3, the checkpoint moved out of the tree
#           (55.7 MB): setup joins the bundle, the checkpoint goes back into models/ here, the real frames to
#           /tmp/kitti; training (job.sh train_full, TRAIN_EXTRA, MIN minutes) in the background while issue 16's
#           checks run beside it (the static front's CUDA test; eager vs graph on the real frames and the 40 v1
#           scenes, each difference checked against the eager model's rounding envelope); then the export (15 MB
#           parts), the real frames, both fresh sets (the trained run; the demo's numbers are in docs/results).
#           Carrying .gpu_rest too (the other six real frames; the bundle already unpacked) gives all 13.
#   CALL=3  (optional) TF32=1: the graph tf32 bench (1 view; the default precision) with the demo checkpoint.
# Once the bundle is unpacked on the warm machine (an earlier call carried both parts, e.g. tiles16.sh CALL=0), both
# calls fit one command: carry .gpu_data + .gpu_real3 with the checkpoint in the tree (63.8 MB) and run
#   (CALL=1 NGEN=200 GEN_MIX=50 FRESH_N=60 bash scripts/gpu/train19.sh; CALL=2 MIN=3 BS=4 \
#    TRAIN_EXTRA="--init models/cmfiou_synthetic_demo_fp16.pt --lr 0.001" bash scripts/gpu/train19.sh)
# (2026-12-07, H100: 325 s wall, 203 steps; docs/results/ap_finetune_v2_3min_*.json).
# A longer run spans calls: the first CALL=2 with STOP_S (seconds of training in it) ends after saving latest.pth, the
# next CALL=2 with the same MIN and SKIP16=1 resumes it (--init is dropped on resume) and evaluates, e.g.
#   CALL=2 MIN=16 STOP_S=480 BS=4 TRAIN_EXTRA="--init ... --lr 0.001" ...; then CALL=2 MIN=16 SKIP16=1 BS=4 ...
# 2026-12-07 runs (H100; README, issue 19): CALL=1 NGEN=300 GEN_MIX=120 FRESH_N=60, then CALL=2 MIN=7 BS=4 with
# --init demo --lr 0.001 (sha 5b90d8c3...), then job.sh train_full MIN=6.3 with --init that export --lr 0.0007
# (202228c4...). Photometric randomisation of the pseudo colours: add --set data.augment.photometric=true;
# modality dropout (that share of frames LiDAR-only): --set data.pseudo_frame_drop=0.3.
. "$(dirname "$0")/common.sh"
# the graph tf32 bench (1 view; the default precision) with the demo checkpoint
tf32_bench() { log "pipeline graph tf32, 1 view, demo checkpoint"
  timeout 150 python3 bench/bench_pipeline.py --device cuda --no-messages --kitti $K $([ -d /tmp/fresh_v1/training ] && echo --kitti /tmp/fresh_v1/training) \
    --checkpoint '' --engine graph --precision tf32 --views 1 --frames 100 --warmup 60 --profile 3 --verbose \
    --label "1 view graph tf32 demo" --json $OUT/bench_1view_graph_tf32_demo_h200.json \
    --md $OUT/bench_1view_graph_tf32_demo_h200.md 2>&1 | filt | tail -30; }
export GEN=${GEN:-/tmp/gen_v2} MIN=${MIN:-5}
case ${CALL:-1} in
1)
  ckpt_stash
  if [ "${NGEN:-520}" -gt 0 ]; then   # NGEN=0: the checkpoint and the 40 v1 scenes only (for CALL=2 NO_TRAIN=1)
    NGEN=${NGEN:-520} GEN_PROFILE=kitti_v2 GEN_SEED=${GEN_SEED:-101} GEN_VAL=${GEN_VAL:-0.05} GEN_MIX=${GEN_MIX:-0} \
      $J gen
    FRESH_GEN=/tmp/fresh_v2 FRESH_SEED=2028 FRESH_N=${FRESH_N:-120} FRESH_PROFILE=kitti_v2 $J gen_fresh; fi
  FRESH_GEN=/tmp/fresh_v1 FRESH_SEED=2027 FRESH_N=40 FRESH_PROFILE=v1 $J gen_fresh
  du -sh $GEN /tmp/fresh_v* 2>/dev/null ;;
2)
  $J setup || exit 3
  ckpt_restore
  real_frames
  tp=""; [ -n "${NO_TRAIN:-}" ] || { WORKERS=${WORKERS:-10} $J train_full > /tmp/train.log 2>&1 & tp=$!; }
  mkdir -p /tmp/ks/object && ln -sfn $K /tmp/ks/object/training
  nreal=$(ls $K/velodyne | wc -l)
  if [ -z "${SKIP16:-}" ]; then   # SKIP16=1: the training's second part (issue 16's checks ran in the first)
    log "CUDA test: the static front across calibrations"
    CMFIOU_KITTI_SAMPLES=/tmp/ks timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE test/test_engine_prelude.py \
      -k on_cuda 2>&1 | filt | tail -6
    # issue 16's bar: engine vs eager (IEEE fp32) on the carried real frames (all 13 with .gpu_rest) + the 40 v1
    # scenes of seed 2027, each difference checked against the eager model's own rounding envelope
    log "engine agreement, IEEE fp32, $nreal real frames + /tmp/fresh_v1, rounding envelope"
    timeout ${AGREE_S:-240} python3 bench/engine_agreement.py --device cuda --checkpoint '' --kitti $K \
      $([ -d /tmp/fresh_v1/training ] && echo --kitti /tmp/fresh_v1/training) --generated 0 --precision fp32 \
      --compare eager:graph --envelope ${DRAWS:-16} --json $OUT/engine_agreement_fp32_envelope_real${nreal}_v1_40_demo.json \
      2>&1 | filt | tail -6
  fi
  # NO_TRAIN=1: issue 16's checks, then the graph tf32 bench (no training ran beside it)
  [ -n "$tp" ] || { tf32_bench; log done; exit; }
  log "waiting for the training"; wait $tp; tail -16 /tmp/train.log
  # STOP_S ended this part of a longer run (latest.pth saved): the next call (SKIP16=1, same MIN) resumes it
  [ -n "${STOP_S:-}" ] && { log "training part ended after STOP_S=$STOP_S s; resume with the same MIN"; exit; }
  $J split_ckpt
  log "evaluate real frames here (trained)"
  timeout 60 python3 -m cmfiou_core.tools.evaluate --data /tmp/kitti --split all --device cuda \
    --checkpoint /tmp/run_full/export_fp16.pt --json $OUT/ap_real${nreal}_trained.json 2>&1 | filt \
    | grep "R40 3D\|unmatched\|size error"
  PY='timeout 100 python3' FRESH_DEMO= FRESH_GEN=/tmp/fresh_v2 FRESH_TAG=_seed2028_v2 $J eval_fresh
  PY='timeout 50 python3' FRESH_DEMO= FRESH_GEN=/tmp/fresh_v1 FRESH_TAG=_seed2027_v1 $J eval_fresh ;;
3)
  [ -z "${TF32:-}" ] || tf32_bench ;;
esac
log done
