#!/usr/bin/env bash
# The git-ignored carry folders of the GPU recipes, rebuilt in a fresh checkout (real KITTI frames are test data only:
# the GPU runs evaluate on them, nothing trains on them):
#   .gpu_bundle/gpu_site.part00 (31.5 MB) + part01 (14.2 MB)  the spconv-cu118 bundle (../shared/tools/gpu_bundle.sh),
#                                                              split so part01 fits beside the tree with the checkpoint
#   .gpu_data/kitti/training   real frames 000000-000003, 000009 (13.6 MB)      train19.sh, bench16.sh
#   .gpu_real3/training        real frames 000004, 000005 (5.5 MB)              train19.sh, bench16.sh W
#   .gpu_k0/training           real frames 000000, 000009 (5.5 MB)              tiles16.sh CALL=0
#   .gpu_rest/training         the other six: 000006-8, 10, 21, 114 (16.9 MB)   train19.sh CALL=2 (all 13 real frames
#                                                                               with .gpu_data + .gpu_real3)
# usage: scripts/gpu/carry_dirs.sh [SHARED]   (SHARED defaults to ../shared)
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${1:-../shared}; src=$shared/kitti_samples/object/training
[ -d "$src/velodyne" ] || { echo "carry_dirs: no KITTI frames under $src" >&2; exit 2; }
frames() { local d=$1; shift; for id in "$@"; do for s in velodyne:bin image_2:png calib:txt label_2:txt; do
  mkdir -p "$d/${s%%:*}"; cp "$src/${s%%:*}/$id.${s##*:}" "$d/${s%%:*}/"; done; done; }
frames .gpu_data/kitti/training 000000 000001 000002 000003 000009
frames .gpu_real3/training 000004 000005
frames .gpu_k0/training 000000 000009
frames .gpu_rest/training 000006 000007 000008 000010 000021 000114
if [ ! -f .gpu_bundle/gpu_site.part01 ]; then
  [ -f .gpu_bundle/gpu_site.tar.xz ] || bash "$shared/tools/gpu_bundle.sh" .gpu_bundle
  split -b 31500000 -d .gpu_bundle/gpu_site.tar.xz .gpu_bundle/gpu_site.part
fi
du -sh .gpu_data .gpu_real3 .gpu_k0 .gpu_rest .gpu_bundle/gpu_site.part0*
