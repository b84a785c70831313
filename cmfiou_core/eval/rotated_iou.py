"""Float64, vectorised rotated-rectangle intersection for the KITTI evaluator (numpy, no loops over boxes).

Written here (not in ``geometry/iou.py``) because the evaluator wants float64 numpy on paired boxes, independent of
torch. Boxes are ``(cx, cy, l, w, angle)`` in the KITTI evaluation convention (camera BEV: cx = x, cy = z, l along
the rotated x axis, w along the rotated y axis) with the corner rotation of the reference ``rbbox_to_corners``:
``x' = cos(a) x + sin(a) y``, ``y' = -sin(a) x + cos(a) y``.

Algorithm: Sutherland-Hodgman clipping of box A (convex quad) by the 4 edges of box B, batched over pairs with a
fixed vertex capacity, then the shoelace area. Exact up to float64 rounding. (The OpenPCDet/mmdet3d references
compute this in float32 on the GPU; values can differ from theirs by ~1e-7, which only matters for an IoU within
that distance of a threshold.)

Not replaced by ``geometry.iou.bev_intersection_aligned`` in float64 although the APs are identical (3769-frame
synthetic evaluation: IoUs differ by <= 5.5e-13, the torch one being closer to a 40-digit reference), because its
speed depends on torch's intra-op threads: measured on the 38k pairs of that evaluation on a loaded 2-core machine,
torch took 0.12 s with 1 thread but 1.5-2.2 s with 2 (the default) vs 0.17-0.19 s here, and the whole evaluation
2.1 s with 1 thread but 5.3 s with 2 vs 2.3-3.0 s with this module, i.e. more than 2x slower in the default setting.
"""
from __future__ import annotations

import numpy as np

_CAP = 12  # vertex capacity (the exact intersection of two convex quads has at most 8 vertices)


def box_corners_bev(boxes: np.ndarray) -> np.ndarray:
    """(N, 5) -> (N, 4, 2) corners, counter-clockwise."""
    b = np.asarray(boxes, np.float64)
    hl, hw = b[:, 2] / 2, b[:, 3] / 2
    lx = np.stack([-hl, hl, hl, -hl], 1)
    ly = np.stack([-hw, -hw, hw, hw], 1)
    c, s = np.cos(b[:, 4])[:, None], np.sin(b[:, 4])[:, None]
    x = c * lx + s * ly + b[:, 0:1]
    y = -s * lx + c * ly + b[:, 1:2]
    return np.stack([x, y], -1)


def _cross(ax, ay, bx, by):
    return ax * by - ay * bx


def polygon_area(poly: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Shoelace area of (P, C, 2) polygons with ``n`` valid leading vertices (rest ignored)."""
    P, C, _ = poly.shape
    if P == 0:
        return np.zeros((0,))
    idx = np.arange(C)[None, :]
    valid = idx < n[:, None]
    first = poly[:, :1, :]
    p = np.where(valid[..., None], poly, first)  # pad with the first vertex: closing edges contribute 0
    q = np.roll(p, -1, axis=1)
    return 0.5 * np.abs(np.sum(p[..., 0] * q[..., 1] - q[..., 0] * p[..., 1], axis=1))


def rotated_intersection(a: np.ndarray, b: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """Intersection areas of paired boxes: a (P, 5), b (P, 5) -> (P,)."""
    a = np.asarray(a, np.float64).reshape(-1, 5)
    b = np.asarray(b, np.float64).reshape(-1, 5)
    if len(a) > chunk:
        return np.concatenate([rotated_intersection(a[i:i + chunk], b[i:i + chunk], chunk)
                               for i in range(0, len(a), chunk)])
    P = len(a)
    if P == 0:
        return np.zeros((0,))
    poly = np.zeros((P, _CAP, 2))
    poly[:, :4] = box_corners_bev(a)
    n = np.full(P, 4, np.int64)
    clip = box_corners_bev(b)
    ar = np.arange(_CAP)[None, :]
    rows = np.arange(P)[:, None]
    for e in range(4):
        ea, eb = clip[:, e], clip[:, (e + 1) % 4]
        ex, ey = (eb - ea)[:, 0:1], (eb - ea)[:, 1:2]
        d = _cross(ex, ey, poly[..., 0] - ea[:, 0:1], poly[..., 1] - ea[:, 1:2])  # >= 0: inside (left of edge)
        valid = ar < n[:, None]
        nxt = (ar + 1) % np.maximum(n, 1)[:, None]
        dn = d[rows, nxt]
        pn = poly[rows, nxt]
        ins, insn = d >= 0, dn >= 0
        emit_cur = valid & ins
        emit_int = valid & (ins != insn)
        denom = np.where(emit_int, d - dn, 1.0)
        t = np.where(emit_int, d / denom, 0.0)
        inter = poly + t[..., None] * (pn - poly)
        cand = np.stack([poly, inter], axis=2).reshape(P, 2 * _CAP, 2)
        mask = np.stack([emit_cur, emit_int], axis=2).reshape(P, 2 * _CAP)
        order = np.argsort(~mask, axis=1, kind="stable")[:, :_CAP]
        poly = cand[rows, order]
        n = np.minimum(mask.sum(1), _CAP)
    area = polygon_area(poly, n)
    area[n < 3] = 0.0
    return area


def rotated_iou_paired(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """BEV IoU of paired boxes (criterion -1: intersection / union)."""
    inter = rotated_intersection(a, b)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def iou3d_camera_paired(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3D IoU of paired KITTI camera boxes ``[x, y, z, l, h, w, ry]`` (y down, location = bottom centre, so a box
    spans [y - h, y]): BEV (x, z, l, w, ry) intersection x vertical overlap / (V1 + V2 - intersection)."""
    a = np.asarray(a, np.float64).reshape(-1, 7)
    b = np.asarray(b, np.float64).reshape(-1, 7)
    inter_bev = rotated_intersection(a[:, [0, 2, 3, 5, 6]], b[:, [0, 2, 3, 5, 6]])
    iw = np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 1] - a[:, 4], b[:, 1] - b[:, 4])
    inter = inter_bev * np.maximum(iw, 0.0)
    union = a[:, 3] * a[:, 4] * a[:, 5] + b[:, 3] * b[:, 4] * b[:, 5] - inter
    ok = (inter > 0) & (union > 0)
    return np.where(ok, inter / np.where(ok, union, 1.0), 0.0)
