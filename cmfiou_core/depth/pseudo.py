"""Pseudo points from camera + LiDAR, following the official CMF-IOU/VirConv ``velodyne_depth`` generation (spec 2.1):

FOV filter (``get_fov_flag``) -> sparse depth (nearest point per pixel) -> completion (IP-Basic or PENet) -> lift
pixels with depth >= 0.01 to rect -> LiDAR, attach RGB/3 and flag 1 -> drop LiDAR z >= 1.0 -> ``la_sampling2``
angular thinning -> merge with raw rows ``[x, y, z, 10 i, 0, 0, 0, 2]``.

Everything runs on the device of the inputs with fixed-size tensors and masks; the only host synchronisation is the
final compaction (one ``tolist`` of the two output counts), which also serves the CUDA-event timings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..calib import Calibration, CalibrationError
from ..config import ConfigError
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


def lift_depth(depth: torch.Tensor, image: torch.Tensor, calib: Calibration, min_depth: float = 0.01,
               R2V: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every pixel (u = column, v = row, d) -> LiDAR point with colour: ((H*W, 8) rows in row-major pixel order,
    (H*W,) valid = d >= min_depth). Uses ``Calibration.img_to_rect`` then ``rect_to_lidar`` semantics."""
    H, W = depth.shape
    dev = depth.device
    v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32),
                          torch.arange(W, device=dev, dtype=torch.float32), indexing="ij")
    d = depth.reshape(-1).to(torch.float32)
    rect = calib.img_to_rect(u.reshape(-1), v.reshape(-1), d)
    if R2V is None:
        R2V = torch.as_tensor(calib.R2V, dtype=torch.float32, device=dev)
    xyz = rect @ R2V[:3, :3].T + R2V[:3, 3]
    rows = torch.empty(H * W, 8, dtype=torch.float32, device=dev)
    rows[:, :3] = xyz
    rows[:, 3] = 0.0
    rows[:, 4:7] = image.reshape(-1, 3).to(torch.float32) / 3.0
    rows[:, 7] = 1.0
    valid = (d >= min_depth) & (d > 0)
    return rows, valid


def la_sampling2_order(xyz: torch.Tensor, valid: torch.Tensor, cfg: ThinningConfig = ThinningConfig()
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
    start = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), 0).values
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


def _compact_order(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices with the True entries first in their original order, count) without a host sync."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices, mask.sum()



# ----------------------------------------------------------------------------------------------- the generator
class PseudoPointGenerator:
    """``gen(points (N, 4), image (H, W, 3) uint8, calib) -> PseudoResult`` on the device of the inputs.

    ``penet_model``: an already built/loaded :class:`cmfiou_core.depth.penet.PENet` (tests, training); otherwise
    ``method: penet`` loads ``cfg.penet.checkpoint`` (weights_only) and refuses to run without one.
    """

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
        self._mat_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _mats(self, calib: Calibration, device):
        key = (calib.P2.tobytes(), calib.R0_rect.tobytes(), calib.Tr_velo_to_cam.tobytes(), str(device))
        m = self._mat_cache.get(key)
        if m is None:
            if len(self._mat_cache) > 16:
                self._mat_cache.clear()
            m = tuple(torch.as_tensor(a, dtype=torch.float32, device=device) for a in (calib.V2R, calib.P2, calib.R2V))
            self._mat_cache[key] = m
        return m

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

        # 3. lifting + z filter
        rows, valid = lift_depth(dense, image, calib, cfg.min_depth, R2V)
        valid = valid & (rows[:, 2] < cfg.max_z)
        timer.mark("lifting")

        # 4. thinning + compaction (the single host sync)
        if cfg.thinning.enabled and dev.type == "cpu":
            # on CPU a compaction costs no device sync: thin only the valid pixels (same result, smaller sorts)
            sub = torch.nonzero(valid).squeeze(1)
            order, n_ps = la_sampling2_order(rows[sub, :3], torch.ones_like(sub, dtype=torch.bool), cfg.thinning)
            order = sub[order]
        elif cfg.thinning.enabled:
            order, n_ps = la_sampling2_order(rows[:, :3], valid, cfg.thinning)
        else:
            order, n_ps = _compact_order(valid)
        raw_mask = fov if cfg.fov_filter_raw else torch.ones_like(fov)
        raw_order, n_raw = _compact_order(raw_mask)
        n_raw_i, n_ps_i = torch.stack([n_raw, n_ps]).tolist()
        pseudo_rows = rows[order[:n_ps_i]]
        raw_rows = raw_rows_from_points(pts[raw_order[:n_raw_i]])
        timer.mark("thinning")
        return PseudoResult(raw_rows, pseudo_rows, timer.result(),
                            sparse if keep_maps else None, dense if keep_maps else None)
