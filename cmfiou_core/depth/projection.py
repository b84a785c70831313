"""LiDAR -> image projection, FOV flag and sparse depth maps (torch, device of the inputs, no host syncs)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..calib import Calibration


def calib_matrices(calib: Calibration, device, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(V2R 4x4, P2 3x4) as tensors on ``device``."""
    return (torch.as_tensor(calib.V2R, dtype=dtype, device=device),
            torch.as_tensor(calib.P2, dtype=dtype, device=device))


def project_points(xyz: torch.Tensor, V2R: torch.Tensor, P2: torch.Tensor):
    """(N, 3) LiDAR xyz -> (uv (N, 2) float pixels, rect depth (N,)) with the KITTI semantics of
    ``rect_to_img``: depth = (P2 @ [rect, 1])_z - P2[2, 3] (equal to rect z, since P2's third row is [0, 0, 1, t])."""
    rect = xyz @ V2R[:3, :3].T + V2R[:3, 3]
    hom = rect @ P2[:, :3].T + P2[:, 3]
    uv = hom[:, :2] / hom[:, 2:3]
    return uv, hom[:, 2] - P2[2, 3]


def fov_flag(uv: torch.Tensor, depth: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Official ``get_fov_flag``: 0 <= u < W, 0 <= v < H and rect depth >= 0 (NaN -> False)."""
    hi = _WH.get((width, height, uv.dtype, str(uv.device)))
    if hi is None:  # built on the device with fills: no H2D copy (that would sync the stream)
        hi = torch.empty(2, dtype=uv.dtype, device=uv.device)
        hi[0], hi[1] = width, height
        if len(_WH) > 16:
            _WH.clear()
        _WH[(width, height, uv.dtype, str(uv.device))] = hi
    return ((uv >= 0) & (uv < hi)).all(1) & (depth >= 0)


_WH: dict = {}


def sparse_depth_map(uv: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor, height: int, width: int
                     ) -> torch.Tensor:
    """(H, W) sparse depth, nearest valid point per pixel (scatter-min), 0 = empty.

    Pixel = (floor(v), floor(u)) as in the official ``astype(int32)`` on non-negative coordinates. Invalid points are
    routed to a dummy slot (whatever depth they carry), so no boolean compaction (host sync) is needed.
    """
    hw = height * width
    # truncation = floor for the valid (non-negative) ones; the clamp only keeps the others' casts tame
    uvi = uv.clamp(-1.0, float(max(width, height))).to(torch.int64)
    idx = torch.where(valid, uvi[:, 1] * width + uvi[:, 0], hw)
    # NB: no torch.tensor(..., device=cuda) here: a blocking H2D copy would synchronise the stream
    buf = torch.full((hw + 1,), float("inf"), dtype=depth.dtype, device=depth.device)
    buf.scatter_reduce_(0, idx, depth, reduce="amin", include_self=True)
    buf = buf[:hw]
    return buf.masked_fill_(torch.isinf(buf), 0.0).view(height, width)
