"""Scene sampler of the generator: street layout, ground materials, objects with their label boxes, and background
primitives, all drawn from one ``numpy.random.Generator`` in a fixed order."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from ...calib import Calibration
from ...geometry.boxes import boxes3d_kitti_camera_to_lidar, boxes3d_lidar_to_kitti_camera
from .raycast import Prims
from .sensors import GROUND_Z


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
    # 'v1': the original generator (boxes and cylinders; the default, so existing seeds keep their bytes);
    # 'kitti_v2': parametric vehicles, articulated people, non-target classes, clutter, HDL-64E + camera models with
    # domain randomisation (cmfiou_core.data.synth.frame_v2)
    profile: str = "v1"


PROFILES = ("v1", "kitti_v2")


def profile_config(profile: str = "v1", **overrides) -> "SceneConfig":
    """The SceneConfig of a generator profile (kitti_v2 draws more vulnerable road users per frame)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown generator profile {profile!r} (expected one of {', '.join(PROFILES)})")
    base = {"v1": {}, "kitti_v2": {"num_pedestrians": (2, 9), "num_cyclists": (2, 6)}}[profile]
    base.update(overrides)
    return SceneConfig(profile=profile, **base)


# ----------------------------------------------------------------------------------------------- materials
# name -> (albedo RGB 0..1, LiDAR reflectivity 0..1)
MATERIALS = {
    "road": ((0.33, 0.33, 0.34), 0.12), "marking": ((0.92, 0.92, 0.90), 0.75), "sidewalk": ((0.62, 0.60, 0.57), 0.25),
    "grass": ((0.28, 0.45, 0.18), 0.30), "building_a": ((0.78, 0.70, 0.58), 0.35),
    "building_b": ((0.55, 0.55, 0.58), 0.30), "building_c": ((0.62, 0.30, 0.22), 0.35),
    "pole": ((0.50, 0.50, 0.52), 0.45), "trunk": ((0.38, 0.26, 0.16), 0.30), "canopy": ((0.18, 0.42, 0.15), 0.22),
    "window": ((0.12, 0.16, 0.22), 0.08), "bike": ((0.15, 0.15, 0.17), 0.40), "skin": ((0.85, 0.65, 0.50), 0.30),
}
CAR_COLOURS = [(0.85, 0.85, 0.85), (0.08, 0.08, 0.09), (0.62, 0.63, 0.66), (0.70, 0.08, 0.07), (0.09, 0.20, 0.60),
                (0.12, 0.40, 0.18), (0.80, 0.68, 0.10), (0.35, 0.20, 0.12)]
CLOTH_COLOURS = [(0.15, 0.15, 0.35), (0.60, 0.10, 0.10), (0.10, 0.35, 0.15), (0.20, 0.20, 0.20), (0.75, 0.55, 0.10),
                  (0.45, 0.15, 0.50)]



# ----------------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
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


def ground_material(layout: Layout, x: np.ndarray, y: np.ndarray):
    """Ground albedo (K, 3) and reflectivity (K,) at world xy."""
    u, w = layout.to_road(x, y)
    aw = np.abs(w)
    alb = np.empty(x.shape + (3,))
    refl = np.empty(x.shape)
    regions = [(aw < layout.hw, "road"), ((aw >= layout.hw) & (aw < layout.hw + layout.sw), "sidewalk"),
               (aw >= layout.hw + layout.sw, "grass")]
    for m, name in regions:
        alb[m] = MATERIALS[name][0]
        refl[m] = MATERIALS[name][1]
    edge = (np.abs(aw - (layout.hw - 0.3)) < 0.08)
    centre = (aw < 0.07) & (np.mod(u, 6.0) < 3.0) & layout.two_way
    mark = edge | centre
    alb[mark] = MATERIALS["marking"][0]
    refl[mark] = MATERIALS["marking"][1]
    ti = np.mod(np.floor(u * 8).astype(np.int64), 256)
    tj = np.mod(np.floor(w * 8).astype(np.int64), 256)
    tex = layout.tex[ti, tj]
    alb = alb * (0.85 + 0.3 * tex)[..., None]
    return alb, refl


def sample_layout(rng: np.random.Generator) -> Layout:
    hw = float(rng.uniform(4.5, 8.0))
    return Layout(yaw=float(rng.uniform(-0.12, 0.12)), c0=float(rng.uniform(-hw + 2.5, hw - 2.5)), hw=hw,
                   sw=float(rng.uniform(2.0, 4.0)), two_way=bool(rng.random() < 0.7),
                   tex=rng.random((256, 256)))


CLASS_DIMS = {  # (l, w, h) means and spreads
    "Car": ((3.9, 1.62, 1.52), (0.35, 0.08, 0.09)), "Van": ((5.0, 1.90, 2.15), (0.4, 0.10, 0.15)),
    "Pedestrian": ((0.80, 0.62, 1.75), (0.15, 0.08, 0.10)), "Cyclist": ((1.75, 0.60, 1.74), (0.12, 0.06, 0.08)),
}


def sample_objects(rng: np.random.Generator, layout: Layout, cfg: SceneConfig, calib: Calibration):
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
                mean, spread = CLASS_DIMS[cls]
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


def object_prims(prims: Prims, k: int, cls: str, box: np.ndarray, rng: np.random.Generator):
    """Add the primitives of object k (all inside its label box); return (ids, main colour)."""
    x, y, z, l, w, h, yaw = (float(v) for v in box)
    zb = z - h / 2
    c, s = math.cos(yaw), math.sin(yaw)
    start = len(prims.kind)
    if cls == "Car":
        col = CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))]
        hb = 0.58 * h
        prims.box(x, y, zb + 0.15 + (hb - 0.15) / 2, l, w, hb - 0.15, yaw, col, 0.55, k)
        cl = 0.52 * l
        off = -0.08 * l
        prims.box(x + c * off, y + s * off, zb + hb + (h - hb) / 2, cl, 0.9 * w, h - hb, yaw, MATERIALS["window"][0],
                  0.1, k)
    elif cls == "Van":
        col = CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))]
        prims.box(x, y, zb + 0.15 + (h - 0.15) / 2, l, w, h - 0.15, yaw, col, 0.55, k)
    elif cls == "Pedestrian":
        col = CLOTH_COLOURS[int(rng.integers(len(CLOTH_COLOURS)))]
        r = 0.45 * min(l, w)
        prims.cyl(x, y, zb, zb + 0.86 * h, r, col, 0.4, k)
        prims.cyl(x, y, zb + 0.86 * h, zb + h, 0.5 * r, MATERIALS["skin"][0], 0.3, k)
    else:
        col = CLOTH_COLOURS[int(rng.integers(len(CLOTH_COLOURS)))]
        prims.box(x, y, zb + 0.55, 0.98 * l, 0.15, 1.0, yaw, MATERIALS["bike"][0], 0.4, k)
        prims.cyl(x, y, zb + 0.6, zb + 0.97 * h, 0.45 * min(0.5, w), col, 0.4, k)
    return list(range(start, len(prims.kind))), col


def background_prims(prims: Prims, rng: np.random.Generator, layout: Layout, circles):
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
            mat = MATERIALS[("building_a", "building_b", "building_c")[int(rng.integers(3))]]
            prims.box(x, y, GROUND_Z + H / 2, L, D, H, layout.yaw, mat[0], mat[1])
            ids.append(len(prims.kind) - 1)
            u += L
        u = float(rng.uniform(-60, -40))
        while u < 90:
            x, y = layout.to_world(u, side * (layout.hw + 0.35))
            if all(math.hypot(x - a, y - b) > rr + 0.6 for a, b, rr in circles) and math.hypot(x, y) > 2:
                if rng.random() < 0.5:
                    prims.cyl(x, y, GROUND_Z, GROUND_Z + float(rng.uniform(5, 8)), 0.1, *MATERIALS["pole"])
                    ids.append(len(prims.kind) - 1)
                else:
                    prims.cyl(x, y, GROUND_Z, GROUND_Z + 2.6, float(rng.uniform(0.12, 0.22)), *MATERIALS["trunk"])
                    ids.append(len(prims.kind) - 1)
                    cw = layout.to_world(u, side * (layout.hw + 0.35 + 0.8))
                    alb = np.clip(np.array(MATERIALS["canopy"][0]) * rng.uniform(0.8, 1.2), 0, 1)
                    prims.cyl(cw[0], cw[1], GROUND_Z + 2.7, GROUND_Z + float(rng.uniform(4.5, 7)),
                              float(rng.uniform(1.2, 2.0)), tuple(alb), MATERIALS["canopy"][1])
                    ids.append(len(prims.kind) - 1)
            u += float(rng.uniform(12, 30))
    return ids

