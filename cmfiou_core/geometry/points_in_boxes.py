"""Point-in-rotated-box tests (OpenPCDet ``roiaware_pool3d`` ``check_pt_in_box3d`` semantics).

A point is in box (cx, cy, cz, dx, dy, dz, h) when |z - cz| <= dz/2 and, in the box frame (rotated by -h),
-dx/2 < x_local < dx/2 and -dy/2 < y_local < dy/2 (strict in BEV, as the CUDA kernel).
"""
from __future__ import annotations

import torch

_CHUNK_ELEMS = 1 << 24


def points_in_boxes_mask(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, 3+) points, (M, 7+) boxes -> (N, M) bool."""
    n, m = points.shape[0], boxes.shape[0]
    out = torch.zeros((n, m), dtype=torch.bool, device=points.device)
    if n == 0 or m == 0:
        return out
    cosa = torch.cos(-boxes[:, 6])
    sina = torch.sin(-boxes[:, 6])
    rows = max(1, _CHUNK_ELEMS // m)
    for s in range(0, n, rows):
        p = points[s:s + rows, :3]
        sx = p[:, None, 0] - boxes[None, :, 0]
        sy = p[:, None, 1] - boxes[None, :, 1]
        sz = p[:, None, 2] - boxes[None, :, 2]
        lx = sx * cosa[None] - sy * sina[None]
        ly = sx * sina[None] + sy * cosa[None]
        hx, hy = boxes[None, :, 3] / 2, boxes[None, :, 4] / 2
        out[s:s + rows] = (sz.abs() <= boxes[None, :, 5] / 2) & (lx > -hx) & (lx < hx) & (ly > -hy) & (ly < hy)
    return out


def points_in_boxes_cpu(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """OpenPCDet layout: (M, N) int (1 inside)."""
    return points_in_boxes_mask(points, boxes).T.to(torch.int32)


def points_in_boxes_first(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N,) index of the first box containing each point, -1 if none (``points_in_boxes_gpu`` semantics)."""
    mask = points_in_boxes_mask(points, boxes)
    if boxes.shape[0] == 0:
        return torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    any_in = mask.any(dim=1)
    first = mask.to(torch.uint8).argmax(dim=1)
    return torch.where(any_in, first, torch.full_like(first, -1))
