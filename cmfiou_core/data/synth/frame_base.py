"""What every generator profile's frame shares: the ``SyntheticFrame`` record, the objects' primitives and their tables
(``object_primitives``, ``prim_tables``), KITTI labels from what the camera sees (``make_labels``) and the road plane
(``road_plane``). ``frame`` (v1) and ``frame_v2`` (kitti_v2) both import it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

from ...calib import Calibration
from ...geometry.boxes import boxes3d_kitti_camera_to_imageboxes, boxes_to_corners_3d
from ..labels import dontcare_line, format_label_line
from .raycast import Prims
from .sensors import GROUND_Z


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
    extras: dict = field(default_factory=dict)  # profile-specific outputs (kitti_v2: per-ray / per-point materials)


def object_primitives(objs, rng: np.random.Generator, build) -> Tuple[Prims, List[List[int]], list]:
    """A new ``Prims`` holding the objects ``objs`` [(class, lidar box, camera box)], each built by the profile's
    ``build(prims, k, class, box, rng)`` in order. -> (prims, one list of primitive ids per object, main albedo per
    object)."""
    prims = Prims()
    groups: List[List[int]] = []
    colours = []
    for k, (cls, box, _cam) in enumerate(objs):
        ids, col = build(prims, k, cls, box, rng)
        groups.append(ids)
        colours.append(col)
    return prims, groups, colours


def prim_tables(prims: Prims) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per primitive: albedo (P, 3) and reflectivity (P,) float64, object index (P,) int32 (-1 background)."""
    return (np.array(prims.albedo, dtype=np.float64).reshape(-1, 3), np.array(prims.refl, dtype=np.float64),
            np.array(prims.obj, dtype=np.int32))


def make_labels(objs, own, pix_obj: np.ndarray, calib: Calibration, cfg, H: int, Wi: int):
    """KITTI label lines of the generated objects ``objs`` [(class, lidar box, rounded camera box)] from what the
    camera sees: ``own[k]`` = pixels object k covers on its own, ``pix_obj`` = object index per visible pixel.
    -> (lidar boxes (M, 7), lines (DontCare last), labelled (M,), occlusion (M,), visible fraction (M,), 2D boxes)."""
    n_obj = len(objs)
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
    return boxes, lines, labelled, occl, vfrac, bbox2d


def road_plane(calib: Calibration) -> np.ndarray:
    """Ground z = GROUND_Z (LiDAR) as a rect-frame plane a x + b y + c z + d = 0, normal pointing up (b < 0)."""
    R = calib.V2R
    n = R[:3, :3] @ np.array([0.0, 0.0, 1.0])
    p = R[:3, :3] @ np.array([0.0, 0.0, GROUND_Z]) + R[:3, 3]
    d = -float(n @ p)
    return np.array([n[0], n[1], n[2], d])

