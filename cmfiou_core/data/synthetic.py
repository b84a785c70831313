"""Deterministic synthetic street scenes in the KITTI object layout (LiDAR + camera + labels).

Geometry (LiDAR frame, x forward, y left, z up, sensor at the origin, 1.73 m above a flat ground plane):
- a straight street (random width and yaw) with lane markings, sidewalks, buildings (boxes), poles (cylinders),
  trees (trunk + canopy cylinders);
- objects: Car (body + cabin boxes), Van (one box), Pedestrian (body + head cylinders), Cyclist (bike box + rider
  cylinder), each inside its label box.

Sensors share one ray caster (nearest hit per ray = occlusion): per primitive only the rays of its conservative
screen rectangle (LiDAR: beam x azimuth grid; camera: pixel grid) are intersected, all of them at once in numpy.
- LiDAR: HDL-64E-like, 64 beams (upper block 32 lasers +2.0..-8.33 deg, lower block 32 lasers -8.83..-24.9 deg),
  2083 azimuth steps (0.1728 deg), 120 m max range, intensity = material reflectivity x (0.35 + 0.65 |cos incidence|)
  + noise, random dropout, range noise.
- Camera: KITTI P2/R0/Tr (2011_09_26 calibration), 1242x375; each pixel's ray is the exact inverse of the P2
  projection, so projected 3D points land on the pixels that see them; Lambertian shading, sky gradient, road
  texture, lane markings, sensor noise.
- Labels: KITTI text (2 decimals). The object geometry is built from the *rounded* label values, so labels and
  sensors agree exactly. 2D box = min/max of the 8 projected corners clipped to the image (OpenPCDet), truncation =
  1 - clipped/unclipped 2D box area, occlusion from the fraction of the object's own pixels that stay visible in
  the z-buffer (>= 0.8 -> 0, >= 0.4 -> 1, else 2). Objects outside the camera view are not labelled (as in KITTI);
  objects seen only partly (corners behind the camera) or beyond 70 m become DontCare regions when ``dontcare``.

Every frame is generated from ``np.random.default_rng([seed, index])``: same seed -> identical bytes, independent
of the number of worker processes.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..calib import Calibration
from ..geometry.boxes import (boxes3d_kitti_camera_to_imageboxes, boxes3d_kitti_camera_to_lidar,
                              boxes3d_lidar_to_kitti_camera, boxes_to_corners_3d)
from .labels import dontcare_line, format_label_line

# KITTI 2011_09_26 calibration (object training calib of frames 000001/000002)
KITTI_P2 = [7.215377e+02, 0.0, 6.095593e+02, 4.485728e+01, 0.0, 7.215377e+02, 1.728540e+02, 2.163791e-01,
            0.0, 0.0, 1.0, 2.745884e-03]
KITTI_R0 = [9.999239e-01, 9.837760e-03, -7.445048e-03, -9.869795e-03, 9.999421e-01, -4.278459e-03,
            7.402527e-03, 4.351614e-03, 9.999631e-01]
KITTI_TR = [7.533745e-03, -9.999714e-01, -6.166020e-04, -4.069766e-03, 1.480249e-02, 7.280733e-04,
            -9.998902e-01, -7.631618e-02, 9.998621e-01, 7.523790e-03, 1.480755e-02, -2.717806e-01]
IMAGE_W, IMAGE_H = 1242, 375
LIDAR_HEIGHT = 1.73
GROUND_Z = -LIDAR_HEIGHT


def hdl64_elevations() -> np.ndarray:
    """64 beam elevations in radians, descending (upper block 32 at ~1/3 deg, lower block 32 at ~1/2 deg)."""
    upper = np.linspace(2.0, -8.33, 32)
    lower = np.linspace(-8.83, -24.9, 32)
    return np.deg2rad(np.concatenate([upper, lower]))


def kitti_calibration() -> Calibration:
    return Calibration(np.array(KITTI_P2), np.array(KITTI_R0), np.array(KITTI_TR), IMAGE_W, IMAGE_H)


@dataclass(frozen=True)
class SceneConfig:
    azimuth_steps: int = 2083
    max_range: float = 120.0
    dropout: float = 0.04
    range_noise: float = 0.012
    intensity_noise: float = 0.03
    image_noise: float = 3.0
    dontcare: bool = True
    max_label_distance: float = 70.0
    num_cars: Tuple[int, int] = (4, 14)
    num_vans: Tuple[int, int] = (0, 2)
    num_pedestrians: Tuple[int, int] = (1, 7)
    num_cyclists: Tuple[int, int] = (0, 3)


# ----------------------------------------------------------------------------------------------- materials
# name -> (albedo RGB 0..1, LiDAR reflectivity 0..1)
_MATERIALS = {
    "road": ((0.33, 0.33, 0.34), 0.12), "marking": ((0.92, 0.92, 0.90), 0.75), "sidewalk": ((0.62, 0.60, 0.57), 0.25),
    "grass": ((0.28, 0.45, 0.18), 0.30), "building_a": ((0.78, 0.70, 0.58), 0.35),
    "building_b": ((0.55, 0.55, 0.58), 0.30), "building_c": ((0.62, 0.30, 0.22), 0.35),
    "pole": ((0.50, 0.50, 0.52), 0.45), "trunk": ((0.38, 0.26, 0.16), 0.30), "canopy": ((0.18, 0.42, 0.15), 0.22),
    "window": ((0.12, 0.16, 0.22), 0.08), "bike": ((0.15, 0.15, 0.17), 0.40), "skin": ((0.85, 0.65, 0.50), 0.30),
}
_CAR_COLOURS = [(0.85, 0.85, 0.85), (0.08, 0.08, 0.09), (0.62, 0.63, 0.66), (0.70, 0.08, 0.07), (0.09, 0.20, 0.60),
                (0.12, 0.40, 0.18), (0.80, 0.68, 0.10), (0.35, 0.20, 0.12)]
_CLOTH_COLOURS = [(0.15, 0.15, 0.35), (0.60, 0.10, 0.10), (0.10, 0.35, 0.15), (0.20, 0.20, 0.20), (0.75, 0.55, 0.10),
                  (0.45, 0.15, 0.50)]


@dataclass
class _Prims:
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
def _cast_box(o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
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


def _cast_cyl(o: np.ndarray, d: np.ndarray, g) -> Tuple[np.ndarray, np.ndarray]:
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


def _cast(prims: _Prims, i: int, o, d):
    return _cast_box(o, d, prims.geom[i]) if prims.kind[i] == 0 else _cast_cyl(o, d, prims.geom[i])


class _Buffers:
    """Nearest-hit buffers over a 2D ray grid."""

    def __init__(self, shape):
        self.t = np.full(shape, np.inf)
        self.prim = np.full(shape, -1, dtype=np.int32)  # -1 ground / nothing
        self.normal = np.zeros(shape + (3,))


def _render(prims: _Prims, groups: List[List[int]], o: np.ndarray, dirs: np.ndarray, block_fn, buf: _Buffers
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
            t, n = _cast(prims, p, o, d)
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


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class _Layout:
    yaw: float  # road direction
    c0: float  # lateral offset of the road centre line
    hw: float  # road half width
    sw: float  # sidewalk width
    two_way: bool
    tex: np.ndarray  # (256, 256) road texture

    def to_road(self, x, y):
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return c * x + s * y, -s * x + c * y - self.c0

    def to_world(self, u, w, z=0.0):
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        w = w + self.c0
        return c * u - s * w, s * u + c * w


def _ground_material(layout: _Layout, x: np.ndarray, y: np.ndarray):
    """Ground albedo (K, 3) and reflectivity (K,) at world xy."""
    u, w = layout.to_road(x, y)
    aw = np.abs(w)
    alb = np.empty(x.shape + (3,))
    refl = np.empty(x.shape)
    regions = [(aw < layout.hw, "road"), ((aw >= layout.hw) & (aw < layout.hw + layout.sw), "sidewalk"),
               (aw >= layout.hw + layout.sw, "grass")]
    for m, name in regions:
        alb[m] = _MATERIALS[name][0]
        refl[m] = _MATERIALS[name][1]
    edge = (np.abs(aw - (layout.hw - 0.3)) < 0.08)
    centre = (aw < 0.07) & (np.mod(u, 6.0) < 3.0) & layout.two_way
    mark = edge | centre
    alb[mark] = _MATERIALS["marking"][0]
    refl[mark] = _MATERIALS["marking"][1]
    ti = np.mod(np.floor(u * 8).astype(np.int64), 256)
    tj = np.mod(np.floor(w * 8).astype(np.int64), 256)
    tex = layout.tex[ti, tj]
    alb = alb * (0.85 + 0.3 * tex)[..., None]
    return alb, refl


def _sample_layout(rng: np.random.Generator) -> _Layout:
    hw = float(rng.uniform(4.5, 8.0))
    return _Layout(yaw=float(rng.uniform(-0.12, 0.12)), c0=float(rng.uniform(-hw + 2.5, hw - 2.5)), hw=hw,
                   sw=float(rng.uniform(2.0, 4.0)), two_way=bool(rng.random() < 0.7),
                   tex=rng.random((256, 256)))


_CLASS_DIMS = {  # (l, w, h) means and spreads
    "Car": ((3.9, 1.62, 1.52), (0.35, 0.08, 0.09)), "Van": ((5.0, 1.90, 2.15), (0.4, 0.10, 0.15)),
    "Pedestrian": ((0.80, 0.62, 1.75), (0.15, 0.08, 0.10)), "Cyclist": ((1.75, 0.60, 1.74), (0.12, 0.06, 0.08)),
}


def _sample_objects(rng: np.random.Generator, layout: _Layout, cfg: SceneConfig, calib: Calibration):
    """-> list of (class, lidar box (7,) float64 rebuilt from rounded KITTI values), placement circles."""
    objs: List[Tuple[str, np.ndarray]] = []
    circles: List[Tuple[float, float, float]] = []
    ego_u, ego_w = layout.to_road(0.0, 0.0)

    def free(x, y, r):
        if math.hypot(x, y) < r + 3.0:
            return False
        return all(math.hypot(x - a, y - b) > r + rr + 0.3 for a, b, rr in circles)

    def place(cls, n):
        for _ in range(n):
            for _try in range(25):
                mean, spread = _CLASS_DIMS[cls]
                l, w, h = (max(0.3, rng.normal(m, s)) for m, s in zip(mean, spread))
                u = float(rng.uniform(-40.0, 75.0)) if rng.random() < 0.3 else float(rng.uniform(4.0, 60.0))
                side = 1.0 if rng.random() < 0.5 else -1.0
                if cls in ("Car", "Van"):
                    if rng.random() < 0.45:  # parked
                        wl = side * (layout.hw - w / 2 - 0.3)
                        yaw_rel = (0.0 if rng.random() < 0.5 else math.pi) + rng.normal(0, 0.05)
                    else:
                        wl = (side * layout.hw / 2 if layout.two_way else rng.uniform(-layout.hw + 1.5, layout.hw - 1.5)) \
                            + rng.normal(0, 0.3)
                        yaw_rel = (0.0 if (side < 0 or not layout.two_way) else math.pi) + rng.normal(0, 0.04)
                        if rng.random() < 0.08:
                            yaw_rel = rng.uniform(-math.pi, math.pi)
                elif cls == "Pedestrian":
                    if rng.random() < 0.8:
                        wl = side * (layout.hw + rng.uniform(0.4, layout.sw - 0.4))
                    else:
                        wl = rng.uniform(-layout.hw, layout.hw)
                    yaw_rel = rng.uniform(-math.pi, math.pi)
                else:
                    wl = side * (layout.hw - 0.9) + rng.normal(0, 0.2)
                    yaw_rel = (0.0 if side < 0 else math.pi) + rng.normal(0, 0.1)
                x, y = layout.to_world(u, wl)
                r = 0.5 * math.hypot(l, w)
                if not free(x, y, r):
                    continue
                heading = yaw_rel + layout.yaw
                box = np.array([[x, y, GROUND_Z + h / 2, l, w, h, heading]])
                cam = boxes3d_lidar_to_kitti_camera(box, calib)
                cam[:, 6] = (cam[:, 6] + math.pi) % (2 * math.pi) - math.pi
                cam = np.round(cam, 2)
                lid = boxes3d_kitti_camera_to_lidar(cam, calib)[0]
                objs.append((cls, lid, cam[0]))
                circles.append((x, y, r))
                break

    place("Car", int(rng.integers(cfg.num_cars[0], cfg.num_cars[1] + 1)))
    place("Van", int(rng.integers(cfg.num_vans[0], cfg.num_vans[1] + 1)))
    place("Pedestrian", int(rng.integers(cfg.num_pedestrians[0], cfg.num_pedestrians[1] + 1)))
    place("Cyclist", int(rng.integers(cfg.num_cyclists[0], cfg.num_cyclists[1] + 1)))
    return objs, circles


def _object_prims(prims: _Prims, k: int, cls: str, box: np.ndarray, rng: np.random.Generator):
    """Add the primitives of object k (all inside its label box); return (ids, main colour)."""
    x, y, z, l, w, h, yaw = (float(v) for v in box)
    zb = z - h / 2
    c, s = math.cos(yaw), math.sin(yaw)
    start = len(prims.kind)
    if cls == "Car":
        col = _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))]
        hb = 0.58 * h
        prims.box(x, y, zb + 0.15 + (hb - 0.15) / 2, l, w, hb - 0.15, yaw, col, 0.55, k)
        cl = 0.52 * l
        off = -0.08 * l
        prims.box(x + c * off, y + s * off, zb + hb + (h - hb) / 2, cl, 0.9 * w, h - hb, yaw, _MATERIALS["window"][0],
                  0.1, k)
    elif cls == "Van":
        col = _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))]
        prims.box(x, y, zb + 0.15 + (h - 0.15) / 2, l, w, h - 0.15, yaw, col, 0.55, k)
    elif cls == "Pedestrian":
        col = _CLOTH_COLOURS[int(rng.integers(len(_CLOTH_COLOURS)))]
        r = 0.45 * min(l, w)
        prims.cyl(x, y, zb, zb + 0.86 * h, r, col, 0.4, k)
        prims.cyl(x, y, zb + 0.86 * h, zb + h, 0.5 * r, _MATERIALS["skin"][0], 0.3, k)
    else:
        col = _CLOTH_COLOURS[int(rng.integers(len(_CLOTH_COLOURS)))]
        prims.box(x, y, zb + 0.55, 0.98 * l, 0.15, 1.0, yaw, _MATERIALS["bike"][0], 0.4, k)
        prims.cyl(x, y, zb + 0.6, zb + 0.97 * h, 0.45 * min(0.5, w), col, 0.4, k)
    return list(range(start, len(prims.kind))), col


def _background_prims(prims: _Prims, rng: np.random.Generator, layout: _Layout, circles):
    ids = []
    for side in (-1.0, 1.0):
        u = -90.0
        gap_u = float(rng.uniform(-10, 60)) if rng.random() < 0.35 else None
        while u < 110.0:
            L = float(rng.uniform(8, 25))
            if gap_u is not None and u < gap_u + 14 and u + L > gap_u:
                u = gap_u + 14
                continue
            if rng.random() < 0.2:
                u += float(rng.uniform(2, 8))
            D, H = float(rng.uniform(6, 15)), float(rng.uniform(5, 20))
            wc = side * (layout.hw + layout.sw + float(rng.uniform(0.5, 3.0)) + D / 2)
            x, y = layout.to_world(u + L / 2, wc)
            mat = _MATERIALS[("building_a", "building_b", "building_c")[int(rng.integers(3))]]
            prims.box(x, y, GROUND_Z + H / 2, L, D, H, layout.yaw, mat[0], mat[1])
            ids.append(len(prims.kind) - 1)
            u += L
        u = float(rng.uniform(-60, -40))
        while u < 90:
            x, y = layout.to_world(u, side * (layout.hw + 0.35))
            if all(math.hypot(x - a, y - b) > rr + 0.6 for a, b, rr in circles) and math.hypot(x, y) > 2:
                if rng.random() < 0.5:
                    prims.cyl(x, y, GROUND_Z, GROUND_Z + float(rng.uniform(5, 8)), 0.1, *_MATERIALS["pole"])
                    ids.append(len(prims.kind) - 1)
                else:
                    prims.cyl(x, y, GROUND_Z, GROUND_Z + 2.6, float(rng.uniform(0.12, 0.22)), *_MATERIALS["trunk"])
                    ids.append(len(prims.kind) - 1)
                    cw = layout.to_world(u, side * (layout.hw + 0.35 + 0.8))
                    alb = np.clip(np.array(_MATERIALS["canopy"][0]) * rng.uniform(0.8, 1.2), 0, 1)
                    prims.cyl(cw[0], cw[1], GROUND_Z + 2.7, GROUND_Z + float(rng.uniform(4.5, 7)),
                              float(rng.uniform(1.2, 2.0)), tuple(alb), _MATERIALS["canopy"][1])
                    ids.append(len(prims.kind) - 1)
            u += float(rng.uniform(12, 30))
    return ids


# ----------------------------------------------------------------------------------------------- sensors
def _lidar_grid(cfg: SceneConfig):
    return _lidar_grid_cached(cfg.azimuth_steps)


@functools.lru_cache(maxsize=4)
def _lidar_grid_cached(W: int):
    elev = hdl64_elevations()
    az = -math.pi + (np.arange(W) + 0.5) * (2 * math.pi / W)
    ce = np.cos(elev)[:, None]
    dirs = np.stack([ce * np.cos(az)[None], ce * np.sin(az)[None], np.broadcast_to(np.sin(elev)[:, None], (64, W))],
                    axis=-1)
    dirs.flags.writeable = False
    return elev, az, dirs


def _lidar_block(prims: _Prims, elev: np.ndarray, W: int, group):
    cxs, cys, Rs, z0s, z1s = zip(*[prims.bounds(p) for p in group])
    # conservative: union footprint circle
    cx, cy = float(np.mean(cxs)), float(np.mean(cys))
    R = max(math.hypot(a - cx, b - cy) + r for a, b, r in zip(cxs, cys, Rs))
    z0, z1 = min(z0s), max(z1s)
    dist = math.hypot(cx, cy)
    dmin, dmax = max(dist - R, 0.05), dist + R
    emax = math.atan2(z1, dmin if z1 > 0 else dmax)
    emin = math.atan2(z0, dmin if z0 < 0 else dmax)
    rows = np.nonzero((elev >= emin - 1e-3) & (elev <= emax + 1e-3))[0]
    if rows.size == 0:
        return None
    step = 2 * math.pi / W
    if dist <= R:
        cols = np.arange(W)
    else:
        ac, half = math.atan2(cy, cx), math.asin(min(1.0, R / dist))
        j0 = int(math.floor((ac - half + math.pi) / step - 0.5)) - 1
        j1 = int(math.ceil((ac + half + math.pi) / step - 0.5)) + 1
        cols = np.arange(j0, j1 + 1) % W
        cols = np.unique(cols) if cols.size > W else cols
    return rows, cols


def _camera_block(prims: _Prims, calib: Calibration, group, H: int, W: int):
    corners = prims.corners(group)
    rect = calib.lidar_to_rect(corners)
    uv, depth = calib.rect_to_img(rect)
    if np.all(depth <= 0.05):
        return None
    if np.any(depth <= 0.05):
        u0, u1, v0, v1 = 0, W - 1, 0, H - 1
    else:
        u0, u1 = int(math.floor(uv[:, 0].min())) - 1, int(math.ceil(uv[:, 0].max())) + 1
        v0, v1 = int(math.floor(uv[:, 1].min())) - 1, int(math.ceil(uv[:, 1].max())) + 1
        u0, v0, u1, v1 = max(u0, 0), max(v0, 0), min(u1, W - 1), min(v1, H - 1)
        if u0 > u1 or v0 > v1:
            return None
    return np.arange(v0, v1 + 1), np.arange(u0, u1 + 1)


def _camera_rays(calib: Calibration, H: int, W: int):
    """Camera centre (LiDAR frame) and (H, W, 3) unit ray directions, the exact inverse of the P2 projection."""
    K = calib.P2[:, :3]
    Kinv = np.linalg.inv(K)
    c_rect = -Kinv @ calib.P2[:, 3]
    R2V = calib.R2V
    centre = R2V[:3, :3] @ c_rect + R2V[:3, 3]
    vv, uu = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    pix = np.stack([uu, vv, np.ones_like(uu)], -1)
    d_rect = pix @ Kinv.T
    d = d_rect @ R2V[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return centre, d


@functools.lru_cache(maxsize=2)
def _camera_rays_cached(H: int, W: int):
    centre, d = _camera_rays(kitti_calibration(), H, W)
    d.flags.writeable = False
    return centre, d


def _ground_hit(o: np.ndarray, dirs: np.ndarray, buf: _Buffers, max_t: float):
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = (GROUND_Z - o[2]) / dirs[..., 2]
    tg = np.where((dirs[..., 2] < -1e-9) & (tg < max_t), tg, np.inf)
    buf.t[...] = tg
    buf.prim[...] = -1
    buf.normal[...] = (0.0, 0.0, 1.0)


@dataclass
class SyntheticFrame:
    points: np.ndarray  # (N, 4) float32 x, y, z, intensity
    image: np.ndarray  # (H, W, 3) uint8
    calib: Calibration
    label_text: str
    plane: np.ndarray  # (4,) road plane in the rect frame (KITTI planes file)
    names: List[str]  # per generated object
    boxes_lidar: np.ndarray  # (M, 7) all generated objects
    labelled: np.ndarray  # (M,) bool: written as a real label (not DontCare / not labelled)
    occluded: np.ndarray  # (M,) int KITTI occlusion level (-1 when not in the image)
    visible_fraction: np.ndarray  # (M,)
    colours: List[Tuple[float, float, float]]  # main albedo per object
    point_object: np.ndarray  # (N,) object index hit by each point, -1 background
    pixel_object: np.ndarray  # (H, W) object index visible at each pixel, -1 background
    bbox2d: np.ndarray  # (M, 4) clipped projected 2D boxes (labelled objects)


def generate_frame(seed: int, index: int, cfg: SceneConfig = SceneConfig()) -> SyntheticFrame:
    rng = np.random.default_rng([int(seed), int(index)])
    calib = kitti_calibration()
    layout = _sample_layout(rng)
    objs, circles = _sample_objects(rng, layout, cfg, calib)
    prims = _Prims()
    groups: List[List[int]] = []
    colours = []
    for k, (cls, box, _cam) in enumerate(objs):
        ids, col = _object_prims(prims, k, cls, box, rng)
        groups.append(ids)
        colours.append(col)
    n_obj = len(groups)
    for p in _background_prims(prims, rng, layout, circles):
        groups.append([p])
    albedo_tab = np.array(prims.albedo, dtype=np.float64).reshape(-1, 3)
    refl_tab = np.array(prims.refl, dtype=np.float64)
    obj_tab = np.array(prims.obj, dtype=np.int32)

    # ---------------- LiDAR
    elev, az, ldirs = _lidar_grid(cfg)
    W = cfg.azimuth_steps
    o = np.zeros(3)
    lb = _Buffers((64, W))
    _ground_hit(o, ldirs, lb, cfg.max_range)
    _render(prims, groups, o, ldirs, lambda g: _lidar_block(prims, elev, W, g), lb)
    t = lb.t
    valid = t < cfg.max_range
    valid &= rng.random(t.shape) >= cfg.dropout
    noise = rng.normal(0.0, cfg.range_noise, t.shape)
    rr = np.where(valid, t + noise, 0.0)
    pts = ldirs * rr[..., None]
    cosi = np.abs(np.sum(lb.normal * ldirs, -1))
    gmask = valid & (lb.prim < 0)
    refl = np.where(lb.prim >= 0, refl_tab[np.maximum(lb.prim, 0)] if refl_tab.size else 0.0, 0.0)
    if gmask.any():
        _, grefl = _ground_material(layout, pts[..., 0][gmask], pts[..., 1][gmask])
        refl[gmask] = grefl
    inten = refl * (0.35 + 0.65 * cosi) * np.exp(-rr / 200.0) + rng.normal(0.0, cfg.intensity_noise, t.shape)
    inten = np.clip(inten, 0.0, 0.99)
    # KITTI-like order: azimuth-major (one column after another), beams top to bottom
    sel = valid.T
    points = np.concatenate([pts.transpose(1, 0, 2)[sel], inten.T[sel][:, None]], 1).astype(np.float32)
    pobj = np.where(lb.prim >= 0, obj_tab[np.maximum(lb.prim, 0)] if obj_tab.size else -1, -1).T[sel]

    # ---------------- camera
    H, Wi = IMAGE_H, IMAGE_W
    co, cdirs = _camera_rays_cached(H, Wi)
    cb = _Buffers((H, Wi))
    _ground_hit(co, cdirs, cb, 400.0)
    own = _render(prims, groups, co, cdirs, lambda g: _camera_block(prims, calib, g, H, Wi), cb)
    hit = np.isfinite(cb.t)
    P = co + cdirs * np.where(hit, cb.t, 0.0)[..., None]
    alb = np.zeros((H, Wi, 3))
    on_prim = hit & (cb.prim >= 0)
    if albedo_tab.size:
        alb[on_prim] = albedo_tab[cb.prim[on_prim]]
    g = hit & (cb.prim < 0)
    alb[g], _ = _ground_material(layout, P[..., 0][g], P[..., 1][g])
    sun_az, sun_el = rng.uniform(-math.pi, math.pi), rng.uniform(0.5, 1.1)
    L = np.array([math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el)])
    shade = 0.45 + 0.55 * np.clip(cb.normal @ L, 0.0, 1.0)
    fog = np.exp(-np.where(hit, cb.t, 0.0) / 350.0)[..., None]
    sky_top, sky_hor = np.array([0.35, 0.55, 0.85]), np.array([0.85, 0.90, 0.95])
    sky_w = np.clip(cdirs[..., 2:3] * 4.0, 0.0, 1.0)
    sky = sky_hor * (1 - sky_w) + sky_top * sky_w
    rgb = np.where(hit[..., None], alb * shade[..., None] * fog + sky * (1 - fog), sky)
    img = rgb * 255.0 + rng.normal(0.0, cfg.image_noise, rgb.shape)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    pix_obj = np.where(on_prim, obj_tab[np.maximum(cb.prim, 0)] if obj_tab.size else -1, -1).astype(np.int32)

    # ---------------- labels
    boxes = np.array([b for _, b, _ in objs]).reshape(-1, 7)
    cams = np.array([c for _, _, c in objs]).reshape(-1, 7)
    vis = np.bincount(pix_obj[pix_obj >= 0], minlength=n_obj)[:n_obj] if n_obj else np.zeros(0, int)
    lines, labelled = [], np.zeros(n_obj, bool)
    occl = np.full(n_obj, -1, dtype=np.int64)
    vfrac = np.zeros(n_obj)
    bbox2d = np.zeros((n_obj, 4))
    if n_obj:  # all objects at once (few calls into the torch geometry)
        depth_all = calib.lidar_to_rect(boxes_to_corners_3d(boxes).reshape(-1, 3))[:, 2].reshape(n_obj, 8)
        full_all = boxes3d_kitti_camera_to_imageboxes(cams, calib)
        clip_all = boxes3d_kitti_camera_to_imageboxes(cams, calib, (H, Wi))
    for k in range(n_obj):
        cls = objs[k][0]
        if own[k] == 0 or vis[k] == 0:
            continue
        frac = vis[k] / own[k]
        vfrac[k] = frac
        occl[k] = 0 if frac >= 0.8 else (1 if frac >= 0.4 else 2)
        depth = depth_all[k]
        dist = float(np.hypot(boxes[k, 0], boxes[k, 1]))
        vv, uu = np.nonzero(pix_obj == k)
        vis_box = (float(uu.min()), float(vv.min()), float(uu.max()), float(vv.max()))
        if np.any(depth <= 0.1) or dist > cfg.max_label_distance:
            if cfg.dontcare and vis[k] >= 20:
                lines.append(dontcare_line(vis_box))
            continue
        full, clip = full_all[k], clip_all[k]
        a_full = max((full[2] - full[0]) * (full[3] - full[1]), 1e-9)
        a_clip = max(clip[2] - clip[0], 0) * max(clip[3] - clip[1], 0)
        trunc = float(np.clip(1.0 - a_clip / a_full, 0.0, 1.0))
        bbox2d[k] = clip
        x, y, z, l, h, w, ry = cams[k]
        alpha = ry - math.atan2(x, z)
        alpha = (alpha + math.pi) % (2 * math.pi) - math.pi
        lines.append(format_label_line(cls, trunc, int(occl[k]), alpha, clip, (h, w, l), (x, y, z), ry))
        labelled[k] = True
    # non-DontCare lines first (OpenPCDet assumes DontCare at the end)
    lines.sort(key=lambda s: s.startswith("DontCare"))
    plane = _road_plane(calib)
    return SyntheticFrame(points=points, image=image, calib=calib, label_text="\n".join(lines) + ("\n" if lines else ""),
                          plane=plane, names=[c for c, _, _ in objs], boxes_lidar=boxes, labelled=labelled,
                          occluded=occl, visible_fraction=vfrac, colours=colours, point_object=pobj.astype(np.int32),
                          pixel_object=pix_obj, bbox2d=bbox2d)


def _road_plane(calib: Calibration) -> np.ndarray:
    """Ground z = GROUND_Z (LiDAR) as a rect-frame plane a x + b y + c z + d = 0, normal pointing up (b < 0)."""
    R = calib.V2R
    n = R[:3, :3] @ np.array([0.0, 0.0, 1.0])
    p = R[:3, :3] @ np.array([0.0, 0.0, GROUND_Z]) + R[:3, 3]
    d = -float(n @ p)
    return np.array([n[0], n[1], n[2], d])


# ----------------------------------------------------------------------------------------------- writing
def write_frame(root: Union[str, Path], frame_id: str, fr: SyntheticFrame, split: str = "training") -> None:
    from PIL import Image

    base = Path(root) / split
    for sub in ("calib", "image_2", "velodyne", "planes") + (("label_2",) if split == "training" else ()):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "calib" / f"{frame_id}.txt").write_text(fr.calib.to_kitti_object_text())
    Image.fromarray(fr.image).save(base / "image_2" / f"{frame_id}.png", optimize=False, compress_level=1)
    fr.points.astype(np.float32).tofile(base / "velodyne" / f"{frame_id}.bin")
    (base / "planes" / f"{frame_id}.txt").write_text(
        "# Matrix\nWIDTH 4\nHEIGHT 1\n" + " ".join(f"{v:.6e}" for v in fr.plane) + "\n")
    if split == "training":
        (base / "label_2" / f"{frame_id}.txt").write_text(fr.label_text)


def _gen_one(args):
    root, seed, idx, split, cfg = args
    fr = generate_frame(seed, idx, cfg)
    write_frame(root, f"{idx:06d}", fr, split)
    return idx, int(fr.points.shape[0])


def generate_dataset(out: Union[str, Path], num: Optional[int] = None, seed: int = 0, split: str = "training",
                     val_fraction: float = 0.5, workers: Optional[int] = None, cfg: SceneConfig = SceneConfig(),
                     start: int = 0, num_frames: Optional[int] = None) -> Path:
    """Write ``num`` frames (ids ``start..start+num-1``; ``num_frames`` is an alias) and ``ImageSets`` (train/val
    split for ``training``, test.txt for ``testing``). Returns ``out``."""
    if num is None:
        num = num_frames
    elif num_frames is not None and num_frames != num:
        raise ValueError(f"generate_dataset: num={num} and num_frames={num_frames} disagree")
    if num is None:
        raise ValueError("generate_dataset: give num (number of frames)")
    if split not in ("training", "testing"):
        raise ValueError(f"split must be 'training' or 'testing', got {split!r}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(range(start, start + num))
    jobs = [(str(out), seed, i, split, cfg) for i in ids]
    workers = workers if workers is not None else min(len(os.sched_getaffinity(0)), 8)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            list(pool.imap_unordered(_gen_one, jobs, chunksize=1))
    else:
        for j in jobs:
            _gen_one(j)
    sets = out / "ImageSets"
    sets.mkdir(exist_ok=True)
    names = [f"{i:06d}" for i in ids]
    if split == "training":
        perm = np.random.default_rng([int(seed), 987654321]).permutation(len(names))
        n_val = int(round(val_fraction * len(names)))
        val = sorted(names[i] for i in perm[:n_val])
        train = sorted(names[i] for i in perm[n_val:])
        (sets / "train.txt").write_text("".join(f"{n}\n" for n in train))
        (sets / "val.txt").write_text("".join(f"{n}\n" for n in val))
        (sets / "trainval.txt").write_text("".join(f"{n}\n" for n in names))
    else:
        (sets / "test.txt").write_text("".join(f"{n}\n" for n in names))
    return out


def default_demo_dir() -> Path:
    env = os.environ.get("CMFIOU_DEMO_DATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "cmfiou" / "demo"


def ensure_demo_scenes(n: int = 8, root: Optional[Union[str, Path]] = None, seed: int = 2024) -> Path:
    """Generate ``n`` demo frames into the cache folder on first use (``root``, else ``$CMFIOU_DEMO_DATA`` -- set to
    the checkout's git-ignored ``data/generated/demo`` by scripts/setup.sh's env file -- else
    ``$XDG_CACHE_HOME/cmfiou/demo``, never inside the installed package); later calls return at once."""
    root = Path(root) if root is not None else default_demo_dir()
    stamp = root / f".complete_n{n}_s{seed}"
    if stamp.is_file():
        return root
    generate_dataset(root, n, seed=seed, split="training", val_fraction=0.5)
    stamp.write_text("ok\n")
    return root
