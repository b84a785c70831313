"""One generated frame: scene sampling, LiDAR + camera simulation through the ray caster, and KITTI labels derived
from what the sensors see."""
from __future__ import annotations

import math

import numpy as np

from .frame_base import SyntheticFrame  # noqa: F401 (re-exported)
from .frame_base import make_labels, object_primitives, prim_tables, road_plane
from .raycast import Buffers, render
from .scene import (PROFILES, SceneConfig, background_prims, ground_material, object_prims, sample_layout,
                    sample_objects)
from .sensors import (IMAGE_H, IMAGE_W, camera_block, camera_rays_cached, ground_hit, lidar_block,
                      lidar_grid, kitti_calibration)


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
    prims, groups, colours = object_primitives(objs, rng, object_prims)
    for p in background_prims(prims, rng, layout, circles):
        groups.append([p])
    albedo_tab, refl_tab, obj_tab = prim_tables(prims)

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
