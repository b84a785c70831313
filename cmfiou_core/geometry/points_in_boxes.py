"""Point-in-rotated-box tests (OpenPCDet ``roiaware_pool3d`` ``check_pt_in_box3d`` semantics).

A point is in box (cx, cy, cz, dx, dy, dz, h) when |z - cz| <= dz/2 and, in the box frame (rotated by -h),
-dx/2 < x_local < dx/2 and -dy/2 < y_local < dy/2 (strict in BEV, as the CUDA kernel). :func:`_inside` is the one
definition of this test; both paths of :func:`points_in_boxes_mask` use it:

- torch tensors: dense (N, M) evaluation in chunks, on the input's device and dtype (the model, GPU or CPU);
- numpy arrays (the data path: dataset infos, GT database, augmentation): float64, points sorted by x once and each
  box only tests the points inside its circumscribed x-range (much faster on CPU for a full scan and few boxes).
"""
from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK_ELEMS = 1 << 24


def _inside(sx, sy, sz, cosa, sina, dx, dy, dz):
    """Offsets (sx, sy, sz) of points from a box centre, cos/sin of minus the heading, box sizes -> bool inside.

    Works on numpy arrays/scalars and torch tensors alike (broadcasting).
    """
    lx = sx * cosa - sy * sina
    ly = sx * sina + sy * cosa
    hx, hy = dx / 2, dy / 2
    return (abs(sz) <= dz / 2) & (lx > -hx) & (lx < hx) & (ly > -hy) & (ly < hy)


def _points_in_boxes_mask_np(points: np.ndarray, boxes) -> np.ndarray:
    """numpy path of :func:`points_in_boxes_mask`: float64, x-sorted points, per-box x-range candidates."""
    n, m = points.shape[0], boxes.shape[0]
    out = np.zeros((n, m), dtype=bool)
    if n == 0 or m == 0:
        return out
    x = np.asarray(points[:, 0], dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    b = np.asarray(boxes[:, :7], dtype=np.float64)
    r = 0.5 * np.hypot(b[:, 3], b[:, 4]) + 1e-6  # circumscribed BEV radius (candidate range only)
    lo = np.searchsorted(xs, b[:, 0] - r, "left")
    hi = np.searchsorted(xs, b[:, 0] + r, "right")
    for k in range(m):
        if hi[k] <= lo[k]:
            continue
        idx = order[lo[k]:hi[k]]
        p = np.asarray(points[idx, :3], dtype=np.float64)
        inside = _inside(p[:, 0] - b[k, 0], p[:, 1] - b[k, 1], p[:, 2] - b[k, 2],
                         math.cos(-b[k, 6]), math.sin(-b[k, 6]), b[k, 3], b[k, 4], b[k, 5])
        out[idx[inside], k] = True
    return out


def points_in_boxes_mask(points, boxes):
    """(N, 3+) points, (M, 7+) boxes -> (N, M) bool.

    torch points: a torch bool tensor on the points' device, computed in the inputs' dtype. numpy points: a numpy
    bool array, computed in float64 whatever the input dtype (``boxes`` may then be numpy or a CPU tensor).
    """
    if isinstance(points, np.ndarray):
        return _points_in_boxes_mask_np(points, np.asarray(boxes))
    n, m = points.shape[0], boxes.shape[0]
    out = torch.zeros((n, m), dtype=torch.bool, device=points.device)
    if n == 0 or m == 0:
        return out
    cosa = torch.cos(-boxes[:, 6])
    sina = torch.sin(-boxes[:, 6])
    rows = max(1, _CHUNK_ELEMS // m)
    for s in range(0, n, rows):
        p = points[s:s + rows, :3]
        out[s:s + rows] = _inside(p[:, None, 0] - boxes[None, :, 0], p[:, None, 1] - boxes[None, :, 1],
                                  p[:, None, 2] - boxes[None, :, 2], cosa[None], sina[None],
                                  boxes[None, :, 3], boxes[None, :, 4], boxes[None, :, 5])
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
