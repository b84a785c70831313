"""Ray caster of the scene generator: primitive tables (oriented boxes, vertical cylinders) and the nearest-hit
renderer over a 2D ray grid (LiDAR beams x azimuths, camera pixels).

Per primitive group only the rays of its conservative screen block (given by the sensor) are intersected, all of them
at once in numpy; the nearest hit per ray wins (occlusion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ...geometry.boxes import boxes_to_corners_3d


@dataclass
class Prims:
    """Primitive tables. kind 0 = box (cx, cy, cz, l, w, h, yaw), kind 1 = vertical cylinder (cx, cy, z0, z1, r)."""
    kind: List[int] = field(default_factory=list)
    geom: List[Tuple[float, ...]] = field(default_factory=list)
    albedo: List[Tuple[float, float, float]] = field(default_factory=list)
    refl: List[float] = field(default_factory=list)
    obj: List[int] = field(default_factory=list)
    _corners: Optional[np.ndarray] = field(default=None, repr=False)

    def box(self, cx, cy, cz, l, w, h, yaw, albedo, refl, obj=-1):
        self.kind.append(0)
        self.geom.append((cx, cy, cz, l, w, h, yaw))
        self.albedo.append(tuple(albedo))
        self.refl.append(refl)
        self.obj.append(obj)

    def cyl(self, cx, cy, z0, z1, r, albedo, refl, obj=-1):
        self.kind.append(1)
        self.geom.append((cx, cy, z0, z1, r, 0.0, 0.0))
        self.albedo.append(tuple(albedo))
        self.refl.append(refl)
        self.obj.append(obj)

    def bounds(self, i):
        """(cx, cy, footprint radius, z0, z1) of primitive i."""
        g = self.geom[i]
        if self.kind[i] == 0:
            return g[0], g[1], 0.5 * math.hypot(g[3], g[4]), g[2] - g[5] / 2, g[2] + g[5] / 2
        return g[0], g[1], g[4], g[2], g[3]

    def bounding_box(self, i) -> Tuple[float, ...]:
        """LiDAR box (cx, cy, cz, dx, dy, dz, yaw) enclosing primitive i (a box is its own)."""
        cx, cy, R, z0, z1 = self.bounds(i)
        g = self.geom[i]
        if self.kind[i] == 0:
            return tuple(g[:7])
        return (cx, cy, (z0 + z1) / 2, 2 * R, 2 * R, z1 - z0, 0.0)

    def corners(self, ids) -> np.ndarray:
        """(8 len(ids), 3) float64 corners of the bounding boxes of primitives ``ids`` (all primitives' corners are
        computed in one call and cached until a primitive is added)."""
        n = len(self.kind)
        if self._corners is None or self._corners.shape[0] != n:
            boxes = np.array([self.bounding_box(i) for i in range(n)], dtype=np.float64).reshape(-1, 7)
            self._corners = boxes_to_corners_3d(boxes)
        return self._corners[list(ids)].reshape(-1, 3)


# ----------------------------------------------------------------------------------------------- ray casting
def cast_box(o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
    """Rays o + t d (d: (K, 3)) vs an oriented box -> (t (K,) inf where missed, world normal (K, 3))."""
    cx, cy, cz, l, w, h, yaw = g
    c, s = math.cos(yaw), math.sin(yaw)
    ox, oy, oz = o[0] - cx, o[1] - cy, o[2] - cz
    ol = np.array([c * ox + s * oy, -s * ox + c * oy, oz])
    dl = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
    half = np.array([l / 2, w / 2, h / 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        t1 = (-half - ol) * inv
        t2 = (half - ol) * inv
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    axis = np.argmax(tmin, axis=1)
    tn = np.take_along_axis(tmin, axis[:, None], 1)[:, 0]
    tf = tmax.min(axis=1)
    hit = (tn <= tf) & (tn > 1e-4)
    t = np.where(hit, tn, np.inf)
    nl = np.zeros_like(dl)
    sign = -np.sign(np.take_along_axis(dl, axis[:, None], 1)[:, 0])
    nl[np.arange(len(axis)), axis] = sign
    nw = np.stack([c * nl[:, 0] - s * nl[:, 1], s * nl[:, 0] + c * nl[:, 1], nl[:, 2]], axis=1)
    return t, nw


def cast_cyl(o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
    cx, cy, z0, z1, r = g[:5]
    ox, oy = o[0] - cx, o[1] - cy
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (ox * d[:, 0] + oy * d[:, 1])
    cc = ox * ox + oy * oy - r * r
    disc = b * b - 4 * a * cc
    ok = (disc >= 0) & (a > 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.where(ok, disc, 0))) / (2 * np.where(a > 1e-12, a, 1))
    zs = o[2] + ts * d[:, 2]
    side = ok & (ts > 1e-4) & (zs >= z0) & (zs <= z1)
    t = np.where(side, ts, np.inf)
    n = np.zeros_like(d)
    px, py = ox + ts * d[:, 0], oy + ts * d[:, 1]
    n[:, 0], n[:, 1] = px / r, py / r
    for zc, nz in ((z1, 1.0), (z0, -1.0)):
        with np.errstate(divide="ignore", invalid="ignore"):
            tc = (zc - o[2]) / np.where(np.abs(d[:, 2]) < 1e-12, 1e-12, d[:, 2])
        qx, qy = ox + tc * d[:, 0], oy + tc * d[:, 1]
        cap = (tc > 1e-4) & (qx * qx + qy * qy <= r * r) & (tc < t) & (np.sign(d[:, 2]) == -nz)
        t = np.where(cap, tc, t)
        n[cap] = (0.0, 0.0, nz)
    return t, n


def cast(prims: Prims, i: int, o, d):
    return cast_box(o, d, prims.geom[i]) if prims.kind[i] == 0 else cast_cyl(o, d, prims.geom[i])


class Buffers:
    """Nearest-hit buffers over a 2D ray grid."""

    def __init__(self, shape):
        self.t = np.full(shape, np.inf)
        self.prim = np.full(shape, -1, dtype=np.int32)  # -1 ground / nothing
        self.normal = np.zeros(shape + (3,))


def render(prims: Prims, groups: List[List[int]], o: np.ndarray, dirs: np.ndarray, block_fn, buf: Buffers
            ) -> Dict[int, int]:
    """Cast every group (list of primitive ids: one object or one background primitive) on its block; update the
    buffers with the nearest hits; return {group index: number of rays the group hits on its own}."""
    own = {}
    for gi, group in enumerate(groups):
        blk = block_fn(group)
        if blk is None:
            own[gi] = 0
            continue
        rows, cols = blk
        contiguous = rows.size and cols.size and rows[-1] - rows[0] + 1 == rows.size and \
            cols[-1] - cols[0] + 1 == cols.size
        if contiguous:
            idx = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
            d = dirs[idx].reshape(-1, 3)
        else:
            idx = np.ix_(rows, cols)
            d = dirs[rows][:, cols].reshape(-1, 3)
        tg = np.full(d.shape[0], np.inf)
        pg = np.full(d.shape[0], -1, dtype=np.int32)
        ng = np.zeros_like(d)
        for p in group:
            t, n = cast(prims, p, o, d)
            closer = t < tg
            tg = np.where(closer, t, tg)
            pg = np.where(closer, p, pg)
            ng[closer] = n[closer]
        hitm = np.isfinite(tg)
        own[gi] = int(hitm.sum())
        if not own[gi]:
            continue
        shape = (len(rows), len(cols))
        tb = buf.t[idx]
        tg2, pg2, ng2 = tg.reshape(shape), pg.reshape(shape), ng.reshape(shape + (3,))
        closer = tg2 < tb
        if contiguous:
            tb[closer] = tg2[closer]
            buf.prim[idx][closer] = pg2[closer]
            buf.normal[idx][closer] = ng2[closer]
        else:
            buf.t[idx] = np.where(closer, tg2, tb)
            buf.prim[idx] = np.where(closer, pg2, buf.prim[idx])
            nb = buf.normal[idx]
            nb[closer] = ng2[closer]
            buf.normal[idx] = nb
    return own

