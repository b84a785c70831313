# Sourced by the GPU recipes (bench16.sh, train19.sh, tiles16.sh): the repo root, the environment of the GPU host
# (the spconv bundle unpacked to /tmp/site by job.sh setup), $OUT, the log helpers and the pieces the recipes share.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD CMFIOU_SHARE_DIR=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
K=/tmp/kitti/training; J=scripts/gpu/job.sh; CK=models/cmfiou_synthetic_demo_fp16.pt
log() { echo "=== $(date +%T) $*"; }
# drops the known noise of a run's output; FILT_EXTRA: one more pattern
filt() { grep --line-buffered -v "Warn\|is_fx\|slices\|_warn_once\|ret\[\|^\[bench\] frame\|warm-up frame${FILT_EXTRA:+\|$FILT_EXTRA}" ; }
# bench_with 'PYTHON' MODULE ARGS...: bench/MODULE's main(ARGS) after the Python set-up code (module switches, tiles),
# at most TO seconds (default 120)
bench_with() { local setup=$1 mod=$2; shift 2; timeout ${TO:-120} python3 -X faulthandler -c "import sys, torch
sys.path.insert(0, 'bench')
$setup
import $mod as m; sys.exit(m.main(sys.argv[1:]))" "$@"; }
# set-up code: the engine's Triton grid-pool and NMS kernels off (their torch paths)
NOKERN_PY="import cmfiou_core.engine.nms as n, cmfiou_core.engine.roi as r; n.USE_TRITON_NMS = r.USE_TRITON_POOL = False
print('Triton grid-pool / NMS kernels OFF', flush=True)"
# set-up code: the fused conv's tile for fp32 ($1) and bf16 ($2), each 'BM,BN,BK,warps,stages[,flags]', 'torch'
# (FoldedConv's gather + cuBLAS path) or '' (as it is)
tiles_py() { echo "import cmfiou_core.engine.triton_conv as tc
for dt, t in ((torch.float32, '$1'), (torch.bfloat16, '$2')):
    if t: tc.TILES[dt] = 'torch' if t == 'torch' else tuple(map(int, t.split(',')))
print('TILES', tc.TILES, flush=True)"; }
# the carried real frames (.gpu_data, and .gpu_real3 / .gpu_rest where carried) into $K, their ids listed
real_frames() { mkdir -p $K && cp -r .gpu_data/kitti/training/. $K/ && for d in .gpu_real3 .gpu_rest; do
  [ ! -d $d ] || cp -r $d/training/. $K/; done && ls $K/velodyne | tr '\n' ' '; echo; }
# the demo checkpoint: to /tmp in the call that carries it, back into models/ in a later call that cannot
ckpt_stash() { cp $CK /tmp/demo.pt && sha256sum /tmp/demo.pt; }
ckpt_restore() { [ -f $CK ] || { mkdir -p models && cp /tmp/demo.pt $CK; }; }
