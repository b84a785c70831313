"""Box IoUs in pure torch (any device): exact rotated BEV IoU, 3D IoU, axis-aligned (nearest-BEV) IoU.

Rotated BEV intersection: the intersection of two convex rectangles is the convex polygon whose vertices are the
corners of A inside B, the corners of B inside A and the edge/edge crossing points (at most 4 + 4 + 16 = 24
candidates). Candidates are masked, sorted by angle about their centroid and the shoelace formula gives the exact
area (invalid slots repeat the first vertex and contribute nothing). Coordinates are taken relative to the pair's
mid-point so float32 keeps precision far from the origin. Semantics = OpenPCDet ``iou3d_nms``:

    IoU_bev = A_inter / max(dx_a dy_a + dx_b dy_b - A_inter, 1e-8)
    IoU_3d  = A_inter * h_overlap / max(V_a + V_b - A_inter * h_overlap, 1e-6)

Pairwise variants only evaluate pairs whose circumscribed circles overlap, in chunks (memory stays bounded).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..device_const import device_const
from ..opcount import cuda_path
from .boxes import limit_period

_CHUNK = 32768
# on CUDA a chunk's ~140 kernels are launch-bound at 32k pairs (the 2000-box proposal NMS evaluates ~1.4M pairs:
# 11.7k launches); 128k pairs per chunk peaks at ~0.7 GB. Every pair is computed independently of the chunking
# (elementwise ops and per-row reductions of fixed length), so results do not depend on it.
_CHUNK_CUDA = 1 << 17


def _corner_signs(dtype, device):
    """(4,) x and y corner signs (CCW from (+, +)), built once per dtype/device (no host->device copy per call)."""
    return (device_const((1.0, -1.0, -1.0, 1.0), dtype, device), device_const((1.0, 1.0, -1.0, -1.0), dtype, device))


def _rect_corners_rel(boxes: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """(P, 7) boxes -> (P, 4, 2) CCW corners relative to ``origin`` (P, 2)."""
    cosa, sina = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
    hx, hy = boxes[:, 3] / 2, boxes[:, 4] / 2
    sx, sy = _corner_signs(boxes.dtype, boxes.device)
    lx, ly = hx[:, None] * sx, hy[:, None] * sy
    cx = boxes[:, 0] - origin[:, 0]
    cy = boxes[:, 1] - origin[:, 1]
    x = lx * cosa[:, None] - ly * sina[:, None] + cx[:, None]
    y = lx * sina[:, None] + ly * cosa[:, None] + cy[:, None]
    return torch.stack([x, y], dim=-1)


def _cross(ax, ay, bx, by):
    return ax * by - ay * bx


def _rel_eps(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 2e-6


def _inside(pts: torch.Tensor, poly: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """pts (P, K, 2), poly (P, 4, 2) CCW -> (P, K): signed distance to every edge >= -eps (P,) (inside/boundary)."""
    e0 = poly                                  # (P, 4, 2)
    e1 = torch.roll(poly, -1, dims=1)
    ex = (e1[..., 0] - e0[..., 0])[:, None, :]  # (P, 1, 4)
    ey = (e1[..., 1] - e0[..., 1])[:, None, :]
    ln = torch.sqrt(ex * ex + ey * ey)
    px = pts[..., 0:1] - e0[..., 0][:, None, :]  # (P, K, 4)
    py = pts[..., 1:2] - e0[..., 1][:, None, :]
    c = _cross(ex, ey, px, py)
    return (c >= -eps[:, None, None] * ln).all(dim=-1)


def _intersection_area_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, 7) x (P, 7) -> (P,) rotated BEV intersection areas (no chunking)."""
    if a.shape[0] == 0:
        return a.new_zeros(0)
    rel = _rel_eps(a.dtype)
    origin = (a[:, 0:2] + b[:, 0:2]) / 2
    ca = _rect_corners_rel(a, origin)
    cb = _rect_corners_rel(b, origin)
    mag = torch.cat([ca.abs().flatten(1), cb.abs().flatten(1)], dim=1).amax(dim=1)
    eps_d = (mag * rel).clamp_min(1e-30)  # absolute distance tolerance per pair
    in_a = _inside(ca, cb, eps_d)  # corners of A inside B
    in_b = _inside(cb, ca, eps_d)
    # edge/edge intersections: edge i of A (p, p + r), edge j of B (q, q + s)
    p = ca[:, :, None, :]                                   # (P, 4, 1, 2)
    r = (torch.roll(ca, -1, dims=1) - ca)[:, :, None, :]
    q = cb[:, None, :, :]                                   # (P, 1, 4, 2)
    s = (torch.roll(cb, -1, dims=1) - cb)[:, None, :, :]
    rl = torch.sqrt(r[..., 0] ** 2 + r[..., 1] ** 2)
    sl = torch.sqrt(s[..., 0] ** 2 + s[..., 1] ** 2)
    denom = _cross(r[..., 0], r[..., 1], s[..., 0], s[..., 1])  # (P, 4, 4)
    qpx, qpy = q[..., 0] - p[..., 0], q[..., 1] - p[..., 1]
    ok_den = denom.abs() > rel * rl * sl
    safe = torch.where(ok_den, denom, torch.ones_like(denom))
    t = _cross(qpx, qpy, s[..., 0], s[..., 1]) / safe
    u = _cross(qpx, qpy, r[..., 0], r[..., 1]) / safe
    e = eps_d[:, None, None]
    tt, tu = e / rl.clamp_min(1e-30), e / sl.clamp_min(1e-30)
    ok = ok_den & (t >= -tt) & (t <= 1 + tt) & (u >= -tu) & (u <= 1 + tu)
    ix = p[..., 0] + t * r[..., 0]
    iy = p[..., 1] + t * r[..., 1]
    inter_pts = torch.stack([ix, iy], dim=-1).reshape(-1, 16, 2)
    pts = torch.cat([ca, cb, inter_pts], dim=1)            # (P, 24, 2)
    valid = torch.cat([in_a, in_b, ok.reshape(-1, 16)], dim=1)
    n = valid.sum(dim=1)
    w = valid.to(pts.dtype)
    cen = (pts * w[..., None]).sum(dim=1) / n.clamp_min(1)[:, None].to(pts.dtype)
    ang = torch.atan2(pts[..., 1] - cen[:, None, 1], pts[..., 0] - cen[:, None, 0])
    ang = torch.where(valid, ang, torch.full_like(ang, 10.0))
    order = torch.argsort(ang, dim=1)
    sp = torch.gather(pts, 1, order[..., None].expand(-1, -1, 2))
    sv = torch.gather(valid, 1, order)
    sp = torch.where(sv[..., None], sp, sp[:, 0:1, :].expand_as(sp))
    nxt = torch.roll(sp, -1, dims=1)
    area = 0.5 * _cross(sp[..., 0], sp[..., 1], nxt[..., 0], nxt[..., 1]).sum(dim=1)
    area = area.abs()
    # never exceed the smaller rectangle (guards tolerance effects on degenerate boxes)
    area = torch.minimum(area, torch.minimum(a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]))
    area = torch.where(n >= 3, area, torch.zeros_like(area))
    return area


def bev_intersection_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, 7+) x (P, 7+) -> (P,) rotated BEV intersection area of a[i] and b[i] (chunked)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"aligned IoU needs equal box counts, got {tuple(a.shape)} and {tuple(b.shape)}")
    ch = _CHUNK_CUDA if cuda_path(a) else _CHUNK
    if a.shape[0] <= ch:
        return _intersection_area_aligned(a[:, :7], b[:, :7])
    out = [_intersection_area_aligned(a[i:i + ch, :7], b[i:i + ch, :7]) for i in range(0, a.shape[0], ch)]
    return torch.cat(out) if out else a.new_zeros(0)


def boxes_iou_bev_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, 7+) x (P, 7+) -> (P,) rotated BEV IoU of a[i] with b[i]."""
    inter = bev_intersection_aligned(a, b)
    union = a[:, 3] * a[:, 4] + b[:, 3] * b[:, 4] - inter
    return inter / union.clamp_min(1e-8)


def _h_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top = torch.minimum(a[..., 2] + a[..., 5] / 2, b[..., 2] + b[..., 5] / 2)
    bot = torch.maximum(a[..., 2] - a[..., 5] / 2, b[..., 2] - b[..., 5] / 2)
    return (top - bot).clamp_min(0)


def boxes_iou3d_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, 7+) x (P, 7+) -> (P,) 3D IoU of a[i] with b[i]."""
    inter = bev_intersection_aligned(a, b) * _h_overlap(a, b)
    va = a[:, 3] * a[:, 4] * a[:, 5]
    vb = b[:, 3] * b[:, 4] * b[:, 5]
    return inter / (va + vb - inter).clamp_min(1e-6)


def _candidate_pairs(a: torch.Tensor, b: torch.Tensor, upper_only: bool = False):
    """Index pairs (i, j) whose circumscribed BEV circles overlap (others have zero intersection)."""
    ra = torch.sqrt(a[:, 3] ** 2 + a[:, 4] ** 2) / 2
    rb = torch.sqrt(b[:, 3] ** 2 + b[:, 4] ** 2) / 2
    ii, jj = [], []
    rows = max(1, (1 << 22) // max(1, b.shape[0]))
    for s in range(0, a.shape[0], rows):
        d2 = (a[s:s + rows, None, 0] - b[None, :, 0]) ** 2 + (a[s:s + rows, None, 1] - b[None, :, 1]) ** 2
        rr = ra[s:s + rows, None] + rb[None, :]
        m = d2 <= (rr * (1 + 1e-6) + 1e-6) ** 2
        if upper_only:
            m &= torch.arange(s, s + m.shape[0], device=a.device)[:, None] < torch.arange(b.shape[0], device=a.device)[None]
        i, j = m.nonzero(as_tuple=True)
        ii.append(i + s)
        jj.append(j)
    if not ii:
        e = torch.zeros(0, dtype=torch.long, device=a.device)
        return e, e
    return torch.cat(ii), torch.cat(jj)


def bev_intersection_pairwise(a: torch.Tensor, b: torch.Tensor, upper_only: bool = False) -> torch.Tensor:
    """(N, 7+) x (M, 7+) -> (N, M) rotated BEV intersection areas."""
    out = a.new_zeros((a.shape[0], b.shape[0]))
    if a.shape[0] == 0 or b.shape[0] == 0:
        return out
    i, j = _candidate_pairs(a, b, upper_only)
    if i.numel():
        out[i, j] = bev_intersection_aligned(a[i, :7], b[j, :7])
    return out


def boxes_iou_bev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 7+) x (M, 7+) -> (N, M) rotated BEV IoU (OpenPCDet ``boxes_iou_bev``)."""
    inter = bev_intersection_pairwise(a, b)
    union = (a[:, 3] * a[:, 4])[:, None] + (b[:, 3] * b[:, 4])[None, :] - inter
    return inter / union.clamp_min(1e-8)


def boxes_iou3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 7+) x (M, 7+) -> (N, M) 3D IoU (OpenPCDet ``boxes_iou3d_gpu``)."""
    inter = bev_intersection_pairwise(a, b) * _h_overlap(a[:, None, :], b[None, :, :])
    va = (a[:, 3] * a[:, 4] * a[:, 5])[:, None]
    vb = (b[:, 3] * b[:, 4] * b[:, 5])[None, :]
    return inter / (va + vb - inter).clamp_min(1e-6)


def boxes3d_nearest_bev_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 7+) -> (N, 4) axis-aligned BEV boxes ``[x1, y1, x2, y2]``: sizes swapped when |heading| (mod pi) >= pi/4."""
    rot = limit_period(boxes[:, 6], offset=0.5, period=math.pi).abs()
    dims = torch.where((rot < math.pi / 4)[:, None], boxes[:, [3, 4]], boxes[:, [4, 3]])
    xy = boxes[:, 0:2]
    return torch.cat([xy - dims / 2, xy + dims / 2], dim=1)


def boxes_iou_normal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) axis-aligned ``[x1, y1, x2, y2]`` -> (N, M) IoU (union clamped at 1e-6, OpenPCDet)."""
    x_min = torch.maximum(a[:, None, 0], b[None, :, 0])
    x_max = torch.minimum(a[:, None, 2], b[None, :, 2])
    y_min = torch.maximum(a[:, None, 1], b[None, :, 1])
    y_max = torch.minimum(a[:, None, 3], b[None, :, 3])
    inter = (x_max - x_min).clamp_min(0) * (y_max - y_min).clamp_min(0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-6)


def boxes3d_nearest_bev_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 7+) x (M, 7+) -> (N, M) IoU of the nearest axis-aligned BEV boxes (anchor target assignment)."""
    return boxes_iou_normal(boxes3d_nearest_bev_corners(a), boxes3d_nearest_bev_corners(b))


def iou_matrix(a: torch.Tensor, b: torch.Tensor, kind: str = "3d", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dispatch helper: kind in {'3d', 'bev', 'nearest_bev'}; optional computation dtype (result in a's dtype)."""
    fn = {"3d": boxes_iou3d, "bev": boxes_iou_bev, "nearest_bev": boxes3d_nearest_bev_iou}.get(kind)
    if fn is None:
        raise ValueError(f"iou_matrix: unknown kind {kind!r}")
    if dtype is not None:
        return fn(a.to(dtype), b.to(dtype)).to(a.dtype)
    return fn(a, b)
