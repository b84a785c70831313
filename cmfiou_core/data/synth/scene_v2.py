"""Scene sampler of the ``kitti_v2`` profile: KITTI-like streets with parametric vehicles, articulated people,
labelled non-target classes and clutter. Every number is drawn from the frame's ``numpy.random.Generator`` in a fixed
order (same seed and index -> same scene).

Sources of the statistics (published values only; nothing here is fitted to any KITTI frame or label we hold):
- class mean sizes (l, w, h): the KITTI object training-set means published with Frustum PointNets (Qi et al., CVPR
  2018, ``models/model_util.py``, ``g_type_mean_size``);
- LiDAR mounting height 1.73 m above the road: the KITTI recording platform (Geiger et al., "Vision meets Robotics:
  The KITTI Dataset", IJRR 2013, Fig. 3);
- headings: cars mostly aligned with the road (driving, parked, oncoming), pedestrians close to uniform, as in the
  orientation histograms of Geiger et al. 2013 (object statistics figure). The exact mixture weights are ours.
The spreads (standard deviations) of the sizes are NOT published with those means: they are our assumptions from the
range of vehicle models and people (e.g. compact 3.5 m to estate 4.8 m cars), stated here as such.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from ...calib import Calibration
from ...geometry.boxes import boxes3d_kitti_camera_to_lidar, boxes3d_lidar_to_kitti_camera
from .raycast import Prims
from .sensors import GROUND_Z

# material codes read by the v2 sensor models
MAT_OPAQUE, MAT_GLASS, MAT_VEG, MAT_FENCE, MAT_RETRO, MAT_FACADE, MAT_RUBBER, MAT_PAINT = range(8)

# KITTI training-set class mean sizes (l, w, h) [m], Frustum PointNets (Qi et al. 2018) g_type_mean_size
KITTI_MEAN_LWH = {
    "Car": (3.883, 1.629, 1.526), "Van": (5.068, 1.901, 2.205), "Truck": (10.136, 2.585, 3.252),
    "Pedestrian": (0.844, 0.661, 1.763), "Person_sitting": (0.801, 0.598, 1.275), "Cyclist": (1.763, 0.597, 1.737),
    "Tram": (16.172, 2.532, 3.531), "Misc": (3.643, 1.543, 1.923),
}
# assumed spreads (not a published statistic, see the module doc)
SIZE_STD = {
    "Car": (0.38, 0.09, 0.11), "Van": (0.45, 0.12, 0.18), "Truck": (2.4, 0.2, 0.4), "Pedestrian": (0.17, 0.10, 0.11),
    "Person_sitting": (0.15, 0.08, 0.10), "Cyclist": (0.14, 0.10, 0.09), "Tram": (1.5, 0.08, 0.12),
    "Misc": (0.9, 0.35, 0.45),
}
SIZE_MIN = {"Car": (3.0, 1.4, 1.25), "Van": (4.2, 1.7, 1.8), "Truck": (6.0, 2.2, 2.5), "Pedestrian": (0.45, 0.4, 1.3),
            "Person_sitting": (0.5, 0.4, 0.9), "Cyclist": (1.4, 0.4, 1.4), "Tram": (12.0, 2.3, 3.1),
            "Misc": (1.5, 0.8, 0.8)}
SIZE_MAX = {"Car": (5.2, 1.95, 1.85), "Van": (6.2, 2.2, 2.8), "Truck": (16.0, 2.9, 4.0), "Pedestrian": (1.3, 1.0, 2.05),
            "Person_sitting": (1.2, 0.9, 1.5), "Cyclist": (2.1, 0.9, 2.0), "Tram": (20.0, 2.7, 3.8),
            "Misc": (6.0, 2.4, 3.2)}

# car paint (albedo): white, black, grey and silver dominate European traffic (industry colour-popularity reports);
# the shares are approximate
PAINTS = [((0.86, 0.86, 0.85), 0.24), ((0.06, 0.06, 0.07), 0.20), ((0.42, 0.43, 0.45), 0.16),
          ((0.66, 0.67, 0.69), 0.15), ((0.10, 0.18, 0.45), 0.09), ((0.55, 0.07, 0.06), 0.07),
          ((0.15, 0.30, 0.16), 0.03), ((0.45, 0.35, 0.22), 0.03), ((0.80, 0.62, 0.10), 0.03)]
CLOTH = [(0.10, 0.10, 0.12), (0.20, 0.22, 0.35), (0.45, 0.45, 0.47), (0.60, 0.12, 0.10), (0.12, 0.30, 0.18),
         (0.70, 0.68, 0.62), (0.35, 0.25, 0.18), (0.75, 0.55, 0.12), (0.40, 0.20, 0.45)]
SKIN = [(0.88, 0.70, 0.58), (0.72, 0.52, 0.40), (0.45, 0.32, 0.24)]
GLASS_ALB = (0.06, 0.08, 0.10)
TYRE = (0.05, 0.05, 0.05)


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def axis_frame(axis: np.ndarray) -> np.ndarray:
    """A rotation whose third column is the unit vector ``axis``."""
    a = axis / np.linalg.norm(axis)
    ref = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(ref, a)
    u /= np.linalg.norm(u)
    v = np.cross(a, u)
    return np.stack([u, v, a], 1)


def plane_through(p0, p1, outward) -> np.ndarray:
    """Half-space n.x <= d in the local x-z plane: the line through p0=(x, z), p1=(x, z); ``outward`` (x, z) picks
    the side that is cut away."""
    dx, dz = p1[0] - p0[0], p1[1] - p0[1]
    n = np.array([dz, 0.0, -dx])
    if n[0] * outward[0] + n[2] * outward[1] < 0:
        n = -n
    n /= np.linalg.norm(n)
    return np.array([n[0], 0.0, n[2], n[0] * p0[0] + n[2] * p0[1]])


class Builder:
    """Adds primitives of one object given in its local frame (x forward, y left, z up, origin at the centre of the
    box bottom) posed at world (x, y, zb) with heading ``yaw``."""

    def __init__(self, prims: Prims, k: int, x: float, y: float, zb: float, yaw: float):
        self.p, self.k = prims, k
        self.R = rot_z(yaw)
        self.o = np.array([x, y, zb])
        self.ids: List[int] = []

    def _add(self, kind, Rl, c, ext, alb, refl, mat, planes=None):
        i = self.p.posed(kind, self.R @ Rl, self.o + self.R @ np.asarray(c, float), ext, alb, refl, self.k, mat,
                         planes)
        self.ids.append(i)
        return i

    def box(self, c, half, alb, refl, mat=MAT_OPAQUE, Rl=None, planes=None):
        return self._add(2, np.eye(3) if Rl is None else Rl, c, half, alb, refl, mat, planes)

    def cyl(self, p0, p1, r, alb, refl, mat=MAT_OPAQUE):
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        ax = p1 - p0
        hl = 0.5 * float(np.linalg.norm(ax))
        return self._add(3, axis_frame(ax), 0.5 * (p0 + p1), (r, r, hl), alb, refl, mat)

    def ell(self, c, radii, alb, refl, mat=MAT_OPAQUE, Rl=None):
        return self._add(4, np.eye(3) if Rl is None else Rl, c, radii, alb, refl, mat)


def pick_paint(rng):
    w = np.array([p[1] for p in PAINTS])
    i = int(rng.choice(len(PAINTS), p=w / w.sum()))
    return tuple(float(np.clip(v * rng.uniform(0.9, 1.1), 0, 1)) for v in PAINTS[i][0])


# ----------------------------------------------------------------------------------------------- vehicles
def build_car(b: Builder, l, w, h, rng, paint, style: str = "car"):
    """Parametric passenger car / van: lower body with sloped hood and trunk, glass cabin with roof and pillars,
    four wheels in arches. Everything stays inside the (l, w, h) box."""
    refl_paint = 0.05 + 0.3 * float(np.mean(paint))  # glossy paint returns weakly, dark paint least
    r_w = float(np.clip(rng.normal(0.215 * h if style == "car" else 0.17 * h, 0.02), 0.26, 0.42))
    clear = float(rng.uniform(0.12, 0.2))
    belt = float(rng.uniform(0.50, 0.58) if style == "car" else rng.uniform(0.45, 0.52)) * h
    hx, hy = l / 2, w / 2
    if style == "car":
        hood = float(rng.uniform(0.22, 0.30)) * l
        trunk = float(rng.choice([rng.uniform(0.02, 0.06), rng.uniform(0.14, 0.22)])) * l  # hatch / saloon
        rake_f, rake_r = float(rng.uniform(0.45, 0.65)) * (h - belt) * 1.6, float(rng.uniform(0.3, 0.6)) * (h - belt)
    else:
        hood = float(rng.uniform(0.10, 0.16)) * l
        trunk = 0.0
        rake_f, rake_r = float(rng.uniform(0.25, 0.45)) * (h - belt), 0.05
    x_ws = hx - hood  # windshield foot
    x_rw = -hx + trunk  # rear window foot
    # lower body (paint): box clear..belt cut by the hood slope, a front bumper chamfer, a rear chamfer and four
    # rounded corners in plan view
    zt = belt
    drop_f = float(rng.uniform(0.10, 0.22)) if style == "car" else float(rng.uniform(0.05, 0.12))  # hood slope
    drop_r = float(rng.uniform(0.05, 0.15))
    planes = [plane_through((hx - 0.02, zt - drop_f), (x_ws, zt), (1, 1)),
              plane_through((hx, clear + 0.25), (hx - 0.12, zt - drop_f), (1, 1)),
              plane_through((-hx, zt - drop_r), (-hx + 0.25, zt), (-1, 1))]
    cut = 0.18 * min(w, 1.8)
    for sx in (1, -1):
        for sy in (1, -1):
            n = np.array([sx, sy, 0.0]) / math.sqrt(2)
            planes.append(np.r_[n, n[0] * sx * hx + n[1] * sy * hy - cut / math.sqrt(2)])
    planes = np.array(planes)
    wb = float(rng.uniform(0.58, 0.64)) * l
    axles = (0.5 * wb + 0.03 * l, -0.5 * wb + 0.03 * l)
    arch = r_w + 0.06

    def seg(x0, x1, z0, z1, yh):
        xc, zc = 0.5 * (x0 + x1), 0.5 * (z0 + z1)
        b.box((xc, 0, zc), (0.5 * (x1 - x0), yh, 0.5 * (z1 - z0)), paint, refl_paint, MAT_PAINT,
              planes=_shift_planes_x(planes, xc, zc))

    xf, xr = axles
    seg(xf + arch, hx, clear + 0.05, zt, hy)  # front overhang (bumper, hood)
    seg(xr + arch, xf - arch, clear, zt, hy)  # between the wheels (sills, doors)
    seg(-hx, xr - arch, clear + 0.05, zt, hy)  # rear overhang
    for xa in axles:  # wheel arches: panel above the wheel only
        seg(xa - arch, xa + arch, min(2 * r_w + 0.05, zt - 0.05), zt, hy)
    seg(-hx + 0.2, hx - 0.2, clear + 0.05, zt - 0.1, hy - 0.3)  # inner body behind the wheels
    # licence plates front and rear (retro-reflective: the brightest LiDAR returns of a car)
    pz = clear + float(rng.uniform(0.15, 0.3))
    for sx in (1, -1):
        b.box((sx * (hx - 0.015), 0, pz), (0.012, min(0.26, hy - 0.2), 0.056), (0.9, 0.9, 0.86), 0.9, MAT_RETRO)
    # cabin: glass volume narrowed upwards (tumblehome), slanted windshield and rear window
    top = h - 0.04
    tumble = float(rng.uniform(0.08, 0.16))
    cab_planes = [plane_through((x_ws, belt), (x_ws - rake_f, top), (1, 1)),
                  plane_through((x_rw, belt), (x_rw + rake_r + 0.05, top), (-1, 1)),
                  np.array([0.0, 1.0, tumble, hy - 0.04 + tumble * belt]),
                  np.array([0.0, -1.0, tumble, hy - 0.04 + tumble * belt])]
    zc2 = 0.5 * (belt + top)
    b.box((0.5 * (x_ws + x_rw), 0, zc2), (0.5 * (x_ws - x_rw), hy - 0.04, 0.5 * (top - belt)), GLASS_ALB, 0.0,
          MAT_GLASS, planes=_shift_planes_x(cab_planes, 0.5 * (x_ws + x_rw), zc2))
    # roof (paint) over the glass, inside the box
    rx0, rx1 = x_rw + rake_r + 0.1, x_ws - rake_f - 0.05
    if rx1 > rx0:
        ry = hy - 0.04 - tumble * (top - belt) - 0.02
        b.box((0.5 * (rx0 + rx1), 0, h - 0.03), (0.5 * (rx1 - rx0), max(ry, 0.3), 0.03), paint, refl_paint, MAT_PAINT)
        # pillars: A (front) and C (rear) on both sides, thin slanted posts
        for sy in (1, -1):
            yy = sy * (hy - 0.08 - 0.5 * tumble * (top - belt))
            b.cyl((x_ws - 0.05, yy, belt + 0.02), (rx1 + 0.02, sy * (abs(yy) - 0.03), top - 0.05), 0.04, paint,
                  refl_paint, MAT_PAINT)
            b.cyl((x_rw + 0.08, yy, belt + 0.02), (rx0 - 0.02, sy * (abs(yy) - 0.03), top - 0.05), 0.05, paint,
                  refl_paint, MAT_PAINT)
    # wheels (rubber) in the arches, axis along local y, just inside the sides
    for xw in axles:
        for sy in (1, -1):
            yc = sy * (hy - 0.13)
            b.cyl((xw, yc - 0.11, r_w), (xw, yc + 0.11, r_w), r_w, TYRE, 0.05, MAT_RUBBER)
    return paint


def _shift_planes_x(planes, xc, zc):
    """Half-spaces n.p <= d given in the box-bottom frame -> a primitive centred at (xc, 0, zc) of that frame."""
    P = np.array(planes, dtype=np.float64)
    P[:, 3] = P[:, 3] - P[:, 0] * xc - P[:, 2] * zc
    return P


def build_truck(b: Builder, l, w, h, rng, paint):
    """Cab (with windshield) + cargo box on a chassis, 6 wheels."""
    refl = 0.05 + 0.3 * float(np.mean(paint))
    cab_l = float(rng.uniform(1.8, 2.4))
    r_w = float(rng.uniform(0.45, 0.52))
    hx, hy = l / 2, w / 2
    cab_h = min(h, float(rng.uniform(2.6, 3.1)))
    zc = 0.5 * (0.5 + cab_h)
    b.box((hx - cab_l / 2, 0, zc), (cab_l / 2, hy - 0.02, 0.5 * (cab_h - 0.5)), paint, refl, MAT_PAINT)
    b.box((hx - 0.02, 0, cab_h - 0.6), (0.02, hy - 0.15, 0.4), GLASS_ALB, 0.0, MAT_GLASS)
    box_col = tuple(float(v) for v in rng.choice([(0.85, 0.85, 0.83), (0.5, 0.5, 0.52), (0.2, 0.3, 0.55),
                                                   (0.7, 0.15, 0.1)]))
    bl = l - cab_l - 0.25
    b.box((-hx + bl / 2, 0, 0.5 * (1.0 + h)), (bl / 2, hy, 0.5 * (h - 1.0)), box_col, 0.2 + 0.2 * float(np.mean(box_col)),
          MAT_PAINT)
    b.box((0, 0, 0.75), (hx - 0.1, hy - 0.35, 0.2), TYRE, 0.1, MAT_OPAQUE)  # chassis
    for xw in (hx - cab_l / 2, -hx + 0.9, -hx + 0.9 + 2.1 * r_w):
        for sy in (1, -1):
            yc = sy * (hy - 0.2)
            b.cyl((xw, yc - 0.15, r_w), (xw, yc + 0.15, r_w), r_w, TYRE, 0.05, MAT_RUBBER)
    return paint


def build_tram(b: Builder, l, w, h, rng):
    col = tuple(float(v) for v in rng.choice([(0.85, 0.80, 0.2), (0.8, 0.1, 0.1), (0.9, 0.9, 0.9)]))
    hx, hy = l / 2, w / 2
    b.box((0, 0, 0.5 * (0.4 + 1.3)), (hx, hy, 0.45), col, 0.4, MAT_PAINT)
    b.box((0, 0, 0.5 * (1.3 + 2.5)), (hx - 0.05, hy - 0.02, 0.6), GLASS_ALB, 0.0, MAT_GLASS)
    b.box((0, 0, 0.5 * (2.5 + h)), (hx, hy, 0.5 * (h - 2.5)), col, 0.4, MAT_PAINT)
    return col


def build_misc(b: Builder, l, w, h, rng):
    """A trailer / container / cart: box body on two wheels."""
    col = tuple(float(v) for v in rng.uniform(0.15, 0.8, 3))
    r_w = float(min(0.3, 0.2 * h))
    b.box((0, 0, 0.5 * (2 * r_w + h)), (l / 2, w / 2, 0.5 * (h - 2 * r_w)), col, 0.15 + 0.3 * float(np.mean(col)),
          MAT_PAINT)
    for sy in (1, -1):
        b.cyl((0, sy * (w / 2 - 0.12) - 0.08, r_w), (0, sy * (w / 2 - 0.12) + 0.08, r_w), r_w, TYRE, 0.05, MAT_RUBBER)
    return col


# ----------------------------------------------------------------------------------------------- people
def build_person(b: Builder, l, w, h, rng, sitting: bool = False):
    """Walking (or sitting) person with legs, torso, arms and head, inside the (l, w, h) box."""
    cloth, trousers = CLOTH[int(rng.integers(len(CLOTH)))], CLOTH[int(rng.integers(len(CLOTH)))]
    skin = SKIN[int(rng.integers(len(SKIN)))]
    head_r = float(np.clip(0.065 * h, 0.08, 0.12))
    hip = 0.50 * h if not sitting else 0.40 * h
    sh = 0.80 * h if not sitting else 0.75 * h
    hw = min(0.5 * w - 0.06, 0.19)
    leg_r = min(0.075, 0.25 * w)
    if sitting:
        for sy in (1, -1):
            knee = (0.5 * l - 0.08, sy * 0.1, hip)
            b.cyl((-0.1, sy * 0.1, hip), knee, leg_r, trousers, 0.35)
            b.cyl(knee, (0.5 * l - 0.1, sy * 0.1, 0.06), leg_r * 0.85, trousers, 0.35)
        b.box((-0.05, 0, 0.5 * (hip + 0.2 * h)), (0.2, 0.22, 0.12 * h), (0.3, 0.25, 0.2), 0.3)  # seat
    else:
        stride = min(0.5 * l - 0.1, 0.35) * float(rng.uniform(-1, 1))
        for sy, s in ((1, stride), (-1, -stride)):
            b.cyl((0.0, sy * 0.09, hip), (s, sy * 0.1, leg_r + 0.02), leg_r, trousers, 0.35)
    # torso: slightly flattened ellipsoid from hip to shoulder
    tz = 0.5 * (hip + sh) + 0.02
    b.ell((0.0, 0.0, tz), (min(0.13, 0.5 * l - 0.03), hw, 0.5 * (sh - hip) + 0.06), cloth, 0.4)
    swing = min(0.5 * l - 0.08, 0.25) * float(rng.uniform(-1, 1))
    for sy, s in ((1, -swing), (-1, swing)):
        b.cyl((0.0, sy * (hw - 0.02), sh - 0.03), (s, sy * (hw + 0.0), hip + 0.02), 0.045, cloth, 0.4)
    b.cyl((0, 0, sh), (0, 0, h - 2 * head_r), 0.05, skin, 0.3)  # neck
    b.ell((0.0, 0.0, h - head_r - 0.005), (head_r * 0.9, head_r * 0.8, head_r), skin, 0.3)
    if rng.random() < 0.25:  # backpack / bag
        b.box((-min(0.5 * l - 0.08, 0.18), 0, tz + 0.05), (0.07, 0.14, 0.18), CLOTH[int(rng.integers(len(CLOTH)))],
              0.35)
    return cloth


def build_bicycle(b: Builder, l, rng, col, x0=0.0, w=0.6):
    """Two thin wheels, a diamond frame and a handlebar; returns (seat, bar, pedal height)."""
    r = float(np.clip(0.5 * (l - 0.05) / 2.0, 0.28, 0.36))
    xr, xf = x0 - 0.5 * l + r + 0.02, x0 + 0.5 * l - r - 0.02
    for xc in (xr, xf):
        b.cyl((xc, -0.02, r + 0.005), (xc, 0.02, r + 0.005), r, TYRE, 0.1, MAT_RUBBER)
    seat = np.array([xr + 0.35 * (xf - xr), 0.0, 2 * r + 0.25])
    bar = np.array([xf - 0.12, 0.0, 2 * r + 0.35])
    bb = np.array([xr + 0.45 * (xf - xr), 0.0, r])
    for p0, p1 in ((seat, bb), (bb, (xr, 0, r)), (seat, (xr, 0, r)), (seat, bar - (0, 0, 0.08)), (bb, bar),
                   (bar, (xf, 0, r))):
        b.cyl(p0, p1, 0.022, col, 0.45)
    hb = hbar(w)
    b.cyl(bar + (0, -hb, 0.02), bar + (0, hb, 0.02), 0.018, (0.1, 0.1, 0.1), 0.45)
    return seat, bar, bb


def hbar(w):
    return min(0.25, 0.5 * w - 0.04)


def build_cyclist(b: Builder, l, w, h, rng):
    """Bicycle + rider leaning forward (hands on the bar, feet on the pedals)."""
    frame_col = tuple(float(v) for v in rng.uniform(0.05, 0.8, 3))
    seat, bar, bb = build_bicycle(b, l, rng, frame_col, w=w)
    ys = min(1.0, (0.5 * w - 0.06) / 0.2)  # lateral scale of the rider's limbs for narrow boxes
    cloth, trousers = CLOTH[int(rng.integers(len(CLOTH)))], CLOTH[int(rng.integers(len(CLOTH)))]
    skin = SKIN[int(rng.integers(len(SKIN)))]
    head_r = 0.1
    sh = np.array([seat[0] + 0.25 * (bar[0] - seat[0]) + 0.05, 0.0, h - 2 * head_r - 0.08])
    hip = seat + (0, 0, 0.06)
    b.cyl(hip, sh, min(0.16, 0.5 * w - 0.05), cloth, 0.4)  # torso
    b.ell(sh + (0.06, 0, head_r + 0.06), (head_r, 0.085, head_r), skin, 0.3)
    if rng.random() < 0.5:  # helmet
        b.ell(sh + (0.06, 0, head_r + 0.12), (0.12, 0.1, 0.06), CLOTH[int(rng.integers(len(CLOTH)))], 0.5)
    for sy in (1, -1):
        b.cyl(sh + (0, sy * 0.15 * ys, -0.03), bar + (0, sy * min(0.2 * ys, hbar(w)), 0.03), 0.04, cloth, 0.4)  # arm
        ph = float(rng.uniform(0, 2 * math.pi)) + (0 if sy > 0 else math.pi)
        pedal = bb + (0.17 * math.cos(ph), sy * 0.12 * ys, 0.17 * math.sin(ph))
        knee = 0.5 * (hip + pedal) + (0.2, 0, 0.12)
        b.cyl(hip + (0, sy * 0.1 * ys, 0), knee + (0, sy * 0.12 * ys, 0), 0.065, trousers, 0.35)
        b.cyl(knee + (0, sy * 0.12 * ys, 0), pedal, 0.05, trousers, 0.35)
    return cloth


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class LayoutV2:
    yaw: float  # road direction (LiDAR frame)
    c0: float  # lateral offset of the road centre line from the sensor
    hw: float  # road half width (kerb to kerb)
    sw: float  # sidewalk width
    curb: float  # sidewalk height above the road
    two_way: bool
    hill_u0: float  # the road starts to climb (c > 0) or fall at u > hill_u0
    hill_c: float  # z = z0 + c (u - u0)^2 beyond u0
    bumps: np.ndarray  # (3, 4) waves: amplitude, kx, ky, phase
    cross_u: Optional[float]  # a cross street at u (its half width cross_hw), else None
    cross_hw: float
    tex: np.ndarray  # (256, 256) asphalt texture
    road_refl: float
    road_alb: float
    rural: bool
    extras: dict = field(default_factory=dict)

    def to_road(self, x, y):
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return c * x + s * y, -s * x + c * y - self.c0

    def to_world(self, u, w):
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        w = w + self.c0
        return c * u - s * w, s * u + c * w

    def height(self, x, y):
        """Ground (road surface) height at world x, y (hill only; the small bumps are a sensor-side perturbation)."""
        u, _ = self.to_road(x, y)
        e = np.maximum(np.asarray(u, dtype=np.float64) - self.hill_u0, 0.0)
        return GROUND_Z + self.hill_c * e * e

    def bump(self, x, y):
        out = np.zeros(np.shape(x))
        for amp, kx, ky, ph in self.bumps:
            out += amp * np.sin(kx * x + ky * y + ph)
        return out


def sample_layout_v2(rng: np.random.Generator) -> LayoutV2:
    rural = bool(rng.random() < 0.2)
    hw = float(rng.uniform(3.2, 7.5))
    hill = rng.random() < 0.3
    cross = (not rural) and rng.random() < 0.4
    bumps = np.stack([rng.uniform(0.002, 0.012, 3), rng.uniform(-0.5, 0.5, 3), rng.uniform(-0.5, 0.5, 3),
                      rng.uniform(0, 2 * math.pi, 3)], 1)
    return LayoutV2(yaw=float(rng.normal(0, 0.06)), c0=float(rng.uniform(-hw + 1.6, min(hw - 1.6, 0.0) if hw > 4.5
                                                                          else hw - 1.6)),
                    hw=hw, sw=float(rng.uniform(1.5, 4.0)), curb=float(rng.uniform(0.08, 0.16)) if not rural else 0.0,
                    two_way=bool(rng.random() < 0.8), hill_u0=float(rng.uniform(8, 40)),
                    hill_c=float(rng.uniform(-0.0005, 0.0008)) if hill else 0.0, bumps=bumps,
                    cross_u=float(rng.uniform(12, 45)) if cross else None, cross_hw=float(rng.uniform(3.5, 6.5)),
                    tex=rng.random((256, 256)), road_refl=float(rng.uniform(0.2, 0.4)),
                    road_alb=float(rng.uniform(0.22, 0.42)), rural=rural)


def in_cross(layout: LayoutV2, u) -> bool:
    return layout.cross_u is not None and abs(u - layout.cross_u) < layout.cross_hw + 1.0


# ----------------------------------------------------------------------------------------------- objects
def _rect(x, y, l, w, yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[x + c * dx - s * dy, y + s * dx + c * dy] for dx, dy in
                     ((l / 2, w / 2), (l / 2, -w / 2), (-l / 2, -w / 2), (-l / 2, w / 2))])


def _overlap(a: np.ndarray, b: np.ndarray, margin: float) -> bool:
    """Separating-axis test of two rectangles (4, 2) with a margin."""
    for poly in (a, b):
        for i in range(4):
            e = poly[(i + 1) % 4] - poly[i]
            n = np.array([-e[1], e[0]]) / (np.linalg.norm(e) + 1e-12)
            pa, pb = a @ n, b @ n
            if pa.max() + margin < pb.min() or pb.max() + margin < pa.min():
                return False
    return True


class Placer:
    def __init__(self):
        self.rects: List[np.ndarray] = []

    def free(self, x, y, l, w, yaw, margin=0.25) -> bool:
        if math.hypot(x, y) < 0.5 * math.hypot(l, w) + 2.8:  # keep clear of the ego car
            return False
        r = _rect(x, y, l, w, yaw)
        return not any(_overlap(r, q, margin) for q in self.rects)

    def add(self, x, y, l, w, yaw):
        self.rects.append(_rect(x, y, l, w, yaw))


def sample_size(rng, cls) -> Tuple[float, float, float]:
    m, s = KITTI_MEAN_LWH[cls], SIZE_STD[cls]
    lo, hi = SIZE_MIN[cls], SIZE_MAX[cls]
    # one shared factor per object keeps l, w, h correlated (bigger cars are longer, wider and often taller)
    z = rng.normal()
    out = []
    for mi, si, a, b in zip(m, s, lo, hi):
        v = mi + si * (0.6 * z + 0.8 * rng.normal())
        out.append(float(np.clip(v, a, b)))
    return tuple(out)


def sample_objects_v2(rng: np.random.Generator, layout: LayoutV2, calib: Calibration, cfg):
    """-> list of (class, lidar box (7,) float64 from rounded KITTI values, camera box (7,)), Placer."""
    objs = []
    placer = Placer()
    hw = layout.hw

    def put(cls, u, wl, yaw_rel, size=None, z_extra=0.0, tries=1, margin=0.25):
        l, w, h = size if size is not None else sample_size(rng, cls)
        x, y = layout.to_world(u, wl)
        heading = yaw_rel + layout.yaw
        if not placer.free(x, y, l, w, heading, margin):
            return False
        zb = float(layout.height(x, y)) + z_extra
        box = np.array([[x, y, zb + h / 2, l, w, h, heading]])
        cam = boxes3d_lidar_to_kitti_camera(box, calib)
        cam[:, 6] = (cam[:, 6] + math.pi) % (2 * math.pi) - math.pi
        cam = np.round(cam, 2)
        lid = boxes3d_kitti_camera_to_lidar(cam, calib)[0]
        placer.add(lid[0], lid[1], lid[3], lid[4], lid[6])
        objs.append((cls, lid, cam[0]))
        return True

    def vehicle_class():
        r = rng.random()
        return "Van" if r < 0.12 else ("Misc" if r < 0.15 else "Car")

    # trucks and trams first (non-target classes; they need the most room)
    if rng.random() < 0.35:
        side = -1.0 if rng.random() < 0.5 else 1.0
        for _t in range(6):
            l, w, h = sample_size(rng, "Truck")
            if put("Truck", float(rng.uniform(-20, 60)), side * (hw - w / 2 - 0.3), 0.0 if side < 0 else math.pi,
                   (l, w, h)):
                break
    if rng.random() < 0.08 and hw >= 4.5:
        for _t in range(4):
            if put("Tram", float(rng.uniform(10, 60)), float(rng.normal(0, 0.3)), 0.0 if rng.random() < 0.5 else
                   math.pi):
                break
    # parked rows along both kerbs (KITTI's residential streets), sometimes angled/perpendicular bays
    for side in (-1.0, 1.0):
        if rng.random() < (0.75 if not layout.rural else 0.2):
            u = float(rng.uniform(-25, 15))
            u_end = float(rng.uniform(35, 75))
            perp = rng.random() < 0.12 and hw > 5.5
            while u < u_end:
                cls = vehicle_class()
                l, w, h = sample_size(rng, cls)
                if in_cross(layout, u) or rng.random() < 0.12:
                    u += float(rng.uniform(3, 9))
                    continue
                if perp:
                    yaw_rel = side * math.pi / 2 + float(rng.normal(0, 0.08)) + (math.pi if rng.random() < 0.3 else 0)
                    wl = side * (hw - l / 2 - 0.2)
                    step = w
                else:
                    yaw_rel = (0.0 if rng.random() < 0.8 else math.pi) + float(rng.normal(0, 0.04))
                    if side > 0 and layout.two_way and rng.random() < 0.7:
                        yaw_rel += math.pi  # parked facing their side's driving direction
                    wl = side * (hw - w / 2 - float(rng.uniform(0.1, 0.45)))
                    step = l
                    if rng.random() < 0.06:  # pulling out / parked askew
                        yaw_rel += float(rng.uniform(-0.6, 0.6))
                        wl -= side * 0.5
                        step = l + 0.8
                put(cls, u + step / 2, wl, yaw_rel, (l, w, h))
                u += step + float(rng.uniform(0.4, 2.8))
    # moving traffic: same direction on the right lanes (w < 0 ahead), oncoming on the left
    lanes = [(-0.5 * hw, 0.0)] + ([(0.5 * hw, math.pi)] if layout.two_way else [(0.2 * hw, 0.0)])
    for _ in range(int(rng.integers(1, 7))):
        lw, yr = lanes[int(rng.integers(len(lanes)))]
        cls = "Car" if rng.random() < 0.85 else ("Van" if rng.random() < 0.6 else "Truck")
        for _t in range(6):
            if put(cls, float(rng.uniform(-30, 70)), lw + float(rng.normal(0, 0.35)), yr + float(rng.normal(0, 0.03))):
                break
    # cross street traffic (perpendicular cars)
    if layout.cross_u is not None:
        for _ in range(int(rng.integers(0, 4))):
            for _t in range(6):
                wl = float(rng.uniform(-hw - 25, hw + 25))
                if abs(wl) < hw + 0.5:
                    continue
                turn = float(rng.uniform(-0.8, 0.8)) if abs(wl) < hw + 8 and rng.random() < 0.3 else 0.0
                if put("Car", layout.cross_u + float(rng.normal(0, 0.4)) + (1.6 if rng.random() < 0.5 else -1.6),
                       wl, (math.pi / 2 if rng.random() < 0.5 else -math.pi / 2) + float(rng.normal(0, 0.05)) + turn):
                    break
    # pedestrians: on the sidewalks, walking along the street (or standing), some in groups, a few crossing
    n_ped = int(rng.integers(cfg.num_pedestrians[0], cfg.num_pedestrians[1] + 1))
    k = 0
    while k < n_ped:
        group = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        side = -1.0 if rng.random() < 0.5 else 1.0
        u0 = float(rng.uniform(3, 45))
        cross = rng.random() < 0.12
        base_yaw = (0.0 if rng.random() < 0.5 else math.pi) if not cross else side * -math.pi / 2
        for g in range(group):
            if k >= n_ped:
                break
            k += 1
            cls = "Person_sitting" if rng.random() < 0.04 else "Pedestrian"
            yaw = base_yaw + float(rng.normal(0, 0.25)) if rng.random() < 0.8 else float(rng.uniform(-math.pi, math.pi))
            for _t in range(8):
                if cross:
                    wl, zx = float(rng.uniform(-hw + 0.5, hw - 0.5)), 0.0
                else:
                    wl = side * (hw + float(rng.uniform(0.4, max(0.5, layout.sw - 0.4))))
                    zx = layout.curb
                if put(cls, u0 + 1.0 * g + float(rng.normal(0, 0.5)), wl + 0.7 * g * side * 0.3, yaw, z_extra=zx):
                    break
    # cyclists: near the kerb on the road (or a bike lane), along the road
    n_cyc = int(rng.integers(cfg.num_cyclists[0], cfg.num_cyclists[1] + 1))
    for _ in range(n_cyc):
        for _t in range(8):
            side = -1.0 if rng.random() < 0.6 else 1.0
            on_walk = rng.random() < 0.15
            wl = side * (hw + float(rng.uniform(0.5, max(0.6, layout.sw - 0.5)))) if on_walk else \
                side * (hw - float(rng.uniform(0.6, 1.8)))
            yaw = (0.0 if side < 0 else math.pi) if rng.random() < 0.85 else (math.pi if side < 0 else 0.0)
            if rng.random() < 0.08:
                yaw = side * -math.pi / 2
            if put("Cyclist", float(rng.uniform(2, 50)), wl, yaw + float(rng.normal(0, 0.08)),
                   z_extra=layout.curb if on_walk else 0.0):
                break
    # cyclists without a rider's pose: rows of parked bicycles at a rack on the sidewalk (labelled Misc; single parked
    # bikes are unlabelled street furniture, background_prims_v2) and people standing beside or pushing their bike (a
    # Pedestrian label beside a Misc bicycle). Neither is a Cyclist: the model has to learn that bicycles alone and a
    # person next to one are not a rider.
    if rng.random() < P_BICYCLE_RACK:
        side = -1.0 if rng.random() < 0.5 else 1.0
        u = float(rng.uniform(2, 40))
        wl = side * (hw + float(rng.uniform(0.9, max(1.0, layout.sw - 0.3))))
        along = rng.random() < 0.3  # bikes parked along the kerb instead of perpendicular to it
        for _ in range(int(rng.integers(2, 7))):
            size = bicycle_size(rng)
            yaw_rel = (0.0 if rng.random() < 0.5 else math.pi) if along else side * math.pi / 2
            put("Misc", u, wl, yaw_rel + float(rng.normal(0, 0.06)), size, z_extra=layout.curb, margin=0.05)
            u += (size[0] + 0.15 if along else size[1] + float(rng.uniform(0.1, 0.3)))
    for _ in range(int(rng.integers(0, 3))):
        side = -1.0 if rng.random() < 0.5 else 1.0
        on_walk = rng.random() < 0.7
        wl = side * (hw + float(rng.uniform(0.8, max(0.9, layout.sw - 0.6)))) if on_walk else side * (hw - 1.0)
        yaw_rel = (0.0 if rng.random() < 0.5 else math.pi) + float(rng.normal(0, 0.1))
        u = float(rng.uniform(3, 35))
        size = bicycle_size(rng)
        if put("Misc", u, wl, yaw_rel, size, z_extra=layout.curb if on_walk else 0.0, margin=0.1):
            # the person walks beside the bike's front half (hand on the bar), on either side
            off = (size[1] / 2 + 0.45) * (1.0 if rng.random() < 0.5 else -1.0)
            du, dw = 0.25 * size[0], off
            cu, sn = math.cos(yaw_rel), math.sin(yaw_rel)
            put("Pedestrian", u + cu * du - sn * dw, wl + sn * du + cu * dw, yaw_rel + float(rng.normal(0, 0.1)),
                z_extra=layout.curb if on_walk else 0.0, margin=0.0)
    return objs, placer


# a parked bicycle's box: length and width of city and trekking bikes (our assumption: 1.6 to 1.9 m wheelbase plus
# wheels, 0.5 to 0.7 m handlebar); the height follows from the frame build_bicycle draws (wheel radius 0.36 m, bar
# 0.35 m above the wheel tops). Narrower than every other Misc object (SIZE_MIN["Misc"] w = 0.8 m): object_prims_v2
# builds a Misc box narrower than that as a bicycle.
BICYCLE_MAX_W = 0.75
# share of scenes with a bicycle rack (our assumption: common in KITTI's city and campus drives)
P_BICYCLE_RACK = 0.3


def bicycle_size(rng) -> Tuple[float, float, float]:
    l = float(np.clip(rng.normal(1.76, 0.08), 1.6, 1.95))
    w = float(rng.uniform(0.5, BICYCLE_MAX_W))
    return (round(l, 2), round(w, 2), 1.15)


def build_parked_bicycle(b: Builder, l, w, h, rng):
    """A bicycle without a rider (frame, wheels, bar, saddle) inside its (l, w, h) box."""
    col = tuple(float(v) for v in rng.uniform(0.05, 0.8, 3))
    seat, _bar, _bb = build_bicycle(b, l, rng, col, w=w)
    b.box(seat + (0.0, 0.0, 0.03), (0.12, 0.07, 0.03), (0.08, 0.08, 0.08), 0.2)  # saddle
    return col


def object_prims_v2(prims: Prims, k: int, cls: str, box: np.ndarray, rng: np.random.Generator):
    """Primitives of object k, inside its label box -> (ids, main colour)."""
    x, y, z, l, w, h, yaw = (float(v) for v in box)
    b = Builder(prims, k, x, y, z - h / 2, yaw)
    if cls == "Car":
        col = build_car(b, l, w, h, rng, pick_paint(rng), "car")
    elif cls == "Van":
        col = build_car(b, l, w, h, rng, pick_paint(rng), "van")
    elif cls == "Truck":
        col = build_truck(b, l, w, h, rng, pick_paint(rng))
    elif cls == "Tram":
        col = build_tram(b, l, w, h, rng)
    elif cls == "Misc":
        col = build_parked_bicycle(b, l, w, h, rng) if w <= BICYCLE_MAX_W else build_misc(b, l, w, h, rng)
    elif cls == "Cyclist":
        col = build_cyclist(b, l, w, h, rng)
    else:
        col = build_person(b, l, w, h, rng, sitting=(cls == "Person_sitting"))
    return b.ids, tuple(float(c) for c in col)


# ----------------------------------------------------------------------------------------------- clutter
def _bg_box(prims, x, y, z0, z1, l, w, yaw, alb, refl, mat=MAT_OPAQUE):
    return prims.posed(2, rot_z(yaw), (x, y, 0.5 * (z0 + z1)), (l / 2, w / 2, 0.5 * (z1 - z0)), alb, refl, -1, mat)


def background_prims_v2(prims: Prims, rng: np.random.Generator, layout: LayoutV2, placer: Placer) -> List[List[int]]:
    """Sidewalks with kerbs, buildings, walls, fences, hedges, trees, bushes, poles, signs, bollards, parked bikes.
    Returns groups (lists of primitive ids) for the renderer."""
    groups: List[List[int]] = []
    hw, sw, yaw = layout.hw, layout.sw, layout.yaw

    def free(x, y, r):
        return placer.free(x, y, 2 * r, 2 * r, 0.0, margin=0.3)

    def add(ids):
        groups.append(ids if isinstance(ids, list) else [ids])

    seg = 12.0 if layout.hill_c != 0 else 60.0
    for side in (-1.0, 1.0):
        # raised sidewalk (curb) in segments that follow the road height
        if layout.curb > 0:
            u = -60.0
            while u < 110.0:
                L = seg
                if not in_cross(layout, u + L / 2) or layout.cross_u is None:
                    x, y = layout.to_world(u + L / 2, side * (hw + sw / 2))
                    zg = float(layout.height(x, y))
                    gray = float(rng.uniform(0.45, 0.65))
                    add(_bg_box(prims, x, y, zg - 0.4, zg + layout.curb, L, sw, yaw, (gray, gray * 0.98, gray * 0.95),
                                float(rng.uniform(0.2, 0.35))))
                u += L
        # frontage: buildings (urban) or vegetation / field (rural), with gaps and a cross street
        u = -70.0
        while u < 110.0:
            L = float(rng.uniform(8, 28))
            if in_cross(layout, u + L / 2) or in_cross(layout, u) or in_cross(layout, u + L):
                u += L
                continue
            setback = float(rng.uniform(1.0, 10.0)) if rng.random() < 0.75 else 0.0
            wfront = hw + sw + setback
            if layout.rural or rng.random() < 0.15:
                # vegetation band: hedge or a row of bushes
                D = float(rng.uniform(1.0, 4.0))
                x, y = layout.to_world(u + L / 2, side * (wfront + D / 2 + 0.5))
                zg = float(layout.height(x, y))
                g = float(rng.uniform(0.6, 1.2))
                add(_bg_box(prims, x, y, zg - 0.3, zg + float(rng.uniform(0.8, 3.0)), L, D, yaw,
                            (0.16 * g, 0.34 * g, 0.12 * g), float(rng.uniform(0.3, 0.5)), MAT_VEG))
            else:
                D, H = float(rng.uniform(8, 16)), float(rng.uniform(4, 22))
                x, y = layout.to_world(u + L / 2, side * (wfront + D / 2))
                zg = float(layout.height(x, y))
                tone = rng.uniform(0.25, 0.75)
                tint = rng.uniform(0.85, 1.1, 3)
                add(_bg_box(prims, x, y, zg - 1.0, zg + H, L, D, yaw + float(rng.normal(0, 0.02)),
                            tuple(np.clip(tone * tint, 0, 1)), float(rng.uniform(0.2, 0.5)), MAT_FACADE))
                if setback > 1.5:  # front garden: wall, fence or hedge along the sidewalk
                    r = rng.random()
                    xw, yw = layout.to_world(u + L / 2, side * (hw + sw + 0.15))
                    zg = float(layout.height(xw, yw)) + layout.curb
                    if r < 0.35:
                        add(_bg_box(prims, xw, yw, zg - 0.1, zg + float(rng.uniform(0.4, 1.8)), L * 0.95, 0.25, yaw,
                                    tuple(rng.uniform(0.4, 0.8, 3)), float(rng.uniform(0.25, 0.45))))
                    elif r < 0.7:
                        add(_bg_box(prims, xw, yw, zg, zg + float(rng.uniform(0.9, 1.8)), L * 0.95, 0.08, yaw,
                                    tuple(rng.uniform(0.15, 0.5, 3)), float(rng.uniform(0.3, 0.6)), MAT_FENCE))
                    else:
                        g = float(rng.uniform(0.6, 1.2))
                        add(_bg_box(prims, xw, yw + 0.0, zg - 0.1, zg + float(rng.uniform(0.8, 2.0)), L * 0.95,
                                    float(rng.uniform(0.6, 1.2)), yaw, (0.15 * g, 0.33 * g, 0.12 * g),
                                    float(rng.uniform(0.3, 0.5)), MAT_VEG))
            u += L + (float(rng.uniform(2, 10)) if rng.random() < 0.25 else 0.0)
        # street furniture along the kerb: trees, lamp posts, signs, bollards, bins, parked bicycles
        u = float(rng.uniform(-50, -30))
        while u < 90:
            wk = side * (hw + float(rng.uniform(0.3, 0.8)))
            x, y = layout.to_world(u, wk)
            zg = float(layout.height(x, y)) + layout.curb
            kind = rng.random()
            if math.hypot(x, y) > 3 and free(x, y, 0.5):
                if kind < 0.35:  # tree: trunk + 1-3 canopy ellipsoids (volumetric)
                    tr = float(rng.uniform(0.1, 0.25))
                    th = float(rng.uniform(1.8, 3.5))
                    ids = [prims.posed(3, np.eye(3), (x, y, zg + th / 2 - 0.2), (tr, tr, th / 2 + 0.2),
                                       (0.30, 0.22, 0.15), 0.35, -1, MAT_OPAQUE)]
                    for _ in range(int(rng.integers(1, 4))):
                        rr = float(rng.uniform(1.0, 2.6))
                        cx, cy = x + float(rng.normal(0, 0.5)), y + float(rng.normal(0, 0.5))
                        g = float(rng.uniform(0.6, 1.3))
                        ids.append(prims.posed(4, rot_z(float(rng.uniform(0, math.pi))),
                                               (cx, cy, zg + th + rr * 0.7), (rr, rr * float(rng.uniform(0.7, 1.0)),
                                                                              rr * float(rng.uniform(0.7, 1.1))),
                                               (0.14 * g, 0.32 * g, 0.10 * g), float(rng.uniform(0.3, 0.55)), -1,
                                               MAT_VEG))
                    add(ids)
                elif kind < 0.55:  # lamp post with an arm
                    ph = float(rng.uniform(5, 9))
                    pr = float(rng.uniform(0.06, 0.14))
                    ids = [prims.posed(3, np.eye(3), (x, y, zg + ph / 2 - 0.2), (pr, pr, ph / 2 + 0.2),
                                       (0.45, 0.46, 0.48), 0.45, -1)]
                    tip = np.array(layout.to_world(u, wk - side * 1.5))
                    a = np.array([tip[0] - x, tip[1] - y, 0.3])
                    ids.append(prims.posed(3, axis_frame(a), (0.5 * (x + tip[0]), 0.5 * (y + tip[1]), zg + ph - 0.1),
                                           (0.05, 0.05, 0.5 * float(np.linalg.norm(a))), (0.45, 0.46, 0.48), 0.45, -1))
                    add(ids)
                elif kind < 0.72:  # traffic sign: thin pole + retro-reflective plate
                    ph = float(rng.uniform(2.0, 3.2))
                    ids = [prims.posed(3, np.eye(3), (x, y, zg + ph / 2 - 0.1), (0.035, 0.035, ph / 2 + 0.1),
                                       (0.55, 0.56, 0.58), 0.5, -1)]
                    face = [(0.8, 0.1, 0.1), (0.1, 0.25, 0.7), (0.9, 0.85, 0.2), (0.9, 0.9, 0.9)][int(rng.integers(4))]
                    s = float(rng.uniform(0.25, 0.4))
                    ids.append(prims.posed(2, rot_z(yaw + math.pi / 2 + float(rng.normal(0, 0.3))),
                                           (x, y, zg + ph + s * 0.8), (0.02, s, s * 0.8), face, 0.95, -1, MAT_RETRO))
                    add(ids)
                elif kind < 0.85:  # bollard / bin / post box (pedestrian-sized false-positive bait)
                    hh = float(rng.uniform(0.5, 1.4))
                    rr = float(rng.uniform(0.08, 0.35))
                    col = tuple(rng.uniform(0.1, 0.8, 3))
                    if rng.random() < 0.5:
                        add(prims.posed(3, np.eye(3), (x, y, zg + hh / 2 - 0.05), (rr, rr, hh / 2 + 0.05), col,
                                        float(rng.uniform(0.2, 0.6)), -1))
                    else:
                        add(_bg_box(prims, x, y, zg - 0.05, zg + hh, 2 * rr, 2 * rr, yaw + float(rng.uniform(0, 3)),
                                    col, float(rng.uniform(0.2, 0.6))))
                elif kind < 0.92:  # parked bicycle (no rider: not a Cyclist, not labelled)
                    bl = float(rng.uniform(1.6, 1.8))
                    bb = Builder(prims, -1, x, y, zg, yaw + (math.pi / 2 if rng.random() < 0.6 else 0.0))
                    build_bicycle(bb, bl, rng, tuple(float(v) for v in rng.uniform(0.05, 0.8, 3)))
                    add(bb.ids)
                else:  # bush (volumetric)
                    rr = float(rng.uniform(0.4, 1.2))
                    g = float(rng.uniform(0.6, 1.2))
                    xb, yb = layout.to_world(u, side * (hw + sw - rr))
                    add(prims.posed(4, np.eye(3), (xb, yb, zg + rr * 0.6), (rr, rr, rr * 0.8),
                                    (0.15 * g, 0.36 * g, 0.12 * g), 0.4, -1, MAT_VEG))
            u += float(rng.uniform(5, 22))
    # a guard rail on rural roads
    if layout.rural and rng.random() < 0.6:
        side = -1.0 if rng.random() < 0.5 else 1.0
        x, y = layout.to_world(25.0, side * (hw + 0.6))
        zg = float(layout.height(x, y))
        add(_bg_box(prims, x, y, zg + 0.5, zg + 0.8, 120.0, 0.1, yaw, (0.6, 0.62, 0.64), 0.6))
    return groups
