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


# --------------------------------------------------------------------------------------------------- points, depth
def in_range(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``Pipeline._range_mask``'s test (x, y, z inside the detection range, inclusive; NaN out) as a mask."""
    xyz = rows[:, :3]
    return ((xyz >= lo) & (xyz <= hi)).all(dim=1)


def fov_mask(gen, pts: torch.Tensor, valid: torch.Tensor, calib, height: int, width: int) -> torch.Tensor:
    """The raw rows' FOV test (``depth.projection.fov_flag``, the generator's cached matrices) over padded points."""
    from ..depth.projection import fov_flag, project_points

    V2R, P2, _ = gen._mats(calib, pts.device)
    uv, d = project_points(pts[:, :3], V2R, P2)
    return fov_flag(uv, d, int(height), int(width)) & valid


@dataclass
class StaticDepth:
    """``PseudoPointGenerator`` on padded points: ``raw_valid`` (P,) the raw rows (``raw_rows_from_points`` of the
    padded points) the eager generator keeps, in input order; ``pseudo`` (S, 8) its pseudo rows in its order, rows
    ``>= min(n_pseudo, S)`` zero; ``pseudo_valid`` (S,); ``n_pseudo`` () int64 the eager row count (more than S: the
    capacity overflowed, the frame must be re-run with a larger one); ``thinning_overflow`` () bool: a thinning voxel
    held more than max_points_per_voxel points, so the dense thinning is not the eager result (re-run with
    ``sort_thinning``)."""
    raw_valid: torch.Tensor
    pseudo: torch.Tensor
    pseudo_valid: torch.Tensor
    n_pseudo: torch.Tensor
    thinning_overflow: torch.Tensor


def depth_static(gen, pts: torch.Tensor, valid: torch.Tensor, image: torch.Tensor, calib, capacity: int,
                 sort_thinning: bool = False) -> StaticDepth:
    """The generator's steps (its device path: no compaction of the valid pixels) with the padded points' validity
    folded into the FOV mask and the final compaction replaced by the thinning order cut to ``capacity`` rows."""
    from ..depth.ipbasic import ipbasic_complete
    from ..depth.pseudo import _compact_order, la_sampling2_dense, la_sampling2_order_sorted, lift_xyz, pseudo_rows
    from ..depth.config import DepthConfig
    from ..depth.projection import fov_flag, project_points, sparse_depth_map

    cfg = gen.cfg
    dev = pts.device
    if cfg.crop_official:
        ch, cw = DepthConfig.OFFICIAL_CROP
        image = image[:ch, :cw]
    H, W = int(image.shape[0]), int(image.shape[1])
    V2R, P2, R2V = gen._mats(calib, dev)
    p = pts[:, :4].to(torch.float32)
    uv, d = project_points(p[:, :3], V2R, P2)
    fov = fov_flag(uv, d, H, W) & valid
    sparse = sparse_depth_map(uv, d, fov, H, W)
    dense = gen._penet(sparse, image, calib) if gen._penet is not None else ipbasic_complete(sparse, cfg.ipbasic)
    xyz = lift_xyz(dense, calib, R2V)
    dd = dense.reshape(-1)
    ok = (dd >= cfg.min_depth) & (dd > 0) & (xyz[:, 2] < cfg.max_z)
    th = cfg.thinning
    overflow = torch.zeros((), dtype=torch.bool, device=dev)
    if th.enabled and gen._grid is not None and not sort_thinning:
        order, n_ps, overflow = la_sampling2_dense(xyz, ok, th, gen._grid)
    elif th.enabled:
        order, n_ps = la_sampling2_order_sorted(xyz, ok, th)
    else:
        order, n_ps = _compact_order(ok)
    S = int(capacity)
    if order.shape[0] < S:
        order = torch.cat([order, order.new_zeros(S - order.shape[0])])
    sel = order[:S]
    pv = torch.arange(S, device=dev) < n_ps
    rows = pseudo_rows(xyz[sel], image.reshape(-1, 3)[sel])
    rows = torch.where(pv[:, None], rows, torch.zeros_like(rows))
    raw_valid = fov if cfg.fov_filter_raw else valid
    return StaticDepth(raw_valid, rows, pv, n_ps, overflow)


# --------------------------------------------------------------------------------------------------- discard
def discard_static(rows: torch.Tensor, valid: torch.Tensor, rnd: torch.Tensor, rate: float = 0.8, bin_num: int = 10,
                   max_dis: float = 60.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``depth.io.input_point_discard(rows[valid], rate, bin_num, max_dis)`` on fixed shapes, no host sync.

    ``rnd`` (>= S,) float32: the eager ``torch.rand(N)`` drawn over the capacity (row i of the valid rows, in order,
    takes ``rnd[i]``). The slab counts, the far-slab walk and the per-slab cap are evaluated on the device in float64
    with the eager Python arithmetic (integer quotients and products are exact there); padding rows sort after every
    valid row. -> (rows (S, C) in the eager output order, the rest zero; count () int64)."""
    S = rows.shape[0]
    dev = rows.device
    retain = 1.0 - rate
    inter = max_dis / bin_num
    cpos = torch.cumsum(valid, 0) - 1                     # position among the valid rows (the eager row index)
    N = cpos[-1] + 1 if S else torch.zeros((), dtype=torch.int64, device=dev)
    x = rows[:, 0]
    b = torch.clamp(torch.floor(x / inter), max=bin_num - 1).to(torch.int64)
    inbin = valid & (x >= 0)
    b = torch.where(inbin, b, torch.full_like(b, -1))
    counts = torch.zeros(bin_num + 1, dtype=torch.int64, device=dev).index_add_(
        0, torch.where(inbin, b, torch.full_like(b, bin_num)), torch.ones_like(b))[:bin_num]
    # the far-slab walk: for i = bin_num-1 .. 0, acc_i = counts[i:].sum(); the last i (smallest) with
    # (acc_i + i * counts[i]) / N < retain sets pos = i and dist_acc = acc_i (default: bin_num - 1, 0)
    acc = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])
    i = torch.arange(bin_num, device=dev)
    Nd = N.to(torch.float64)
    cond = (acc + i * counts).to(torch.float64) / Nd < retain
    first = torch.where(cond, i, torch.full_like(i, bin_num)).min()
    found = first < bin_num
    pos = torch.where(found, first, torch.full_like(first, bin_num - 1))
    dist_acc = torch.where(found, acc[first.clamp(max=bin_num - 1)], torch.zeros_like(first))
    per_bin = torch.trunc((torch.trunc(Nd * retain) - dist_acc.to(torch.float64))
                          / (pos.to(torch.float64) + 0.0001)).to(torch.int64)
    r = rnd[:S][cpos.clamp(min=0)]
    key = (b + 1).to(torch.float64) * 2.0 + r.to(torch.float64)
    key = torch.where(valid, key, torch.full_like(key, 2.0 * (bin_num + 2)))
    order = torch.sort(key, stable=True).indices
    sb = torch.where(valid, b, torch.full_like(b, bin_num))[order]
    p = torch.arange(S, device=dev)
    start = torch.ones(S, dtype=torch.bool, device=dev)
    if S > 1:
        start[1:] = sb[1:] != sb[:-1]
    rank = torch.empty(S, dtype=torch.int64, device=dev).scatter_(
        0, order, p - torch.cummax(torch.where(start, p, torch.zeros_like(p)), 0).values)
    capped = inbin & (b < pos)
    keep = inbin & ((b >= pos) | (rank < per_bin))
    within = torch.where(capped, rank, cpos)
    okey = torch.where(keep, (bin_num - 1 - b) * (N + 1) + within, torch.full_like(p, bin_num * (S + 1) + S))
    idx = torch.sort(okey, stable=True).indices
    n = keep.sum()
    out = torch.where((p < n)[:, None], rows[idx], torch.zeros_like(rows))
    return out, n
