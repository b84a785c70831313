"""Frozen copy of the depth stage as it was before its speed work (commit 0709cb4): the exactness reference for the
optimised code (test/test_depth.py compares both on real KITTI frames and random inputs). Do not optimise this file;
its point is to stay what it was. The functions the speed work did not change (``gaussian5``, ``extend_to_top``,
``raw_rows_from_points``, and the sort-based thinning ``la_sampling2_order_sorted``, which the live code keeps as the
fallback of its sort-free thinning) are imported from the live modules instead of being copied: if one of them is
changed later, freeze its old version here first. Production code never imports this module.

:func:`reference_pseudo_points` is the old generator body (projection -> IP-Basic -> lifting -> sort-based thinning
-> compaction) for end-to-end comparisons.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..calib import Calibration
from .config import DepthConfig, IPBasicConfig
# unchanged by the speed work, so not copied here (a copy would only be compared with itself)
from .ipbasic import extend_to_top, gaussian5
from .pseudo import la_sampling2_order_sorted, raw_rows_from_points


def project_points(xyz: torch.Tensor, V2R: torch.Tensor, P2: torch.Tensor):
    rect = xyz @ V2R[:3, :3].T + V2R[:3, 3]
    hom = rect @ P2[:, :3].T + P2[:, 3]
    uv = hom[:, :2] / hom[:, 2:3]
    return uv, hom[:, 2] - P2[2, 3]


def fov_flag(uv: torch.Tensor, depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    u, v = uv[:, 0], uv[:, 1]
    return (u >= 0) & (u < width) & (v >= 0) & (v < height) & (depth >= 0)


def _pool(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return F.max_pool2d(x, (kh, kw), stride=1, padding=(kh // 2, kw // 2))


def dilate(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """Grey dilation of (B, 1, H, W) with a named structuring element (see module doc)."""
    kind, k = kernel.rstrip("0123456789"), int(kernel[len(kernel.rstrip("0123456789")):])
    if kind == "full":
        return _pool(_pool(x, 1, k), k, 1)
    if kind == "cross":
        return torch.maximum(_pool(x, 1, k), _pool(x, k, 1))
    if kind == "diamond":
        for _ in range((k - 1) // 2):
            x = torch.maximum(_pool(x, 1, 3), _pool(x, 3, 1))
        return x
    raise ValueError(f"unknown kernel {kernel!r}")


def erode(x: torch.Tensor, kernel: str) -> torch.Tensor:
    return -dilate(-x, kernel)


def _shifts(p: torch.Tensor, H: int, W: int, offsets):
    """Views of a 2-padded (B, C, H+4, W+4) tensor shifted by each (dy, dx) offset."""
    return [p[:, :, 2 + dy:2 + dy + H, 2 + dx:2 + dx + W] for dy, dx in offsets]


_OFF25 = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
_DISK2 = [(dy, dx) for dy, dx in _OFF25 if dy * dy + dx * dx <= 4]  # OpenCV bilateral d=5: radius-2 disk, 13 taps


def median5(x: torch.Tensor) -> torch.Tensor:
    """5x5 median, replicate border (cv2.medianBlur)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (2, 2, 2, 2), mode="replicate")
    return torch.stack(_shifts(p, H, W, _OFF25), -1).median(dim=-1).values


def bilateral5(x: torch.Tensor, sigma_color: float = 1.5, sigma_space: float = 2.0) -> torch.Tensor:
    """cv2.bilateralFilter(x, 5, sigma_color, sigma_space) for float images: disk of radius 2 (13 taps),
    reflect-101 border, weights exp(-r^2 / 2 s_s^2) * exp(-dI^2 / 2 s_c^2)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (2, 2, 2, 2), mode="reflect")
    num = torch.zeros_like(x)
    den = torch.zeros_like(x)
    ic = -0.5 / (sigma_color * sigma_color)
    for (dy, dx), nb in zip(_DISK2, _shifts(p, H, W, _DISK2)):
        w = math.exp(-(dy * dy + dx * dx) / (2 * sigma_space * sigma_space)) * torch.exp((nb - x) ** 2 * ic)
        num = num + w * nb
        den = den + w
    return num / den


def ipbasic_complete(depth: torch.Tensor, cfg: IPBasicConfig = IPBasicConfig()) -> torch.Tensor:
    """Dense depth from a sparse (H, W) or (B, 1, H, W) depth map (0 = empty); same shape, device and dtype."""
    shape = depth.shape
    x = depth.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float32)
    md = float(cfg.max_depth)
    x = torch.where(x > 0.1, md - x, torch.zeros_like(x))          # invert (far -> small, so max favours near)
    x = dilate(x, cfg.dilation_kernel)                              # shaped dilation
    x = erode(dilate(x, "full5"), "full5")                          # hole closing
    x = torch.where(x < 0.1, dilate(x, "full7"), x)                 # fill empty with 7x7 dilation
    if cfg.extrapolate:
        x = extend_to_top(x)
        x = torch.where(x < 0.1, dilate(x, "full31"), x)            # large fill
    x = median5(x)
    if cfg.blur == "bilateral":
        x = bilateral5(x, 1.5, 2.0)
    elif cfg.blur == "gaussian":
        x = torch.where(x > 0.1, gaussian5(x), x)
    # re-invert; values <= 0.1 are 'empty' (IP-Basic leaves them as tiny depths; we zero them so they never lift)
    x = torch.where(x > 0.1, md - x, torch.zeros_like(x))
    return x.to(depth.dtype).reshape(shape)


def sparse_depth_map(uv: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, height: int, width: int
                     ) -> torch.Tensor:
    """(H, W) sparse depth, nearest valid point per pixel (scatter-min), 0 = empty.

    Pixel = (floor(v), floor(u)) as in the official ``astype(int32)`` on non-negative coordinates. Invalid points are
    routed to a dummy slot, so no boolean compaction (host sync) is needed.
    """
    hw = height * width
    ui = uv[:, 0].clamp(0, width - 1).to(torch.int64)  # floor for the valid (non-negative) ones
    vi = uv[:, 1].clamp(0, height - 1).to(torch.int64)
    idx = torch.where(valid, vi * width + ui, torch.full_like(ui, hw))
    # NB: no torch.tensor(..., device=cuda) here: a blocking H2D copy would synchronise the stream
    buf = torch.full((hw + 1,), float("inf"), dtype=depth.dtype, device=depth.device)
    buf.scatter_reduce_(0, idx, depth.masked_fill(~valid, float("inf")), reduce="amin", include_self=True)
    buf = buf[:hw]
    return buf.masked_fill(torch.isinf(buf), 0.0).view(height, width)


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


def _compact_order(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices with the True entries first in their original order, count) without a host sync."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices, mask.sum()


def reference_pseudo_points(points: torch.Tensor, image: torch.Tensor, calib: Calibration,
                            cfg: DepthConfig = DepthConfig()) -> Tuple[torch.Tensor, torch.Tensor]:
    """The old ``PseudoPointGenerator.__call__`` for method ipbasic (its GPU branch: thinning on the full masked pixel
    grid; the old CPU branch gave identical rows, as an old test asserted): returns (raw_rows, pseudo_rows)."""
    dev = points.device
    if cfg.crop_official:
        ch, cw = DepthConfig.OFFICIAL_CROP
        image = image[:ch, :cw]
    H, W = int(image.shape[0]), int(image.shape[1])
    V2R, P2, R2V = (torch.as_tensor(a, dtype=torch.float32, device=dev) for a in (calib.V2R, calib.P2, calib.R2V))
    pts = points[:, :4].to(torch.float32)
    uv, d = project_points(pts[:, :3], V2R, P2)
    fov = fov_flag(uv, d, H, W)
    sparse = sparse_depth_map(uv, d, fov, H, W)
    dense = ipbasic_complete(sparse, cfg.ipbasic)
    rows, valid = lift_depth(dense, image, calib, cfg.min_depth, R2V)
    valid = valid & (rows[:, 2] < cfg.max_z)
    if cfg.thinning.enabled:
        order, n_ps = la_sampling2_order_sorted(rows[:, :3], valid, cfg.thinning)
    else:
        order, n_ps = _compact_order(valid)
    raw_mask = fov if cfg.fov_filter_raw else torch.ones_like(fov)
    raw_order, n_raw = _compact_order(raw_mask)
    return raw_rows_from_points(pts[raw_order[: int(n_raw)]]), rows[order[: int(n_ps)]]
