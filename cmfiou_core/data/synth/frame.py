"""One generated frame: scene sampling, LiDAR + camera simulation through the ray caster, and KITTI labels derived
from what the sensors see."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

from ...calib import Calibration
from ...geometry.boxes import boxes3d_kitti_camera_to_imageboxes, boxes_to_corners_3d
from ..labels import dontcare_line, format_label_line
from .raycast import Buffers, Prims, render
from .scene import (PROFILES, SceneConfig, background_prims, ground_material, object_prims, sample_layout,
                    sample_objects)
from .sensors import (GROUND_Z, IMAGE_H, IMAGE_W, camera_block, camera_rays_cached, ground_hit, lidar_block,
                      lidar_grid, kitti_calibration)


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


def generate_frame(seed: int, index: int, cfg: SceneConfig = SceneConfig()) -> SyntheticFrame:
    """Frame ``index`` of dataset ``seed`` with the generator profile ``cfg.profile`` ('v1' default, 'kitti_v2')."""
    if cfg.profile == "kitti_v2":
        from .frame_v2 import generate_frame_v2

        return generate_frame_v2(seed, index, cfg)
    if cfg.profile != "v1":
        raise ValueError(f"unknown generator profile {cfg.profile!r} (expected one of {', '.join(PROFILES)})")
    rng = np.random.default_rng([int(seed), int(index)])
    calib = kitti_calibration()
    layout = sample_layout(rng)
    objs, circles = sample_objects(rng, layout, cfg, calib)
    prims = Prims()
    groups: List[List[int]] = []
    colours = []
    for k, (cls, box, _cam) in enumerate(objs):
        ids, col = object_prims(prims, k, cls, box, rng)
        groups.append(ids)
        colours.append(col)
    for p in background_prims(prims, rng, layout, circles):
        groups.append([p])
    albedo_tab = np.array(prims.albedo, dtype=np.float64).reshape(-1, 3)
    refl_tab = np.array(prims.refl, dtype=np.float64)
    obj_tab = np.array(prims.obj, dtype=np.int32)

    # ---------------- LiDAR
    elev, az, ldirs = lidar_grid(cfg)
    W = cfg.azimuth_steps
    o = np.zeros(3)
    lb = Buffers((64, W))
    ground_hit(o, ldirs, lb, cfg.max_range)
    render(prims, groups, o, ldirs, lambda g: lidar_block(prims, elev, W, g), lb)
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
        _, grefl = ground_material(layout, pts[..., 0][gmask], pts[..., 1][gmask])
        refl[gmask] = grefl
    inten = refl * (0.35 + 0.65 * cosi) * np.exp(-rr / 200.0) + rng.normal(0.0, cfg.intensity_noise, t.shape)
    inten = np.clip(inten, 0.0, 0.99)
    # KITTI-like order: azimuth-major (one column after another), beams top to bottom
    sel = valid.T
    points = np.concatenate([pts.transpose(1, 0, 2)[sel], inten.T[sel][:, None]], 1).astype(np.float32)
    pobj = np.where(lb.prim >= 0, obj_tab[np.maximum(lb.prim, 0)] if obj_tab.size else -1, -1).T[sel]

    # ---------------- camera
    H, Wi = IMAGE_H, IMAGE_W
    co, cdirs = camera_rays_cached(H, Wi)
    cb = Buffers((H, Wi))
    ground_hit(co, cdirs, cb, 400.0)
    own = render(prims, groups, co, cdirs, lambda g: camera_block(prims, calib, g, H, Wi), cb)
    hit = np.isfinite(cb.t)
    P = co + cdirs * np.where(hit, cb.t, 0.0)[..., None]
    alb = np.zeros((H, Wi, 3))
    on_prim = hit & (cb.prim >= 0)
    if albedo_tab.size:
        alb[on_prim] = albedo_tab[cb.prim[on_prim]]
    g = hit & (cb.prim < 0)
    alb[g], _ = ground_material(layout, P[..., 0][g], P[..., 1][g])
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
    boxes, lines, labelled, occl, vfrac, bbox2d = make_labels(objs, own, pix_obj, calib, cfg, H, Wi)
    plane = road_plane(calib)
    return SyntheticFrame(points=points, image=image, calib=calib, label_text="\n".join(lines) + ("\n" if lines else ""),
                          plane=plane, names=[c for c, _, _ in objs], boxes_lidar=boxes, labelled=labelled,
                          occluded=occl, visible_fraction=vfrac, colours=colours, point_object=pobj.astype(np.int32),
                          pixel_object=pix_obj, bbox2d=bbox2d)


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

