"""Pseudo points from camera + LiDAR, following the official CMF-IOU/VirConv ``velodyne_depth`` generation:

FOV filter (``get_fov_flag``) -> sparse depth (nearest point per pixel) -> completion (IP-Basic or PENet) -> lift
pixels with depth >= 0.01 to rect -> LiDAR, attach RGB/3 and flag 1 -> drop LiDAR z >= 1.0 -> ``la_sampling2``
angular thinning -> merge with raw rows ``[x, y, z, 10 i, 0, 0, 0, 2]``.

Everything runs on the device of the inputs with fixed-size tensors and masks; the only host synchronisation is the
final compaction (one ``tolist`` of the two output counts and the thinning overflow flag), which also serves the
CUDA-event timings. Remaining syncs in the hot path (CUDA): that one ``tolist``; a second one only if a thinning
voxel holds more than ``max_points_per_voxel`` points (sort-based recomputation); one-off H2D copies of small
cached constants on the first call per device (calibration matrices, tap offsets / weights, grid bounds).
The implementation before the speed work is frozen in :mod:`cmfiou_core.depth.reference`; tests assert
bit-identical output (on the CPU; see :func:`lift_xyz` for CUDA). Every calibration number reaches the device
computations as a tensor (:meth:`PseudoPointGenerator._mats`, :func:`lift_intrinsics`), so the graph engine
(``engine.prelude``) runs the same code on its per-frame calibration buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..calib import Calibration, CalibrationError
from ..config import ConfigError
from ..device_const import device_const
from ..segments import run_start
from .config import DepthConfig, ThinningConfig
from ..timing import StageTimer
from .ipbasic import ipbasic_complete
from .projection import fov_flag, project_points, sparse_depth_map


@dataclass
class PseudoResult:
    raw_rows: torch.Tensor  # (N', 8) [x, y, z, 10 i, 0, 0, 0, 2]
    pseudo_rows: torch.Tensor  # (M, 8) [x, y, z, 0, R/3, G/3, B/3, 1]
    timings_ms: Dict[str, float] = field(default_factory=dict)
    sparse_depth: Optional[torch.Tensor] = None  # (H, W), only with keep_maps=True
    dense_depth: Optional[torch.Tensor] = None

    @property
    def all_rows(self) -> torch.Tensor:
        """``concat([raw_rows, pseudo_rows])``, the layout of the official ``velodyne_depth/<id>.npy``."""
        return torch.cat([self.raw_rows, self.pseudo_rows], 0)


# ----------------------------------------------------------------------------------------------- building blocks
def raw_rows_from_points(points: torch.Tensor) -> torch.Tensor:
    """(N, 4) x, y, z, intensity -> (N, 8) [x, y, z, 10 i, 0, 0, 0, 2]."""
    out = torch.zeros(points.shape[0], 8, dtype=torch.float32, device=points.device)
    out[:, :3] = points[:, :3]
    out[:, 3] = points[:, 3] * 10.0
    out[:, 7] = 2.0
    return out


_PIXEL_GRID_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _pixel_grid(H: int, W: int, dev) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached flat float32 pixel column / row grids (u, v) of an H x W image, row-major (no calibration in it: the
    lifting subtracts the principal point per frame, so a CUDA graph of it reads the calibration as an input)."""
    key = (H, W, str(dev))
    g = _PIXEL_GRID_CACHE.get(key)
    if g is None:
        if len(_PIXEL_GRID_CACHE) > 16:
            _PIXEL_GRID_CACHE.clear()
        v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32),
                              torch.arange(W, device=dev, dtype=torch.float32), indexing="ij")
        g = (u.reshape(-1), v.reshape(-1))
        _PIXEL_GRID_CACHE[key] = g
    return g


def lift_intrinsics(calib: Calibration) -> np.ndarray:
    """(6,) float32 [fu, fv, cu, cv, tx, ty] of ``calib.P2``, the numbers :func:`lift_xyz` uses: tx = P2[0, 3] / -fu
    and ty = P2[1, 3] / -fv evaluated in float64 as ``Calibration.img_to_rect`` does, then each value rounded to
    float32 (the value a float32 tensor op with that float64 scalar operand computes with)."""
    P = np.asarray(calib.P2, dtype=np.float64)
    fu, fv = P[0, 0], P[1, 1]
    return np.array([fu, fv, P[0, 2], P[1, 2], P[0, 3] / (-fu), P[1, 3] / (-fv)], dtype=np.float32)


def lift_xyz(depth: torch.Tensor, intrinsics: torch.Tensor, R2V: torch.Tensor) -> torch.Tensor:
    """Every pixel (u = column, v = row, d) -> (H*W, 3) LiDAR xyz in row-major pixel order
    (``img_to_rect`` then ``rect_to_lidar``). No host sync.

    ``intrinsics``: (6,) float32 :func:`lift_intrinsics` on the depth's device, read as tensors (the eager generator
    and the graph engine's calibration buffer run this one function, so they agree on every device). On the CPU this
    is bit-identical to the frozen reference ``lift_depth`` (scalar operands: float32 ``a / b`` either way). On CUDA
    a division by a Python scalar is a multiplication by its float32 reciprocal, a division by a tensor is a true
    division: this function's values can differ from the reference evaluated on CUDA by one ulp."""
    H, W = depth.shape
    u, v = _pixel_grid(H, W, depth.device)
    fu, fv, cu, cv, tx, ty = intrinsics.unbind(0)
    d = depth.reshape(-1).to(torch.float32)
    rect = torch.stack([(u - cu) * d / fu + tx, (v - cv) * d / fv + ty, d], dim=-1)  # = Calibration.img_to_rect
    return rect @ R2V[:3, :3].T + R2V[:3, 3]


def pseudo_rows(xyz: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """(M, 3) LiDAR xyz + (M, 3) uint8 RGB -> (M, 8) pseudo rows [x, y, z, 0, R/3, G/3, B/3, 1]."""
    n = xyz.shape[0]
    z = torch.zeros(n, 1, dtype=torch.float32, device=xyz.device)
    return torch.cat([xyz, z, rgb.to(torch.float32) / 3.0, z + 1.0], 1)


def lift_depth(depth: torch.Tensor, image: torch.Tensor, calib: Calibration, min_depth: float = 0.01,
               R2V: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every pixel (u = column, v = row, d) -> LiDAR point with colour: ((H*W, 8) rows in row-major pixel order,
    (H*W,) valid = d >= min_depth). Uses ``Calibration.img_to_rect`` then ``rect_to_lidar`` semantics.
    (The generator itself lifts only xyz and builds the 8-column rows for the selected points.)"""
    if R2V is None:
        R2V = torch.as_tensor(calib.R2V, dtype=torch.float32, device=depth.device)
    d = depth.reshape(-1).to(torch.float32)
    intr = torch.from_numpy(lift_intrinsics(calib)).to(depth.device)
    rows = pseudo_rows(lift_xyz(depth, intr, R2V), image.reshape(-1, 3))
    return rows, (d >= min_depth) & (d > 0)


# ----------------------------------------------------------------------------------------------- thinning
_F32_PI = 3.1415927410125732  # float32(pi) > pi: the largest value float32 arccos returns
_DENSE_MAX_CELLS = 1 << 22    # larger reachable voxel grids use the sort-based path


def thinning_grid(cfg: ThinningConfig) -> Optional[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]:
    """The part of the (r, theta, phi) voxel grid that a point passing la_sampling2's filters can reach, as
    (lo, shape) in voxel indices; None when it has more than ``_DENSE_MAX_CELLS`` cells.

    Reachable component values: r >= 0, theta in (theta_min, pi] (arccos), phi in [-pi/2, pi/2] (arctan), with
    float32 pi. The bounds get a 2-voxel margin on each side (float32 evaluation of floor((c - min) / size) is off by
    far less than one voxel), then are clipped to the configured grid, so restricting the check
    ``0 <= index < grid`` to ``lo <= index < lo + shape`` drops no point (tested with extreme inputs). The default
    config gives 1 x 825 x 1576 = 1.3 M cells (the full grid would be 1 x 5000 x 5000)."""
    lo, shape = [], []
    reach = ((0.0, math.inf), (max(cfg.theta_min, 0.0), _F32_PI), (-_F32_PI / 2, _F32_PI / 2))
    for i, (a, b) in enumerate(reach):
        vmin, size = cfg.voxel_range[i], cfg.voxel_size[i]
        grid = int(round((cfg.voxel_range[i + 3] - vmin) / size))
        l_ = max(0, math.floor((a - vmin) / size) - 2)
        h_ = grid if math.isinf(b) else min(grid, math.floor((b - vmin) / size) + 3)
        lo.append(l_)
        shape.append(max(0, h_ - l_))
    if shape[0] * shape[1] * shape[2] > _DENSE_MAX_CELLS:
        return None
    return tuple(lo), tuple(shape)


def la_sampling2_dense(xyz: torch.Tensor, valid: Optional[torch.Tensor], cfg: ThinningConfig,
                       grid: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort-free ``la_sampling2`` on a dense voxel grid (see :func:`thinning_grid`); no host sync.

    Same binning ops as the sort-based :func:`la_sampling2_order_sorted` (bit-identical
    voxel indices on every device), then three scatters over the grid instead of sorts:
      * first-arrival index per voxel (``amin`` of the point index) -> voxel creation order and the voxel "heads";
      * point count per voxel -> ``overflow`` = some voxel holds more than ``max_points_per_voxel`` points;
      * winner per voxel = ``amin`` of the packed int64 key (order-preserving int32 image of z, point index): the
        smallest z, lowest index on ties -- exactly the sort path's "smallest z among the competing points, first
        one on ties" whenever every point competes, i.e. when ``overflow`` is False (z is canonicalised with + 0.0
        so -0.0 and +0.0 tie as float comparison says).
    The winners are compacted in voxel creation order with a cumsum over the heads.

    Returns (order (N,) int64: the first ``count`` entries are the winners, the rest 0; count (0-dim int64);
    overflow (0-dim bool)). When ``overflow`` is True the result is not valid: use the sort path.
    ``valid=None`` means all points are valid.
    """
    (lo0, lo1, lo2), (s0, s1, s2) = grid
    M = s0 * s1 * s2
    N = xyz.shape[0]
    dev = xyz.device
    x, y, z = xyz.unbind(1)
    r = torch.linalg.vector_norm(xyz, dim=1)
    theta = torch.arccos(z / r)
    phi = torch.atan(y / x)
    ok = theta > cfg.theta_min  # NaN compares False
    if valid is not None:
        ok = ok & valid
    # per component: the sort path's exact ops (tensor op python scalar: CUDA divides by a scalar via its
    # reciprocal, so a tensor of sizes would bin differently)
    c = torch.stack([torch.floor((comp - cfg.voxel_range[i]) / cfg.voxel_size[i])
                     for i, comp in enumerate((r, theta, phi))], 1)
    c = c - device_const((float(lo0), float(lo1), float(lo2)), torch.float32, dev)
    ok = ok & ((c >= 0) & (c < device_const((float(s0), float(s1), float(s2)), torch.float32, dev))).all(1)
    # cell index, exact in float32 (integers < M <= 2^22 < 2^24)
    cell = (c * device_const((float(s1 * s2), float(s2), 1.0), torch.float32, dev)).sum(1)
    key = torch.where(ok, cell, float(M)).to(torch.int64)
    idx = torch.arange(N, device=dev)
    first = torch.full((M + 1,), N, dtype=torch.int64, device=dev).scatter_reduce_(0, key, idx, "amin")
    count = torch.zeros(M + 1, dtype=torch.int32, device=dev).index_add_(0, key, ok.to(torch.int32))
    overflow = count[:M].amax() > cfg.max_points_per_voxel if M else torch.zeros((), dtype=torch.bool, device=dev)
    bits = (z + 0.0).view(torch.int32)
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 ordered like the float
    packed = mono.to(torch.int64) * 4294967296 + idx
    best = torch.full((M + 1,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev).scatter_reduce_(
        0, key, packed, "amin")
    head = ok & (first[key] == idx)
    winner = best[key] & 0xFFFFFFFF
    pos = torch.cumsum(head, 0)
    order = torch.zeros(N + 1, dtype=torch.int64, device=dev).scatter_(0, torch.where(head, pos - 1, N), winner)
    n = pos[-1] if N else torch.zeros((), dtype=torch.int64, device=dev)
    return order[:N], n, overflow


def la_sampling2_order_sorted(xyz: torch.Tensor, valid: torch.Tensor, cfg: ThinningConfig = ThinningConfig()
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vectorised ``la_sampling2`` on fixed-size inputs.

    Spherical r = |p|, theta = arccos(z / r), phi = arctan(y / x); points with theta <= theta_min are dropped;
    voxels over (r, theta, phi) (spconv ``Point2VoxelCPU3d`` semantics: floor((c - min) / size), out-of-range dropped,
    voxels created in order of first arrival, only the first ``max_points_per_voxel`` points per voxel are stored);
    per voxel the point with the smallest Cartesian z wins (first one on ties).

    Returns (order (N,) int64 indices into the input whose first ``count`` entries are the winners, in voxel
    creation order; count (0-dim int64 tensor)). No host sync.
    """
    N = xyz.shape[0]
    dev = xyz.device
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    r = torch.linalg.vector_norm(xyz, dim=1)
    theta = torch.arccos(z / r)
    phi = torch.atan(y / x)
    grid = [int(round((cfg.voxel_range[i + 3] - cfg.voxel_range[i]) / cfg.voxel_size[i])) for i in range(3)]
    ok = valid & (theta > cfg.theta_min)  # NaN compares False
    cs = []
    for i, comp in enumerate((r, theta, phi)):  # python-scalar arithmetic: no H2D copies (they would sync)
        ci = torch.floor((comp - cfg.voxel_range[i]) / cfg.voxel_size[i])
        ok = ok & (ci >= 0) & (ci < grid[i])
        cs.append(ci)
    c = torch.stack(cs, 1)
    c = c.masked_fill(~ok[:, None], 0.0).to(torch.int64)
    sentinel = grid[0] * grid[1] * grid[2]
    key = torch.where(ok, (c[:, 0] * grid[1] + c[:, 1]) * grid[2] + c[:, 2], torch.full_like(c[:, 0], sentinel))

    skey, perm = torch.sort(key, stable=True)  # stable: arrival order inside a voxel
    pos = torch.arange(N, device=dev)
    is_start = torch.ones(N, dtype=torch.bool, device=dev)
    if N > 1:
        is_start[1:] = skey[1:] != skey[:-1]
    seg = torch.cumsum(is_start.to(torch.int64), 0) - 1
    start = run_start(is_start)
    rank = pos - start
    compete = (rank < cfg.max_points_per_voxel) & (skey != sentinel)
    zs = z[perm].masked_fill(~compete, float("inf"))
    seg_min = torch.full((N,), float("inf"), dtype=zs.dtype, device=dev).scatter_reduce(
        0, seg, zs, reduce="amin", include_self=True)
    cand = compete & (zs == seg_min[seg])
    first = torch.full((N,), N, dtype=torch.int64, device=dev).scatter_reduce(
        0, seg, torch.where(cand, pos, torch.full_like(pos, N)), reduce="amin", include_self=True)
    win = cand & (pos == first[seg])
    # voxel creation order = original index of the voxel's first point (rank 0 of its segment)
    okey = torch.where(win, perm[start], torch.full_like(perm, N))
    o = torch.argsort(okey, stable=True)
    return perm[o], win.sum()


def la_sampling2_order(xyz: torch.Tensor, valid: torch.Tensor, cfg: ThinningConfig = ThinningConfig(),
                       method: str = "dense") -> Tuple[torch.Tensor, torch.Tensor]:
    """Vectorised ``la_sampling2`` on fixed-size inputs.

    Spherical r = |p|, theta = arccos(z / r), phi = arctan(y / x); points with theta <= theta_min are dropped;
    voxels over (r, theta, phi) (spconv ``Point2VoxelCPU3d`` semantics: floor((c - min) / size), out-of-range dropped,
    voxels created in order of first arrival, only the first ``max_points_per_voxel`` points per voxel are stored);
    per voxel the point with the smallest Cartesian z wins (first one on ties).

    Returns (order (N,) int64 indices into the input whose first ``count`` entries are the winners, in voxel
    creation order; count (0-dim int64 tensor)).

    ``method``: ``dense`` (default) = :func:`la_sampling2_dense`, falling back to the sort path when a voxel
    overflows -- checking that costs one host sync on CUDA (the generator instead folds the flag into its final
    sync); ``sort`` = the frozen reference sort-based code (no sync). Both give identical results.
    """
    grid = thinning_grid(cfg) if method == "dense" else None
    if method not in ("dense", "sort"):
        raise ValueError(f"method must be 'dense' or 'sort', got {method!r}")
    if grid is not None:
        order, n, overflow = la_sampling2_dense(xyz, valid, cfg, grid)
        if not bool(overflow):  # host sync on CUDA
            return order, n
    return la_sampling2_order_sorted(xyz, valid, cfg)


def _compact_order(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices whose first ``count`` entries are the True positions in order (rest 0), count) without a sort or a
    host sync: cumsum + scatter."""
    N = mask.shape[0]
    pos = torch.cumsum(mask, 0)
    out = torch.zeros(N + 1, dtype=torch.int64, device=mask.device).scatter_(
        0, torch.where(mask, pos - 1, N), torch.arange(N, device=mask.device))
    return out[:N], (pos[-1] if N else torch.zeros((), dtype=torch.int64, device=mask.device))


# ----------------------------------------------------------------------------------------------- the generator
class PseudoPointGenerator:
    """``gen(points (N, 4), image (H, W, 3) uint8, calib) -> PseudoResult`` on the device of the inputs.

    ``penet_model``: an already built/loaded :class:`cmfiou_core.depth.penet.PENet` (tests, training); otherwise
    ``method: penet`` loads ``cfg.penet.checkpoint`` (weights_only) and refuses to run without one.
    """

    cpu_compaction = True  # on CPU, thin only the valid pixels (False: the GPU path, for tests / op counts)

    def __init__(self, cfg: DepthConfig = DepthConfig(), penet_model=None):
        if not isinstance(cfg, DepthConfig):
            raise TypeError(f"PseudoPointGenerator needs a DepthConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self._penet = None
        if cfg.method == "penet":
            from .penet import PENetCompleter, build_penet, load_penet_checkpoint

            if penet_model is None:
                if not cfg.penet.checkpoint:
                    raise ConfigError("depth.method is 'penet' but depth.penet.checkpoint is not set: no PENet "
                                      "weights are bundled with cmfiou (use method 'ipbasic', or train / supply a "
                                      "checkpoint in the pe.pth.tar layout)")
                penet_model = build_penet()
                load_penet_checkpoint(penet_model, cfg.penet.checkpoint)
            self._penet = PENetCompleter(penet_model, pad_multiple=cfg.penet.pad_multiple)
        self._mat_cache: Dict[tuple, Tuple[torch.Tensor, ...]] = {}
        self._grid = thinning_grid(cfg.thinning)  # None: sort-based thinning (grid too large for a dense scatter)

    def _calib_cached(self, calib: Calibration, device) -> Tuple[torch.Tensor, ...]:
        key = (calib.P2.tobytes(), calib.R0_rect.tobytes(), calib.Tr_velo_to_cam.tobytes(), str(device))
        m = self._mat_cache.get(key)
        if m is None:
            if len(self._mat_cache) > 16:
                self._mat_cache.clear()
            m = tuple(torch.as_tensor(a, dtype=torch.float32, device=device)
                      for a in (calib.V2R, calib.P2, calib.R2V, lift_intrinsics(calib)))
            self._mat_cache[key] = m
        return m

    def _mats(self, calib: Calibration, device):
        """(V2R 4x4, P2 3x4, R2V 4x4) float32 on ``device``, cached per calibration."""
        return self._calib_cached(calib, device)[:3]

    def _intrinsics(self, calib: Calibration, device) -> torch.Tensor:
        """:func:`lift_intrinsics` of ``calib`` as a float32 tensor on ``device``, cached per calibration."""
        return self._calib_cached(calib, device)[3]

    @staticmethod
    def _check_inputs(points, image, calib):
        if not isinstance(points, torch.Tensor) or points.ndim != 2 or points.shape[1] < 4:
            raise ValueError(f"points must be a (N, 4) tensor x, y, z, intensity; got "
                             f"{tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__}")
        if not points.is_floating_point():
            raise ValueError(f"points must be floating point, got {points.dtype}")
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
            raise ValueError("image must be an (H, W, 3) uint8 RGB tensor; got "
                             f"{(tuple(image.shape), image.dtype) if isinstance(image, torch.Tensor) else type(image)}")
        if image.device != points.device:
            raise ValueError(f"points ({points.device}) and image ({image.device}) must be on the same device")
        if not isinstance(calib, Calibration):
            raise CalibrationError(f"calib must be a cmfiou_core.calib.Calibration, got {type(calib).__name__}")
        calib.check_image_size(int(image.shape[1]), int(image.shape[0]))

    def __call__(self, points: torch.Tensor, image: torch.Tensor, calib: Calibration, keep_maps: bool = False
                 ) -> PseudoResult:
        self._check_inputs(points, image, calib)
        cfg = self.cfg
        dev = points.device
        timer = StageTimer(dev, cfg.timing)
        timer.mark("start")
        if cfg.crop_official:
            ch, cw = DepthConfig.OFFICIAL_CROP
            if image.shape[0] < ch or image.shape[1] < cw:
                raise ValueError(f"crop_official needs an image of at least {cw}x{ch}, got "
                                 f"{image.shape[1]}x{image.shape[0]}")
            image = image[:ch, :cw]
        H, W = int(image.shape[0]), int(image.shape[1])
        V2R, P2, R2V = self._mats(calib, dev)
        pts = points[:, :4].to(torch.float32)

        # 1. projection + FOV + sparse depth
        uv, d = project_points(pts[:, :3], V2R, P2)
        fov = fov_flag(uv, d, H, W)
        sparse = sparse_depth_map(uv, d, fov, H, W)
        timer.mark("projection")

        # 2. completion
        if self._penet is not None:
            dense = self._penet(sparse, image, calib)
        else:
            dense = ipbasic_complete(sparse, cfg.ipbasic)
        timer.mark("completion")

        # 3. lifting (xyz only; the 8-column rows are built for the selected points) + z filter
        xyz = lift_xyz(dense, self._intrinsics(calib, dev), R2V)
        d = dense.reshape(-1)
        valid = (d >= cfg.min_depth) & (d > 0) & (xyz[:, 2] < cfg.max_z)
        timer.mark("lifting")

        # 4. thinning + compaction. Host syncs: exactly one, the tolist of the two output counts and the thinning
        # overflow flag (a second thinning + sync only if some voxel holds > max_points_per_voxel points)
        th = cfg.thinning
        sub = None
        if th.enabled and dev.type == "cpu" and self.cpu_compaction:
            # on CPU a compaction costs no device sync: thin only the valid pixels (same result, smaller grids)
            sub = torch.nonzero(valid).squeeze(1)
        if th.enabled and self._grid is not None:
            order, n_ps, overflow = la_sampling2_dense(xyz if sub is None else xyz[sub], None if sub is not None
                                                       else valid, th, self._grid)
        elif th.enabled:
            order, n_ps = la_sampling2_order_sorted(xyz if sub is None else xyz[sub],
                                                    valid if sub is None else torch.ones_like(sub, dtype=torch.bool),
                                                    th)
            overflow = torch.zeros((), dtype=torch.bool, device=dev)
        else:
            order, n_ps = _compact_order(valid)
            overflow = torch.zeros((), dtype=torch.bool, device=dev)
        raw_mask = fov if cfg.fov_filter_raw else torch.ones_like(fov)
        raw_order, n_raw = _compact_order(raw_mask)
        n_raw_i, n_ps_i, overflow_i = torch.stack([n_raw, n_ps, overflow.to(torch.int64)]).tolist()
        if overflow_i:  # rare: the sort path honours max_points_per_voxel exactly
            order, n_ps = la_sampling2_order_sorted(xyz if sub is None else xyz[sub],
                                                    valid if sub is None else torch.ones_like(sub, dtype=torch.bool),
                                                    th)
            n_ps_i = int(n_ps)
        sel = order[:n_ps_i]
        if sub is not None:
            sel = sub[sel]
        pseudo = pseudo_rows(xyz[sel], image.reshape(-1, 3)[sel])
        raw_rows = raw_rows_from_points(pts[raw_order[:n_raw_i]])
        timer.mark("thinning")
        return PseudoResult(raw_rows, pseudo, timer.result(),
                            sparse if keep_maps else None, dense if keep_maps else None)
