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

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..device_const import device_const
from ..opcount import mark
from ..model.vfe import mean_voxel_features
from ..segments import run_start
from .graphs import capture

log = logging.getLogger(__name__)


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
    start = run_start(is_start)
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


def raw_rows(points: torch.Tensor) -> torch.Tensor:
    """``depth.pseudo.raw_rows_from_points`` (x, y, z, 10 i, 0, 0, 0, 2) by concatenation (no scalar writes)."""
    p = points.to(torch.float32)
    z = torch.zeros_like(p[:, :1])
    return torch.cat([p[:, :3], p[:, 3:4] * 10.0, z, z, z, z + 2.0], 1)


@dataclass
class CalibTensors:
    """One calibration as float32 tensors on the device: the depth stage's ``V2R`` (4, 4), ``P2`` (3, 4), ``R2V``
    (4, 4) and ``intr`` (6,) (``depth.pseudo.lift_intrinsics``), and the backbone's per-view ``m_rect`` / ``p2_t``
    (V, 4, 3) (``engine.backbone.calib_tensors``; None where only the depth stage needs them). ``StaticFront``'s
    are views of one persistent buffer that it fills per frame (``pack_calib`` -> its staging copy), so a captured
    prelude graph reads the frame's calibration as an input instead of holding the capture's as constants."""
    V2R: torch.Tensor
    P2: torch.Tensor
    R2V: torch.Tensor
    intr: torch.Tensor
    m_rect: Optional[torch.Tensor] = None
    p2_t: Optional[torch.Tensor] = None


_CALIB_LAYOUT = (("V2R", (4, 4)), ("P2", (3, 4)), ("R2V", (4, 4)), ("intr", (6,)))


def calib_size(views: int) -> int:
    """Float32 values of ``pack_calib(calib, views)``."""
    return sum(int(np.prod(shape)) for _, shape in _CALIB_LAYOUT) + 2 * 12 * int(views)


def pack_calib(calib, views: int) -> torch.Tensor:
    """``calib`` -> the flat (``calib_size(views)``,) float32 CPU tensor that ``unpack_calib`` reads: the values the
    eager stages compute with (the depth generator's ``_mats`` / ``_intrinsics`` conversions, ``calib_tensors`` of
    ``views`` copies for the backbone)."""
    from ..depth.pseudo import lift_intrinsics
    from .backbone import calib_tensors

    parts = [torch.as_tensor(a, dtype=torch.float32) for a in (calib.V2R, calib.P2, calib.R2V, lift_intrinsics(calib))]
    bb = calib_tensors([calib] * int(views), "cpu")
    parts += [bb["m_rect"], bb["p2_t"]]
    return torch.cat([t.reshape(-1) for t in parts])


def unpack_calib(flat: torch.Tensor, views: int) -> CalibTensors:
    """Views of a ``pack_calib`` buffer (on any device) -> CalibTensors."""
    out, o = {}, 0
    for name, shape in _CALIB_LAYOUT + (("m_rect", (views, 4, 3)), ("p2_t", (views, 4, 3))):
        k = int(np.prod(shape))
        out[name] = flat[o:o + k].view(shape)
        o += k
    if o != flat.shape[0]:
        raise ValueError(f"unpack_calib: a buffer of {flat.shape[0]} values for {views} views (expected {o})")
    return CalibTensors(**out)


def calib_inputs(gen, calib, device) -> CalibTensors:
    """``calib``: CalibTensors (returned as they are) or a ``Calibration`` (-> the depth generator's cached tensors
    of it, without the backbone's)."""
    if isinstance(calib, CalibTensors):
        return calib
    V2R, P2, R2V = gen._mats(calib, device)
    return CalibTensors(V2R, P2, R2V, gen._intrinsics(calib, device))


def fov_mask(gen, pts: torch.Tensor, valid: torch.Tensor, calib, height: int, width: int) -> torch.Tensor:
    """The raw rows' FOV test (``depth.projection.fov_flag``) over padded points; ``calib`` as for
    ``calib_inputs``."""
    from ..depth.projection import fov_flag, project_points

    ct = calib_inputs(gen, calib, pts.device)
    uv, d = project_points(pts[:, :3], ct.V2R, ct.P2)
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
    folded into the FOV mask and the final compaction replaced by the thinning order cut to ``capacity`` rows.
    ``calib``: CalibTensors (every calibration number read from tensors) or a ``Calibration`` (``calib_inputs``)."""
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
    ct = calib_inputs(gen, calib, dev)
    p = pts[:, :4].to(torch.float32)
    uv, d = project_points(p[:, :3], ct.V2R, ct.P2)
    fov = fov_flag(uv, d, H, W) & valid
    sparse = sparse_depth_map(uv, d, fov, H, W)
    if gen._penet is not None:
        dense = gen._penet(sparse, image, None, K=ct.P2[:, :3].unsqueeze(0))
    else:
        dense = ipbasic_complete(sparse, cfg.ipbasic)
    xyz = lift_xyz(dense, ct.intr, ct.R2V)
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
    dist_acc = torch.where(found, acc.gather(0, first.clamp(max=bin_num - 1).view(1))[0], torch.zeros_like(first))
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
        0, order, p - run_start(start))
    capped = inbin & (b < pos)
    keep = inbin & ((b >= pos) | (rank < per_bin))
    within = torch.where(capped, rank, cpos)
    okey = torch.where(keep, (bin_num - 1 - b) * (N + 1) + within, torch.full_like(p, bin_num * (S + 1) + S))
    idx = torch.sort(okey, stable=True).indices
    n = keep.sum()
    out = torch.where((p < n)[:, None], rows[idx], torch.zeros_like(rows))
    return out, n


# --------------------------------------------------------------------------------------------------- the whole front
# prelude result flags (float32 vector folded into FrameGraph's device->host copy)
# raw rows in range, pseudo rows from depth (eager count), thinning overflow, per modality: the fewest voxels of a
# view and the most voxels a view had before the max_voxels cut
F_RAW_ROWS, F_PSEUDO, F_THIN_OVF, F_RAW_VOX, F_RAW_TOTAL, F_MM_VOX, F_MM_TOTAL = range(7)
N_FLAGS = 7


class Prelude:
    """Padded points (P, 4) + their count, the image, the discard's random numbers -> ``FrameGraph.run``'s inputs
    and a flag vector, all on the device without a host sync (the stages above, in the eager pipeline's order:
    raw rows + FOV, depth, range masks, discard, test views, voxelization, VFE).

    ``pipeline``: the ``cmfiou_core.pipeline.Pipeline`` whose eager stages this reproduces (its depth generator,
    model config, test views, range). ``pseudo_capacity``: pseudo rows kept from depth completion (grown by the
    caller when ``flags[F_PSEUDO]`` exceeds it)."""

    def __init__(self, pipeline, input_capacity: int, pseudo_capacity: int = 1 << 17):
        self.gen = pipeline.depth
        self.dcfg = pipeline.depth_cfg
        m = pipeline.mcfg
        self.voxel_size = list(m.voxel_size)
        self.pc_range = list(m.point_cloud_range)
        vx = pipeline.voxelizer
        self.grid = vx.grid_size_xyz
        self.max_points, self.max_voxels = vx.max_points, vx.max_voxels
        if self.max_voxels > int(input_capacity):
            raise ValueError(f"Prelude: max_voxels {self.max_voxels} exceeds the backbone input capacity "
                             f"{int(input_capacity)}")
        self.input_capacity = int(input_capacity)
        self.flag_max = pipeline.model.vfe.flag_max
        self.pipe = pipeline
        rate = pipeline.cfg.dataset.discard_rate
        self.rate = float(self.dcfg.discard.rate if rate is None else rate)
        self.bin_num, self.max_dis = self.dcfg.discard.bin_num, self.dcfg.discard.max_dis
        self.pseudo_capacity = int(pseudo_capacity)
        self.sort_thinning = False

    @property
    def views(self):
        """The pipeline's test views (read per frame: benches and tests set ``pipeline.views``)."""
        return [[float(x) for x in v] for v in self.pipe.views]

    @property
    def transform(self) -> bool:
        """Whether the views are transformed (the eager ``prepare_batch`` gets ``transform_params``)."""
        v = self.views
        return not (len(v) == 1 and v[0] == [0.0, 0.0, 1.0])

    @property
    def uses_random(self) -> bool:
        return self.rate > 0

    def _view_rows(self, rows, valid, v):
        from ..geometry.view_transform import view_transform_points

        if self.transform:
            param = device_const(self.views[v], torch.float32, rows.device)
            rows = view_transform_points(rows, param)
        r = self.pc_range
        x, y = rows[:, 0], rows[:, 1]
        return rows, valid & (x >= r[0]) & (x <= r[3]) & (y >= r[1]) & (y <= r[4])

    def __call__(self, pts: torch.Tensor, n: torch.Tensor, image: Optional[torch.Tensor], rnd: Optional[torch.Tensor],
                 calib, fov_hw: Optional[Tuple[int, int]]):
        """pts (P, 4) float32 (rows >= n ignored), n () int64, image (H, W, 3) uint8 or None (LiDAR-only), rnd (S,)
        float32 (with the discard and an image), calib (``CalibTensors``, e.g. ``StaticFront``'s staged buffer, or a
        ``Calibration``), fov_hw: the raw FOV filter's image size on
        LiDAR-only frames (None: no filter). -> (dict of FrameGraph.run's backbone inputs and anchor-mask points,
        flags (N_FLAGS,) int64). = ``part_b(part_a(...), rnd)``."""
        return self.part_b(self.part_a(pts, n, image, calib, fov_hw), rnd)

    def part_a(self, pts: torch.Tensor, n: torch.Tensor, image: Optional[torch.Tensor], calib,
               fov_hw: Optional[Tuple[int, int]]) -> dict:
        """Raw rows + FOV, depth, range masks (everything before the discard, which needs the frame's random
        numbers: the host draws them while the device runs this part). -> a dict of device tensors for part_b."""
        dev = pts.device
        P = pts.shape[0]
        valid = torch.arange(P, device=dev) < n
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        st = {"n_ps": zero, "thin_ovf": zero, "pseudo": None, "pv": None}
        if image is None:
            raw_valid = fov_mask(self.gen, pts, valid, calib, *fov_hw) if fov_hw is not None else valid
        else:
            d = depth_static(self.gen, pts, valid, image, calib, self.pseudo_capacity, self.sort_thinning)
            raw_valid, st["pseudo"], st["pv"] = d.raw_valid, d.pseudo, d.pseudo_valid
            st["n_ps"], st["thin_ovf"] = d.n_pseudo, d.thinning_overflow.to(torch.int64)
        lo = device_const(self.pc_range[:3], torch.float32, dev)
        hi = device_const(self.pc_range[3:], torch.float32, dev)
        st["raw"] = raw = raw_rows(pts)
        st["raw_valid"] = raw_valid & in_range(raw, lo, hi)
        if st["pseudo"] is not None:
            st["pv"] = st["pv"] & in_range(st["pseudo"], lo, hi)
        return st

    def part_b(self, st: dict, rnd: Optional[torch.Tensor]):
        """The discard, test views, voxelization and VFE on part_a's output -> (inputs dict, flags)."""
        raw, raw_valid, pseudo, pv = st["raw"], st["raw_valid"], st["pseudo"], st["pv"]
        dev = raw.device
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        n_raw, n_ps, thin_ovf = raw_valid.sum(), st["n_ps"], st["thin_ovf"]
        if pseudo is not None and self.rate > 0:
            pseudo, k = discard_static(pseudo, pv, rnd, self.rate, self.bin_num, self.max_dis)
            pv = torch.arange(pseudo.shape[0], device=dev) < k
        mods = {"raw": [], "mm": []}
        pts_xy = pts_valid = None
        for v in range(len(self.views)):
            for name, rows, ok, fmax in (("raw", raw, raw_valid, self.flag_max), ("mm", pseudo, None, False)):
                if rows is None:
                    continue
                rv, okv = self._view_rows(rows, raw_valid if name == "raw" else pv, v)
                if name == "raw" and v == 0:
                    pts_xy, pts_valid = rv[:, :2].contiguous(), okv
                sv = voxelize_static(rv, okv, self.voxel_size, self.pc_range, self.grid, self.max_points,
                                     self.max_voxels)
                mods[name].append((vfe_static(sv, fmax), sv.coords, sv.count, sv.total))
        V = len(self.views)
        out = {"pts_xy": pts_xy, "pts_valid": pts_valid}
        flags = [n_raw, n_ps, thin_ovf]
        for name in ("raw", "mm"):
            if mods[name]:
                f, c, k = engine_inputs([a[0] for a in mods[name]], [a[1] for a in mods[name]],
                                        [a[2] for a in mods[name]], self.input_capacity * V)
                out[name] = (f, c, k)
                flags += [torch.stack([a[2] for a in mods[name]]).min(), torch.stack([a[3] for a in mods[name]]).max()]
            else:
                out[name] = (None, None, None)
                flags += [zero, zero]
        return out, torch.stack([t.to(torch.int64) for t in flags])


@dataclass
class FrontResult:
    """One frame through ``StaticFront``: the detections (None when no raw point was in range) and the prelude's
    flags as host integers (see ``F_*``)."""
    detections: object
    flags: Tuple[int, ...]

    @property
    def raw_rows(self) -> int:
        return self.flags[F_RAW_ROWS]

    @property
    def raw_voxels(self) -> int:
        return self.flags[F_RAW_VOX]


class StaticFront:
    """``Pipeline(engine='graph')``'s whole forward: host->device copies of the padded frame into static buffers,
    the ``Prelude`` (one CUDA graph per bucket), ``FrameGraph.run`` (its own CUDA graph) with the prelude's flags in
    its one device->host copy. No host sync between the copies in and the copy out on CUDA; on the CPU the same
    static code runs without graphs.

    Buckets: the point capacity grows (never shrinks) in steps of ``POINT_QUANTUM`` to fit a frame, known on the host
    before the copy; the pseudo-row capacity grows when a frame's depth stage made more rows than it held (the frame
    is re-run without a graph, a warning says so); a thinning voxel over its point cap re-runs the frame with the sort
    thinning (as the eager generator does). A prelude graph also depends on the image size (its own buffers) and the
    test views (``graph_key``), not on the calibration: every calibration number (the depth stage's V2R / P2 / R2V and
    lifting intrinsics, the backbone's ``m_rect`` / ``p2_t``) is a graph input, staged per frame into one persistent
    buffer like the points (``stage_calib``), so a rig whose calibration changes every frame (KITTI object frames)
    replays one graph. At most ``MAX_GRAPHS`` are kept."""

    POINT_QUANTUM = 1 << 14
    MAX_GRAPHS = 8

    def __init__(self, pipeline, frame_graph, seed_fn, default_calib, use_graph: Optional[bool] = None,
                 pseudo_capacity: int = 1 << 17, margin: float = 1.25):
        self.pipe = pipeline
        self.seed_fn = seed_fn                  # frame points -> the discard's seed (pipeline.frame_seed)
        self.default_calib = default_calib      # () -> the calibration of a frame without one (the backbone's)
        self.fg = frame_graph
        self.prelude = Prelude(pipeline, frame_graph.backbone.input_capacity, pseudo_capacity)
        self.use_graph = use_graph
        self.margin = float(margin)
        self.point_capacity = 0
        self._gen = torch.Generator()          # CPU: the discard's draws are the eager pipeline's (frame_seed)
        self._bufs = {}
        self._graphs = {}
        self._calib_host = {}                   # calibration -> its pack_calib values (host, per views count)
        self.captures = 0
        self.replays = 0
        self.regrowths = 0
        self.last_flags: Tuple[int, ...] = ()

    # ------------------------------------------------------------------ host side
    MAX_BUFFERS = 32

    def _buffer(self, name: str, shape, dtype, pinned: bool):
        # one persistent buffer per name AND shape: frames of another image size (bags mixing cameras, KITTI's
        # 1224x370 / 1238x374 / 1242x375) get their own, so the graphs captured on the others stay valid (replacing
        # the buffer would drop every graph: measured as a capture on each image-size change, 8 of 80 frames)
        key = (name, pinned, tuple(shape), dtype)
        b = self._bufs.get(key)
        if b is None:
            if len(self._bufs) >= self.MAX_BUFFERS:     # many sizes: start again (graphs read the old buffers)
                self._bufs.clear()
                self._graphs.clear()
            if pinned:
                b = torch.empty(shape, dtype=dtype).pin_memory()
            else:
                b = torch.empty(shape, dtype=dtype, device=self.pipe.device)
            self._bufs[key] = b
        return b

    def _stage(self, name: str, shape, dtype, write) -> torch.Tensor:
        """``write(t)`` fills a host tensor of ``shape`` -> the data in its persistent device input buffer (on CUDA
        written straight into a reused page-locked buffer, then a non-blocking copy: the frame's result copy
        synchronises before a buffer is written again)."""
        if self.pipe.device.type != "cuda":     # the same persistent input buffers, written in place
            buf = self._buffer(name, shape, dtype, False)
            write(buf)
            return buf
        pin = self._buffer(name, shape, dtype, True)
        write(pin)
        dev = self._buffer(name, shape, dtype, False)
        dev.copy_(pin, non_blocking=True)
        return dev

    def stage_calib(self, calib, views: int) -> CalibTensors:
        """``calib`` -> its values (``pack_calib``, cached on the host per calibration) in the persistent device
        buffer the prelude graphs read (``_stage``), as CalibTensors views of it."""
        key = (calib.P2.tobytes(), calib.R0_rect.tobytes(), calib.Tr_velo_to_cam.tobytes(), int(views))
        packed = self._calib_host.get(key)
        if packed is None:
            if len(self._calib_host) > 64:
                self._calib_host.clear()
            packed = self._calib_host[key] = pack_calib(calib, views)
        buf = self._stage("calib", (calib_size(views),), torch.float32, lambda t: t.copy_(packed))
        return unpack_calib(buf, views)

    def graph_key(self, inp: dict) -> tuple:
        """The prelude graphs' cache key of a frame's staged inputs (``inputs``): the point and pseudo-row capacities,
        the image size (None: LiDAR-only), the LiDAR-only FOV size, the test views. Not the calibration: the graphs
        read it from its staging buffer."""
        img = inp["img"]
        return (int(inp["pts"].shape[0]), self.prelude.pseudo_capacity, None if img is None else tuple(img.shape),
                inp["fov_hw"], tuple(map(tuple, self.prelude.views)))

    # ------------------------------------------------------------------ per frame
    def inputs(self, frame, image, with_rnd: bool = True) -> dict:
        """A frame (``image``: the frame's image, None for LiDAR-only) -> the prelude's inputs in their device
        buffers (points padded to the point capacity, count, image, the discard's random numbers, ``cal``: the
        calibration's CalibTensors, the backbone's default one for a frame without) plus ``calib`` (the frame's,
        possibly None), ``fov_hw`` and ``use_img``. Checks the calibration as the depth stage does."""
        from ..calib import Calibration, CalibrationError

        pipe, pre = self.pipe, self.prelude
        points = np.ascontiguousarray(frame.points[:, :4], dtype=np.float32)
        n = points.shape[0]
        need = max(self.POINT_QUANTUM, -(-n // self.POINT_QUANTUM) * self.POINT_QUANTUM)
        self.point_capacity = max(self.point_capacity, need)
        P = self.point_capacity
        calib = frame.calib
        use_img = image is not None and pipe.depth_cfg.enabled
        if use_img:
            if not isinstance(calib, Calibration):
                raise CalibrationError(f"calib must be a cmfiou_core.calib.Calibration, got {type(calib).__name__}")
            calib.check_image_size(int(image.shape[1]), int(image.shape[0]))
            if pipe.depth_cfg.crop_official:
                from ..depth.config import DepthConfig

                ch, cw = DepthConfig.OFFICIAL_CROP
                if image.shape[0] < ch or image.shape[1] < cw:
                    raise ValueError(f"crop_official needs an image of at least {cw}x{ch}, got "
                                     f"{image.shape[1]}x{image.shape[0]}")
        fov_hw = None
        if not use_img and calib is not None and calib.image_width is not None and pipe.depth_cfg.fov_filter_raw:
            fov_hw = (int(calib.image_height), int(calib.image_width))
        def write_points(t):   # torch copies (multi-threaded; measured faster than np.copyto on the GPU host)
            t[:n].copy_(torch.from_numpy(points))
            t[n:].zero_()

        def write_count(t):
            t.fill_(n)

        out = {"pts": self._stage("points", (P, 4), torch.float32, write_points),
               "cnt": self._stage("count", (), torch.int64, write_count), "img": None, "rnd": None, "calib": calib,
               "fov_hw": fov_hw, "use_img": use_img,
               "cal": self.stage_calib(calib if calib is not None else self.default_calib(), len(pre.views))}
        if use_img:
            im = np.asarray(image)
            out["img"] = self._stage("image", im.shape, torch.uint8,
                                     lambda t: t.copy_(torch.from_numpy(np.ascontiguousarray(im))))
            if with_rnd:
                out["rnd"] = self.rnd(frame)
        return out

    def rnd(self, frame) -> Optional[torch.Tensor]:
        """The discard's random numbers of ``frame`` over the pseudo-row capacity, in their device buffer (None
        without a discard)."""
        if not self.prelude.uses_random:
            return None
        seed = self.seed_fn(frame.points)
        return self._stage("rnd", (self.prelude.pseudo_capacity,), torch.float32,
                           lambda t: torch.rand(t.shape, generator=self._gen.manual_seed(seed), out=t))

    @torch.no_grad()
    def __call__(self, frame, image, timer) -> FrontResult:
        pipe, pre = self.pipe, self.prelude
        dev = pipe.device
        mark("front.h2d")           # opcount sections: host staging, then device work until FrameGraph's copy
        inp = self.inputs(frame, image, with_rnd=False)
        pts, cnt, img, cal, fov_hw, use_img = (inp[k] for k in ("pts", "cnt", "img", "cal", "fov_hw", "use_img"))
        rnd = None
        timer.mark("h2d")
        mark("front.device")
        V = len(pre.views)
        tp = trans = None
        if pre.transform:
            tp = device_const([x for v in pre.views for x in v], torch.float32, dev).view(1, V, 3)
            trans = tp.permute(1, 0, 2).reshape(V, -1)
        use_graph = self.use_graph if self.use_graph is not None else dev.type == "cuda"
        bb = self.fg.backbone
        rerun = False
        try:
            for _ in range(4):
                # part a (rows, depth, range masks) is queued first; the host draws the discard's numbers while the
                # device runs it, then part b (discard .. VFE) follows
                graphed = use_graph and bb.calibrated and not rerun
                if graphed and use_img and pre.uses_random:
                    # the draws' buffers exist before the graphs are looked up (a new buffer drops the graphs; one
                    # made between the two replays would leave part b reading the old one)
                    self._buffer("rnd", (pre.pseudo_capacity,), torch.float32, False)
                gkey = self.graph_key(inp)
                box = {"rnd": rnd}

                def draw():
                    if use_img and box["rnd"] is None:
                        box["rnd"] = self.rnd(frame)

                run_a = (lambda: pre.part_a(pts, cnt, img, cal, fov_hw))   # noqa: E731
                run_b = (lambda st: pre.part_b(st, box["rnd"]))   # noqa: E731
                if graphed:
                    out, flags = self._replay(gkey, run_a, draw, run_b)
                else:
                    st = run_a()
                    draw()
                    out, flags = run_b(st)
                rnd = box["rnd"]
                timer.mark("prelude")
                if not bb.calibrated:
                    # calibration frame (host syncs anyway): the backbone cannot size its convs from an empty cloud
                    f = tuple(int(v) for v in flags.tolist())
                    if f[F_RAW_ROWS] == 0 or f[F_RAW_VOX] == 0:
                        self.last_flags = f
                        return FrontResult(None, f)
                raw_f, raw_c, raw_n = out["raw"]
                mm_f, mm_c, mm_n = out["mm"] if bb.eager.cfg.mm else (None, None, None)
                args = (raw_f, raw_c, raw_n, mm_f, mm_c, mm_n, cal.m_rect, cal.p2_t, trans)
                det, extra = self.fg.run(1, V, args, out["pts_xy"], out["pts_valid"], tp, extra=flags)
                timer.mark("engine")
                f = self.last_flags = tuple(int(v) for v in extra)
                grow = use_img and f[F_PSEUDO] > pre.pseudo_capacity
                thin = use_img and bool(f[F_THIN_OVF]) and not pre.sort_thinning
                if not grow and not thin:
                    break
                rerun = True
                if grow:
                    q = 4096
                    pre.pseudo_capacity = int(-(-int(f[F_PSEUDO] * self.margin) // q) * q)
                    self.regrowths += 1
                    self._graphs.clear()
                    log.warning("StaticFront: %d pseudo rows exceed the capacity: grown to %d and the frame re-run%s",
                                f[F_PSEUDO], pre.pseudo_capacity,
                                "; the prelude's CUDA graph is captured again" if use_graph else "")
                    rnd = self.rnd(frame) if use_img else None
                if thin:            # as the eager generator: this frame is thinned again by sorting
                    pre.sort_thinning = True
            else:
                raise RuntimeError("StaticFront: the pseudo-row capacity still overflows after 4 runs")
        finally:
            pre.sort_thinning = False
        if f[F_RAW_ROWS] == 0 or f[F_RAW_VOX] == 0:
            return FrontResult(None, f)
        return FrontResult(det, f)

    def _replay(self, key, run_a, between, run_b):
        """Replay (capturing first) the two prelude graphs of this bucket: part a, then ``between()`` on the host
        while the device runs it, then part b on part a's static outputs; -> part b's static outputs. The pair is
        one cache entry, so part b never reads the outputs of another capture of part a."""
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= self.MAX_GRAPHS:     # least recently replayed bucket out
                self._graphs.pop(next(iter(self._graphs)))
            graph_a, st = capture(run_a)
            graph_a.replay()
            between()
            graph_b, res = capture(lambda: run_b(st))
            graph_b.replay()
            g = self._graphs[key] = (graph_a, graph_b, res)
            self.captures += 1
            log.info("StaticFront: captured the prelude's CUDA graphs (points %d, pseudo rows %d)", key[0], key[1])
        else:
            self._graphs[key] = self._graphs.pop(key)   # most recently replayed last (the eviction order)
            graph_a, graph_b, res = g
            graph_a.replay()
            between()
            graph_b.replay()
        self.replays += 1
        return res

