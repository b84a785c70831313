"""Sensor models of the generator: the KITTI camera calibration and image size, the HDL-64E-like LiDAR beam grid,
the screen blocks each sensor gives the ray caster, and the camera's per-pixel rays."""
from __future__ import annotations

import functools
import math

import numpy as np

from ...calib import Calibration
from .raycast import Buffers, Prims

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


# ----------------------------------------------------------------------------------------------- sensors
def lidar_grid(cfg):
    """(elevations, azimuths, (64, W, 3) unit directions) of ``cfg.azimuth_steps`` (a SceneConfig)."""
    return lidar_grid_cached(cfg.azimuth_steps)


@functools.lru_cache(maxsize=4)
def lidar_grid_cached(W: int):
    elev = hdl64_elevations()
    az = -math.pi + (np.arange(W) + 0.5) * (2 * math.pi / W)
    ce = np.cos(elev)[:, None]
    dirs = np.stack([ce * np.cos(az)[None], ce * np.sin(az)[None], np.broadcast_to(np.sin(elev)[:, None], (64, W))],
                    axis=-1)
    dirs.flags.writeable = False
    return elev, az, dirs


def lidar_block(prims: Prims, elev: np.ndarray, W: int, group):
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


def camera_block(prims: Prims, calib: Calibration, group, H: int, W: int):
    corners = prims.corners(group)
    rect = calib.lidar_to_rect(corners)
    uv, depth = calib.rect_to_img(rect)
    if np.all(depth <= 0.05):
        return None
    if np.any(depth <= 0.05):
        return np.arange(H), np.arange(W)
    return _pixel_window(uv, H, W)


def _pixel_window(uv: np.ndarray, H: int, W: int):
    """(rows, cols) of the pixels of the bounding box of ``uv`` (N, 2) with a 1-pixel margin, clipped to the image;
    None when it lies outside the image."""
    u0, u1 = int(math.floor(uv[:, 0].min())) - 1, int(math.ceil(uv[:, 0].max())) + 1
    v0, v1 = int(math.floor(uv[:, 1].min())) - 1, int(math.ceil(uv[:, 1].max())) + 1
    u0, v0, u1, v1 = max(u0, 0), max(v0, 0), min(u1, W - 1), min(v1, H - 1)
    if u0 > u1 or v0 > v1:
        return None
    return np.arange(v0, v1 + 1), np.arange(u0, u1 + 1)


def camera_rays(calib: Calibration, H: int, W: int):
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
def camera_rays_cached(H: int, W: int):
    centre, d = camera_rays(kitti_calibration(), H, W)
    d.flags.writeable = False
    return centre, d


def ground_hit(o: np.ndarray, dirs: np.ndarray, buf: Buffers, max_t: float):
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = (GROUND_Z - o[2]) / dirs[..., 2]
    tg = np.where((dirs[..., 2] < -1e-9) & (tg < max_t), tg, np.inf)
    buf.t[...] = tg
    buf.prim[...] = -1
    buf.normal[...] = (0.0, 0.0, 1.0)



_BOX_EDGES = np.array([(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)])


def camera_block_clipped(prims: Prims, calib: Calibration, group, H: int, W: int, near: float = 0.05):
    """As :func:`camera_block`, but a bounding box that reaches behind the camera is clipped at the near plane (its
    12 edges cut at depth ``near``) instead of giving the whole image: still conservative, much smaller for long
    primitives beside the car (sidewalks, buildings)."""
    corners = prims.corners(group).reshape(-1, 8, 3)
    rect = calib.lidar_to_rect(corners.reshape(-1, 3)).reshape(-1, 8, 3)
    pts = []
    for r in rect:
        z = r[:, 2]
        if np.all(z <= near):
            continue
        pts.append(r[z > near])
        a, b = r[_BOX_EDGES[:, 0]], r[_BOX_EDGES[:, 1]]
        za, zb = a[:, 2], b[:, 2]
        cross = (za - near) * (zb - near) < 0
        if cross.any():
            s = (near - za[cross]) / (zb[cross] - za[cross])
            pts.append(a[cross] + s[:, None] * (b[cross] - a[cross]))
    if not pts:
        return None
    p = np.concatenate(pts, 0)
    p[:, 2] = np.maximum(p[:, 2], near)
    uv, _ = calib.rect_to_img(p)
    return _pixel_window(uv, H, W)


def perturbed_kitti_calibration(rng: np.random.Generator) -> Calibration:
    """The 2011_09_26 calibration with the camera varied as between KITTI's recording days: focal length 707..722 px
    and principal point cx 598..612, cy 170..185 px (the span of the public per-day KITTI P2 matrices, 2011_09_26 to
    2011_10_03), and the camera's orientation relative to the LiDAR by N(0, 0.15 deg) per axis. Image size stays
    1242x375."""
    P2 = np.array(KITTI_P2, dtype=np.float64).reshape(3, 4)
    K = P2[:, :3].copy()
    t = np.linalg.solve(K, P2[:, 3])
    f = float(rng.uniform(707.0, 722.0))
    K2 = K.copy()
    K2[0, 0] = K2[1, 1] = f
    K2[0, 2] = float(rng.uniform(598.0, 612.0))
    K2[1, 2] = float(rng.uniform(170.0, 185.0))
    P2n = np.c_[K2, K2 @ t]
    a, b, c = np.deg2rad(rng.normal(0.0, 0.15, 3))
    Rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    Ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    Rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    Tr = np.array(KITTI_TR, dtype=np.float64).reshape(3, 4)
    D = Rx @ Ry @ Rz
    Tr2 = np.c_[D @ Tr[:, :3], D @ Tr[:, 3]]
    return Calibration(P2n, np.array(KITTI_R0), Tr2, IMAGE_W, IMAGE_H)
