"""Everything before the backbone engine as static-shape, sync-free code: padded points + image -> the padded VFE
output that ``engine.frame.FrameGraph`` consumes.

Each stage is the eager one with fixed capacities and validity masks instead of compactions, and equals it bit for
bit (test/test_engine_prelude.py):

- raw rows + FOV filter (``Pipeline._fov_raw`` / ``PseudoPointGenerator``'s raw rows): a mask over the padded points;
- depth completion -> pseudo rows (``PseudoPointGenerator``): the thinning order cut to a pseudo-row capacity, the
  count on the device and an overflow flag instead of the ``tolist``;
- range masks (``Pipeline._range_mask``, ``prepare_batch``'s x/y mask): masks, no compaction;
- the test-time pseudo-point discard (``depth.io.input_point_discard``) on masked rows, its random numbers a
  function of the frame (``pipeline.frame_seed``) drawn on the host over the row capacity: the CPU generator's
  stream is sequential, so the first N values equal the eager ``rand(N)`` whatever the capacity;
- voxelization (``model.voxelize.Voxelizer``): a stable sort on the voxel key, slot = rank within its run, voxels
  numbered in first-appearance order (a prefix sum over the first point of each voxel, in input order), so the first
  ``max_voxels`` voxels and the first ``max_points`` points of each are the eager ones;
- the mean VFE (``model.vfe.mean_voxel_features``, flag column by max) on the dense (max_voxels, max_points, C)
  buffer.

Rows are never compacted except where the eager order changes (the discard's far-slab-first output order, which the
voxelizer's first-appearance rule sees): nothing depends on an op's internal order (stable sorts, prefix sums,
scatters to distinct rows or to a discarded dump row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..device_const import device_const
from ..model.vfe import mean_voxel_features


@dataclass
class StaticVoxels:
    """One modality of one view: ``voxels`` (max_voxels, max_points, C), ``coords`` (max_voxels, 3) int32 (z, y, x),
    padding -1; ``num_points`` (max_voxels,) int32, padding 0; ``count`` () int64 voxels kept; ``total`` () int64
    voxels before the ``max_voxels`` cut (the eager Voxelizer drops the later ones, as spconv does)."""
    voxels: torch.Tensor
    coords: torch.Tensor
    num_points: torch.Tensor
    count: torch.Tensor
    total: torch.Tensor


def voxelize_static(points: torch.Tensor, valid: torch.Tensor, voxel_size: Sequence[float],
                    pc_range: Sequence[float], grid_size_xyz: Sequence[int], max_points: int,
                    max_voxels: int) -> StaticVoxels:
    """``Voxelizer(voxel_size, pc_range, max_points, max_voxels)(points[valid])`` on fixed shapes, no host sync.

    points (N, C) float32 in input order, valid (N,) bool. The voxel coordinate is the eager float32 arithmetic
    (``floor((p - min) / size)`` with tensor operands); a stable sort on the linear voxel key groups each voxel's
    points in input order (slot = rank in the run); a voxel's number is the prefix sum, in input order, over the
    first point of every voxel (first-appearance order)."""
    points = points.to(torch.float32)
    dev = points.device
    N, C = points.shape
    gx, gy, gz = (int(v) for v in grid_size_xyz)
    mp, mv = int(max_points), int(max_voxels)
    vs = device_const([float(v) for v in voxel_size], torch.float32, dev)
    rmin = device_const([float(v) for v in pc_range[:3]], torch.float32, dev)
    grid = device_const([gx, gy, gz], torch.int64, dev)
    c = torch.floor((points[:, :3] - rmin) / vs)
    c = torch.clamp(c, -1, float(max(gx, gy, gz)) + 1).to(torch.int64)
    ok = valid & ((c >= 0) & (c < grid)).all(dim=1)
    sentinel = gx * gy * gz
    key = torch.where(ok, (c[:, 2] * gy + c[:, 1]) * gx + c[:, 0], torch.full_like(c[:, 0], sentinel))
    skey, perm = torch.sort(key, stable=True)
    pos = torch.arange(N, device=dev)
    okv = skey != sentinel
    is_start = torch.ones(N, dtype=torch.bool, device=dev)
    if N > 1:
        is_start[1:] = skey[1:] != skey[:-1]
    seg = torch.cumsum(is_start, 0) - 1
    start = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), 0).values
    slot = pos - start
    head = is_start & okv                                        # the first point of each voxel (sorted position)
    head_orig = torch.zeros(N, dtype=torch.bool, device=dev).scatter_(0, perm, head)
    csum = torch.cumsum(head_orig, 0)
    vid_orig = csum - 1                                          # at a head point: its voxel's number
    total = csum[-1] if N else torch.zeros((), dtype=torch.int64, device=dev)
    seg_vid = torch.zeros(N + 1, dtype=torch.int64, device=dev).scatter_(
        0, torch.where(head, seg, torch.full_like(seg, N)), vid_orig[perm])
    vid = seg_vid[seg]                                           # per sorted point, its voxel's number
    inv = okv & (vid < mv)
    keep = inv & (slot < mp)
    dump = mv * mp
    flat = torch.where(keep, vid * mp + slot, torch.full_like(vid, dump))
    voxels = points.new_zeros((dump + 1, C)).index_copy_(0, flat, points[perm])[:dump].view(mv, mp, C)
    cnt = torch.zeros(mv + 1, dtype=torch.int32, device=dev).index_add_(
        0, torch.where(inv, vid, torch.full_like(vid, mv)), torch.ones_like(vid, dtype=torch.int32))
    num = torch.clamp(cnt[:mv], max=mp)
    k = torch.where(okv, skey, torch.zeros_like(skey))
    zyx = torch.stack([k // (gx * gy), (k // gx) % gy, k % gx], dim=1).to(torch.int32)
    coords = torch.full((mv + 1, 3), -1, dtype=torch.int32, device=dev).index_copy_(
        0, torch.where(head & inv, vid, torch.full_like(vid, mv)), zyx)[:mv]
    return StaticVoxels(voxels, coords, num, torch.clamp(total, max=mv), total)


def vfe_static(vox: StaticVoxels, flag_max: bool) -> torch.Tensor:
    """The mean VFE on the padded voxels: (max_voxels, C), padding rows 0 (``mean_voxel_features`` row by row)."""
    return mean_voxel_features(vox.voxels, vox.num_points, flag_max)


def engine_inputs(feats: Sequence[torch.Tensor], coords: Sequence[torch.Tensor], counts: Sequence[torch.Tensor],
                  capacity: int, batch_offset: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The views of one modality (each a padded (cap_v, C) feature block, (cap_v, 3) z, y, x coordinates and a
    count) -> the backbone engine's input layout (``EngineBackbone._gather_inputs``, B = 1): view v's rows as sample
    ``v * batch_offset`` after the valid rows of the views before it, padded to ``capacity`` rows (features 0,
    coordinates -1); -> (features, (capacity, 4) int32 (b, z, y, x), count)."""
    dev = feats[0].device
    C = feats[0].shape[1]
    f_out = feats[0].new_zeros((capacity + 1, C))
    c_out = torch.full((capacity + 1, 4), -1, dtype=torch.int32, device=dev)
    offset = torch.zeros((), dtype=torch.int64, device=dev)
    for v, (f, c, n) in enumerate(zip(feats, coords, counts)):
        r = torch.arange(f.shape[0], device=dev)
        dest = torch.where(r < n, offset + r, torch.full_like(r, capacity))
        dest = torch.where(dest < capacity, dest, torch.full_like(dest, capacity))
        bcol = torch.full((c.shape[0], 1), v * batch_offset, dtype=torch.int32, device=dev)
        f_out.index_copy_(0, dest, f)
        c_out.index_copy_(0, dest, torch.cat([bcol, c], 1))
        offset = offset + n
    return f_out[:capacity], c_out[:capacity], offset
