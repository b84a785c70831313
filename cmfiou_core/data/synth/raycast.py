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
    """Primitive tables. kind 0 = box (cx, cy, cz, l, w, h, yaw), kind 1 = vertical cylinder (cx, cy, z0, z1, r);
    posed kinds (``R`` local -> world rotation, ``c`` centre): 2 = box cut by extra half-spaces (R, c, half extents,
    planes (P, 4) as n.x <= d in the local frame), 3 = cylinder along the local z axis (R, c, half length, radius),
    4 = ellipsoid (R, c, radii). ``mat`` is a material code the sensor models read (0 = opaque)."""
    kind: List[int] = field(default_factory=list)
    geom: List[Tuple[float, ...]] = field(default_factory=list)
    albedo: List[Tuple[float, float, float]] = field(default_factory=list)
    refl: List[float] = field(default_factory=list)
    obj: List[int] = field(default_factory=list)
    mat: List[int] = field(default_factory=list)
    _aabb: dict = field(default_factory=dict, repr=False)
    _corners: Optional[np.ndarray] = field(default=None, repr=False)

    def box(self, cx, cy, cz, l, w, h, yaw, albedo, refl, obj=-1):
        self.kind.append(0)
        self.geom.append((cx, cy, cz, l, w, h, yaw))
        self.albedo.append(tuple(albedo))
        self.refl.append(refl)
        self.obj.append(obj)
        self.mat.append(0)

    def cyl(self, cx, cy, z0, z1, r, albedo, refl, obj=-1):
        self.kind.append(1)
        self.geom.append((cx, cy, z0, z1, r, 0.0, 0.0))
        self.albedo.append(tuple(albedo))
        self.refl.append(refl)
        self.obj.append(obj)
        self.mat.append(0)

    def posed(self, kind: int, R: np.ndarray, c: np.ndarray, ext: np.ndarray, albedo, refl, obj=-1, mat=0,
              planes: Optional[np.ndarray] = None, extra=0.0) -> int:
        """Add a posed primitive (kind 2, 3 or 4) whose local extent is the box +-``ext`` (half extents); returns its
        id. ``extra`` is the cylinder's half length (kind 3 uses ext = (r, r, half length))."""
        R = np.asarray(R, dtype=np.float64)
        c = np.asarray(c, dtype=np.float64)
        ext = np.asarray(ext, dtype=np.float64)
        self.kind.append(int(kind))
        if planes is not None:  # unit normals (the cast returns them as surface normals)
            planes = np.asarray(planes, dtype=np.float64)
            planes = planes / np.linalg.norm(planes[:, :3], axis=1, keepdims=True)
        self.geom.append((R, c, ext, planes))
        self.albedo.append(tuple(float(a) for a in albedo))
        self.refl.append(float(refl))
        self.obj.append(int(obj))
        self.mat.append(int(mat))
        half = np.abs(R) @ ext  # world AABB half extents of the rotated local box
        self._aabb[len(self.kind) - 1] = (c, half)
        return len(self.kind) - 1

    def bounds(self, i):
        """(cx, cy, footprint radius, z0, z1) of primitive i."""
        g = self.geom[i]
        if self.kind[i] == 0:
            return g[0], g[1], 0.5 * math.hypot(g[3], g[4]), g[2] - g[5] / 2, g[2] + g[5] / 2
        if self.kind[i] >= 2:
            c, half = self._aabb[i]
            return float(c[0]), float(c[1]), float(math.hypot(half[0], half[1])), float(c[2] - half[2]), \
                float(c[2] + half[2])
        return g[0], g[1], g[4], g[2], g[3]

    def bounding_box(self, i) -> Tuple[float, ...]:
        """LiDAR box (cx, cy, cz, dx, dy, dz, yaw) enclosing primitive i (a box is its own)."""
        cx, cy, R, z0, z1 = self.bounds(i)
        g = self.geom[i]
        if self.kind[i] == 0:
            return tuple(g[:7])
        if self.kind[i] >= 2:
            c, half = self._aabb[i]
            return (float(c[0]), float(c[1]), float(c[2]), 2 * float(half[0]), 2 * float(half[1]), 2 * float(half[2]),
                    0.0)
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


_UNIT_FACES = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def cast_cutbox(o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
    """Rays vs a convex polytope: the local box +-ext (slabs) cut by half-spaces n.x <= off."""
    R, c, ext, planes = g
    ol = R.T @ (o - c)
    dl = d @ R
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        t1 = (-ext - ol) * inv
        t2 = (ext - ol) * inv
    tmin = np.minimum(t1, t2)
    axis = np.argmax(tmin, axis=1)
    tn = np.take_along_axis(tmin, axis[:, None], 1)[:, 0]
    tf = np.maximum(t1, t2).min(axis=1)
    nl = np.zeros_like(dl)
    rows = np.arange(len(axis))
    nl[rows, axis] = -np.sign(dl[rows, axis])
    if planes is not None and len(planes):
        N, off = planes[:, :3], planes[:, 3]
        denom = dl @ N.T  # (K, P)
        num = off - N @ ol  # (P,)
        with np.errstate(divide="ignore", invalid="ignore"):
            tt = num[None, :] / denom
        enter = denom < -1e-12
        leave = denom > 1e-12
        miss = (~enter & ~leave & (num[None, :] < 0)).any(1)
        te = np.where(enter, tt, -np.inf)
        pf = np.argmax(te, axis=1)
        tpe = te[rows, pf]
        better = tpe > tn
        tn = np.where(better, tpe, tn)
        nl[better] = N[pf[better]]
        tf = np.minimum(tf, np.where(leave, tt, np.inf).min(1))
        tf = np.where(miss, -np.inf, tf)
    hit = (tn <= tf) & (tn > 1e-4)
    t = np.where(hit, tn, np.inf)
    return t, nl @ R.T  # unit: slab and (normalised) plane normals, rotated


def cast_ocyl(o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
    """Rays vs a capped cylinder along the local z axis (radius ext[0], half length ext[2])."""
    R, c, ext, _ = g
    ol = R.T @ (o - c)
    dl = d @ R
    t, n = cast_cyl(ol, dl, (0.0, 0.0, -ext[2], ext[2], ext[0]))
    return t, n @ R.T


def cast_ellipsoid(o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
    """Rays vs an ellipsoid with local semi-axes ext (scaled to the unit sphere; t is unchanged by the scaling)."""
    R, c, ext, _ = g
    ol = (R.T @ (o - c)) / ext
    dl = (d @ R) / ext
    a = np.einsum("ij,ij->i", dl, dl)
    b = 2.0 * (dl @ ol)
    cc = float(ol @ ol) - 1.0
    disc = b * b - 4 * a * cc
    ok = disc >= 0
    t = (-b - np.sqrt(np.where(ok, disc, 0.0))) / (2 * a)
    hit = ok & (t > 1e-4)
    t = np.where(hit, t, np.inf)
    p = ol[None, :] + np.where(hit, t, 0.0)[:, None] * dl
    n = (p / ext) @ R.T
    n /= np.maximum(np.sqrt(np.einsum("ij,ij->i", n, n)), 1e-12)[:, None]
    return t, n


_POSED = {2: cast_cutbox, 3: cast_ocyl, 4: cast_ellipsoid}


def cast_posed(kind: int, o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
    """Posed primitive: only the rays that meet its bounding sphere are intersected exactly."""
    R, c, ext, _ = g
    oc = c - o
    rad2 = float(ext @ ext) * 1.0001 + 1e-9
    b = d @ oc
    near = b * b - (float(oc @ oc) - rad2) >= 0
    near &= b > -math.sqrt(rad2)
    t = np.full(d.shape[0], np.inf)
    n = np.zeros_like(d)
    if near.any():
        idx = np.nonzero(near)[0]
        ts, ns = _POSED[kind](o, d[idx], g)
        t[idx] = ts
        n[idx] = ns
    return t, n


def cast(prims: Prims, i: int, o, d):
    k = prims.kind[i]
    if k == 0:
        return cast_box(o, d, prims.geom[i])
    if k == 1:
        return cast_cyl(o, d, prims.geom[i])
    return cast_posed(k, o, d, prims.geom[i])


class Buffers:
    """Nearest-hit buffers over a 2D ray grid."""

    def __init__(self, shape):
        self.t = np.full(shape, np.inf)
        self.prim = np.full(shape, -1, dtype=np.int32)  # -1 ground / nothing
        self.normal = np.zeros(shape + (3,))


def _sub_block(block_fn, p, rows, cols):
    """Flat indices (into the group's contiguous rows x cols block) of primitive p's own block; None = all."""
    sb = block_fn([p])
    if sb is None:
        return np.zeros(0, dtype=np.int64)
    r, c = sb
    if r[-1] - r[0] + 1 != r.size or c[-1] - c[0] + 1 != c.size:
        return None
    r0, r1 = max(int(r[0]), int(rows[0])), min(int(r[-1]), int(rows[-1]))
    c0, c1 = max(int(c[0]), int(cols[0])), min(int(c[-1]), int(cols[-1]))
    if r0 > r1 or c0 > c1:
        return np.zeros(0, dtype=np.int64)
    return ((np.arange(r0, r1 + 1) - int(rows[0]))[:, None] * cols.size +
            (np.arange(c0, c1 + 1) - int(cols[0]))[None, :]).ravel()


def render(prims: Prims, groups: List[List[int]], o: np.ndarray, dirs: np.ndarray, block_fn, buf: Buffers,
           sub_blocks: bool = False) -> Dict[int, int]:
    """Cast every group (list of primitive ids: one object or one background primitive) on its block; update the
    buffers with the nearest hits; return {group index: number of rays the group hits on its own}.
    ``sub_blocks``: within a group, each primitive is cast on its own block only (same hits, fewer rays)."""
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
            sub = _sub_block(block_fn, p, rows, cols) if sub_blocks and contiguous and len(group) > 1 else None
            if sub is None:
                t, n = cast(prims, p, o, d)
                closer = t < tg
                tg = np.where(closer, t, tg)
                pg = np.where(closer, p, pg)
                ng[closer] = n[closer]
            elif sub.size:
                t, n = cast(prims, p, o, d[sub])
                closer = t < tg[sub]
                ci = sub[closer]
                tg[ci] = t[closer]
                pg[ci] = p
                ng[ci] = n[closer]
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

