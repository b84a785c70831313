"""One frame of the ``kitti_v2`` profile: the v2 scene (``scene_v2``) seen by an HDL-64E model and a KITTI camera model,
with seeded domain randomisation of both sensors.

LiDAR (Velodyne HDL-64E S2 as mounted on the KITTI car):
- 64 lasers: upper block 32 at +2.0..-8.33 deg, lower block 32 at -8.83..-24.9 deg (the datasheet's +2 / -24.8 deg
  vertical field of view, ~1/3 deg and ~1/2 deg spacing), each laser's elevation jittered per frame by N(0, 0.03 deg)
  (calibration spread between units); 2083 azimuth steps (~0.17 deg at 10 Hz); 1.73 m above the road; 120 m range;
- a return needs enough reflected power: p(return) = (1 - base) (1 - exp(-k rho sqrt(cos i) (50 m / r)^2)) with the
  material reflectivity rho and the incidence i; glass (car windows, shop windows) returns nothing, fences let half the
  beams through, vegetation returns from inside its volume (range pushed by an exponential depth), retro-reflective
  signs always return; beams grazing a depth edge sometimes report a range between the two surfaces (mixed pixels);
- range noise N(0, sigma), sigma 0.8-2.5 cm (datasheet: < 2 cm 1 sigma); intensity = rho (0.5 + 0.5 cos i) x gain in
  [0, 1) (a weak incidence term: the sensor's per-laser intensity calibration, rough surfaces), retro-reflectors
  near 1, as KITTI's.
Camera: KITTI P2/R0/Tr, 1242x375, focal length, principal point and mount angles varied per frame; sun direction and overcast, cast shadows of objects and buildings on the ground,
sky reflections on glass, exposure, white balance, gamma, vignetting, blur and noise, all drawn per frame.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np

from .frame_base import SyntheticFrame, make_labels, object_primitives, prim_tables, road_plane
from .raycast import Buffers, render
from .scene_v2 import (MAT_FACADE, MAT_FENCE, MAT_GLASS, MAT_RETRO, MAT_VEG, LayoutV2, background_prims_v2,
                       object_prims_v2, sample_layout_v2, sample_objects_v2)
from .sensors import (GROUND_Z, IMAGE_H, IMAGE_W, camera_block_clipped, camera_rays, hdl64_elevations, lidar_block,
                      perturbed_kitti_calibration)

GROUND_MAT = -1  # material code of ground hits in ray_material
NO_HIT = -2


def ground_hit_v2(layout: LayoutV2, o: np.ndarray, dirs: np.ndarray, buf: Buffers, max_t: float) -> None:
    """Nearest hit of rays o + t d with the road surface: the plane z = GROUND_Z up to u0, then the parabolic hill
    z = GROUND_Z + c (u - u0)^2 along the road direction, plus small sinusoidal bumps (first order along the ray)."""
    c_, s_ = math.cos(layout.yaw), math.sin(layout.yaw)
    dz = dirs[..., 2]
    du = c_ * dirs[..., 0] + s_ * dirs[..., 1]
    uo = c_ * o[0] + s_ * o[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = (GROUND_Z - o[2]) / dz
    c = layout.hill_c
    before_hill = (uo + tp * du <= layout.hill_u0) if c != 0.0 else True
    tp = np.where((dz < -1e-9) & before_hill, tp, np.inf)
    t = tp
    if c != 0.0:
        e = uo - layout.hill_u0
        A = c * du * du
        B = 2 * c * e * du - dz
        C = c * e * e + GROUND_Z - o[2]
        disc = B * B - 4 * A * C
        ok = disc >= 0
        sq = np.sqrt(np.where(ok, disc, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            safeA = np.where(np.abs(A) < 1e-15, np.nan, A)
            r1 = (-B - sq) / (2 * safeA)
            r2 = (-B + sq) / (2 * safeA)
            lin = -C / B  # A ~ 0 (ray across the road direction)
        cands = []
        for r in (r1, r2, lin):
            good = ok & np.isfinite(r) & (r > 1e-4) & (uo + r * du > layout.hill_u0)
            cands.append(np.where(good, r, np.inf))
        th = np.minimum(np.minimum(cands[0], cands[1]), np.where(np.abs(A) < 1e-15, cands[2], np.inf))
        t = np.minimum(t, th)
    hit = np.isfinite(t)
    P = o + dirs * np.where(hit, t, 0.0)[..., None]
    bump = layout.bump(P[..., 0], P[..., 1])
    t = np.where(hit, t - np.clip(bump / np.maximum(-dz, 0.03), -0.6, 0.6), np.inf)
    t = np.where(t < max_t, t, np.inf)
    buf.t[...] = t
    buf.prim[...] = -1
    # normal of the hill (bumps ignored in the shading)
    if c == 0.0:
        buf.normal[...] = (0.0, 0.0, 1.0)
        return
    uh = c_ * P[..., 0] + s_ * P[..., 1]
    g = 2 * c * np.maximum(uh - layout.hill_u0, 0.0)
    inv = 1.0 / np.sqrt(1.0 + g * g)
    buf.normal[..., 0] = -g * c_ * inv
    buf.normal[..., 1] = -g * s_ * inv
    buf.normal[..., 2] = inv


def ground_material_v2(layout: LayoutV2, x: np.ndarray, y: np.ndarray, rng_tex: np.ndarray):
    """Ground albedo (K, 3) and reflectivity (K,): asphalt with texture and patches, lane markings, a gutter line,
    verge (grass / gravel) beyond the sidewalks."""
    u, w = layout.to_road(x, y)
    aw = np.abs(w)
    ti = np.mod(np.floor(u * 6).astype(np.int64), 256)
    tj = np.mod(np.floor(w * 6).astype(np.int64), 256)
    tex = layout.tex[ti, tj]
    patch = rng_tex[np.mod(np.floor(u / 3).astype(np.int64), 64), np.mod(np.floor(w / 3).astype(np.int64), 64)]
    road = aw < layout.hw
    a = layout.road_alb * (0.8 + 0.25 * tex + 0.2 * (patch - 0.5))
    alb = np.stack([a, a, a * 1.02], -1)
    refl = layout.road_refl * (0.85 + 0.3 * tex)
    verge = ~road
    g = 0.8 + 0.4 * tex[verge]
    alb[verge] = np.stack([0.26 * g, 0.36 * g, 0.17 * g], -1)
    refl[verge] = 0.35 + 0.1 * tex[verge]
    edge = road & (np.abs(aw - (layout.hw - 0.35)) < 0.07)
    centre = road & (aw < 0.07) & (np.mod(u, 9.0) < 3.0) & layout.two_way
    mark = (edge | centre) & (tex > 0.08)  # worn paint
    alb[mark] = (0.85, 0.85, 0.82)
    refl[mark] = 0.55 + 0.2 * tex[mark]
    return alb, refl


def _facade_windows(layout: LayoutV2, P: np.ndarray, period: float, storey: float) -> np.ndarray:
    """Window mask on building facades at hit points P (K, 3): a grid along the road and over the storeys."""
    u, w = layout.to_road(P[:, 0], P[:, 1])
    zr = P[:, 2] - GROUND_Z
    fu = np.mod((u + w) / period, 1.0)  # along the facade, for faces along and across the road
    fz = np.mod((zr - 0.9) / storey, 1.0)
    return (fu > 0.25) & (fu < 0.7) & (fz > 0.3) & (fz < 0.75) & (zr > 1.2)


def _shadow_mask(P: np.ndarray, L: np.ndarray, boxes: List[tuple]) -> np.ndarray:
    """Ground points P (K, 3) in the shadow of upright boxes (x, y, z0, z1, l, w, yaw): the sun ray from P, taken at
    the box's mid height, falls inside its footprint. Per box only the points in the x interval its shadow can reach
    are tested (points sorted by x once)."""
    sh = np.zeros(P.shape[0], bool)
    if L[2] <= 0.05 or not len(P):
        return sh
    order = np.argsort(P[:, 0], kind="stable")
    xs = P[order, 0]
    zmin = float(P[:, 2].min())
    for x, y, z0, z1, l, w, yaw in boxes:
        reach = max(0.5 * (z0 + z1) - zmin, 0.0) / L[2]
        r = 0.5 * math.hypot(l, w) + 0.5
        xa, xb = min(x - r, x - r - reach * L[0]), max(x + r, x + r - reach * L[0])
        i0, i1 = np.searchsorted(xs, xa), np.searchsorted(xs, xb, side="right")
        if i1 <= i0:
            continue
        idx = order[i0:i1]
        Q = P[idx]
        s = (0.5 * (z0 + z1) - Q[:, 2]) / L[2]
        qx, qy = Q[:, 0] + s * L[0] - x, Q[:, 1] + s * L[1] - y
        c, sn = math.cos(yaw), math.sin(yaw)
        m = (np.abs(c * qx + sn * qy) <= l / 2) & (np.abs(-sn * qx + c * qy) <= w / 2) & (s > 0)
        sh[idx[m]] = True
    return sh


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable [1 2 1] / 4 blur (lens softness), borders kept."""
    out = img.copy()
    out[1:-1] += out[1:-1]
    out[1:-1] += img[:-2]
    out[1:-1] += img[2:]
    out[1:-1] *= 0.25
    o2 = out.copy()
    o2[:, 1:-1] += o2[:, 1:-1]
    o2[:, 1:-1] += out[:, :-2]
    o2[:, 1:-1] += out[:, 2:]
    o2[:, 1:-1] *= 0.25
    return o2


def generate_frame_v2(seed: int, index: int, cfg) -> SyntheticFrame:
    rng = np.random.default_rng([int(seed), int(index), 2])
    calib = perturbed_kitti_calibration(rng)
    layout = sample_layout_v2(rng)
    objs, placer = sample_objects_v2(rng, layout, calib, cfg)
    prims, groups, colours = object_primitives(objs, rng, object_prims_v2)
    n_obj = len(objs)
    groups += background_prims_v2(prims, rng, layout, placer)
    albedo_tab, refl_tab, obj_tab = prim_tables(prims)
    mat_tab = np.array(prims.mat, dtype=np.int32)
    rng_tex = rng.random((64, 64))
    # ---- domain randomisation of the sensors (per frame)
    drop_base = float(rng.uniform(0.0, 0.05))
    k_ret = float(rng.uniform(12.0, 30.0))
    sigma_r = float(rng.uniform(0.008, 0.025))
    gain = float(rng.uniform(0.85, 1.15))
    p_mix = float(rng.uniform(0.05, 0.3))
    win_period, win_storey = float(rng.uniform(1.8, 3.6)), float(rng.uniform(2.8, 3.6))

    # ---------------- LiDAR
    W = cfg.azimuth_steps
    elev = hdl64_elevations() + np.deg2rad(rng.normal(0.0, 0.03, 64))
    az = -math.pi + (np.arange(W) + 0.5) * (2 * math.pi / W)
    ce = np.cos(elev)[:, None]
    ldirs = np.stack([ce * np.cos(az)[None], ce * np.sin(az)[None], np.broadcast_to(np.sin(elev)[:, None], (64, W))],
                     axis=-1)
    o = np.zeros(3)
    lb = Buffers((64, W))
    ground_hit_v2(layout, o, ldirs, lb, cfg.max_range)
    render(prims, groups, o, ldirs, lambda g: lidar_block(prims, elev, W, g), lb, sub_blocks=True)
    t = lb.t
    hit = np.isfinite(t) & (t < cfg.max_range)
    on_prim = hit & (lb.prim >= 0)
    pi = np.maximum(lb.prim, 0)
    mat = np.where(on_prim, mat_tab[pi] if mat_tab.size else 0, np.where(hit, GROUND_MAT, NO_HIT))
    P = ldirs * np.where(hit, t, 0.0)[..., None]
    refl = np.zeros(t.shape)
    if refl_tab.size:
        refl[on_prim] = refl_tab[pi[on_prim]]
    gmask = hit & (lb.prim < 0)
    if gmask.any():
        _, grefl = ground_material_v2(layout, P[..., 0][gmask], P[..., 1][gmask], rng_tex)
        refl[gmask] = grefl
    fac = mat == MAT_FACADE
    if fac.any():
        win = _facade_windows(layout, P[fac], win_period, win_storey)
        m2 = mat[fac]
        m2[win] = MAT_GLASS
        mat[fac] = m2
    cosi = np.abs(np.sum(lb.normal * ldirs, -1))
    r = np.where(hit, t, 1.0)
    p_ret = (1.0 - drop_base) * (1.0 - np.exp(-k_ret * refl * np.sqrt(cosi) * (50.0 / np.maximum(r, 1.0)) ** 2))
    p_ret = np.where(mat == MAT_RETRO, 1.0, p_ret)
    p_ret = np.where(mat == MAT_FENCE, 0.5 * p_ret, p_ret)
    p_ret = np.where(mat == MAT_VEG, 0.65 * p_ret, p_ret)  # gaps between leaves
    u_ret = rng.random(t.shape)
    valid = hit & (mat != MAT_GLASS) & (u_ret < p_ret)
    depth_in = rng.exponential(0.45, t.shape)
    noise = rng.normal(0.0, sigma_r, t.shape)
    rr = np.where(valid, t + noise + np.where(mat == MAT_VEG, np.minimum(depth_in, 1.5), 0.0), 0.0)
    # mixed pixels: a beam that grazes a depth edge (its azimuth neighbour is > 0.5 m farther) sometimes reports a
    # range between the two surfaces (points floating behind object edges, as real scans have)
    tt = np.where(hit, t, 0.0)
    tn = np.roll(tt, -1, axis=1)
    mix = valid & np.roll(hit, -1, axis=1) & (tn - tt > 0.5) & (rng.random(t.shape) < p_mix)
    rr = np.where(mix, tt + rng.random(t.shape) * (tn - tt), rr)
    pts = ldirs * rr[..., None]
    inten = refl * (0.5 + 0.5 * cosi) * gain + rng.normal(0.0, 0.02, t.shape)
    inten = np.where(mat == MAT_RETRO, 0.9 + 0.09 * rng.random(t.shape), inten)
    inten = np.clip(inten, 0.0, 0.99)
    sel = valid.T
    points = np.concatenate([pts.transpose(1, 0, 2)[sel], inten.T[sel][:, None]], 1).astype(np.float32)
    pobj = np.where(on_prim & ~mix, obj_tab[pi] if obj_tab.size else -1, -1).T[sel]
    pmat = mat.T[sel]

    # ---------------- camera
    H, Wi = IMAGE_H, IMAGE_W
    co, cdirs = camera_rays(calib, H, Wi)
    cb = Buffers((H, Wi))
    ground_hit_v2(layout, co, cdirs, cb, 400.0)
    own = render(prims, groups, co, cdirs, lambda g: camera_block_clipped(prims, calib, g, H, Wi), cb,
                 sub_blocks=True)
    chit = np.isfinite(cb.t)
    CP = co + cdirs * np.where(chit, cb.t, 0.0)[..., None]
    alb = np.zeros((H, Wi, 3))
    c_on = chit & (cb.prim >= 0)
    cpi = np.maximum(cb.prim, 0)
    cmat = np.where(c_on, mat_tab[cpi] if mat_tab.size else 0, -1)
    if albedo_tab.size:
        alb[c_on] = albedo_tab[cb.prim[c_on]]
    gpix = chit & (cb.prim < 0)
    alb[gpix], _ = ground_material_v2(layout, CP[..., 0][gpix], CP[..., 1][gpix], rng_tex)
    fpix = cmat == MAT_FACADE
    if fpix.any():
        win = _facade_windows(layout, CP[fpix], win_period, win_storey)
        a2 = alb[fpix]
        a2[win] = (0.10, 0.12, 0.15)
        alb[fpix] = a2
        m2 = cmat[fpix]
        m2[win] = MAT_GLASS
        cmat[fpix] = m2
    spix = c_on & (cmat != MAT_GLASS) & (cmat != MAT_VEG)
    if spix.any():  # fine surface texture (dirt, grain) on every opaque primitive
        q = CP[spix]
        ts = rng_tex[np.mod(np.floor(q[:, 0] * 9 + q[:, 2] * 11).astype(np.int64), 64),
                     np.mod(np.floor(q[:, 1] * 9 - q[:, 2] * 7).astype(np.int64), 64)]
        alb[spix] *= (0.9 + 0.2 * ts)[:, None]
    vpix = cmat == MAT_VEG
    if vpix.any():
        q = CP[vpix]
        tv = rng_tex[np.mod(np.floor(q[:, 0] * 7 + q[:, 2] * 5).astype(np.int64), 64),
                     np.mod(np.floor(q[:, 1] * 7 - q[:, 2] * 3).astype(np.int64), 64)]
        alb[vpix] *= (0.55 + 0.9 * tv)[:, None]
    # light
    overcast = rng.random() < 0.35
    sun_az, sun_el = rng.uniform(-math.pi, math.pi), rng.uniform(0.25, 1.1)
    L = np.array([math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el)])
    amb, direct = (0.7, 0.25) if overcast else (float(rng.uniform(0.22, 0.38)), float(rng.uniform(0.6, 0.85)))
    lit = np.clip(cb.normal @ L, 0.0, 1.0)
    if not overcast and gpix.any():
        casters = []
        for k in range(len(prims.kind)):
            if prims.kind[k] >= 2 and (prims.obj[k] >= 0 or prims.mat[k] in (MAT_FACADE, MAT_VEG)):
                cx, cy, cz, dx, dy, dz, _ = prims.bounding_box(k)
                if dz > 0.3:
                    casters.append((cx, cy, cz - dz / 2, cz + dz / 2, dx * 0.85, dy * 0.85, 0.0))
        gp = CP[gpix]
        near = np.hypot(gp[:, 0], gp[:, 1]) < 90
        shadow = np.zeros(gp.shape[0], bool)
        shadow[near] = _shadow_mask(gp[near], L, casters)
        lg = lit[gpix]
        lg[shadow] = 0.0
        lit[gpix] = lg
    shade = amb + direct * lit
    fog = np.exp(-np.where(chit, cb.t, 0.0) / float(rng.uniform(250, 600)))[..., None]
    if overcast:
        g0 = float(rng.uniform(0.7, 0.9))
        sky_top, sky_hor = np.array([g0, g0, g0 * 1.02]), np.array([g0 + 0.08, g0 + 0.08, g0 + 0.09])
    else:
        sky_top = np.array([0.30, 0.50, 0.85]) * rng.uniform(0.85, 1.1)
        sky_hor = np.array([0.80, 0.86, 0.93]) * rng.uniform(0.9, 1.05)
    sky_w = np.clip(cdirs[..., 2:3] * 4.0, 0.0, 1.0)
    sky = sky_hor * (1 - sky_w) + sky_top * sky_w
    rgb = alb * shade[..., None]
    gl = cmat == MAT_GLASS
    if gl.any():  # glass: dark, mirrors the sky at grazing angles (Schlick-like)
        cosv = np.abs(np.sum(cb.normal[gl] * cdirs[gl], -1))
        fr = 0.08 + 0.6 * (1 - cosv) ** 3
        rgb[gl] = rgb[gl] * (1 - fr)[:, None] + fr[:, None] * sky_hor[None] * 0.8
    rgb = np.where(chit[..., None], rgb * fog + sky * (1 - fog), sky).astype(np.float32)
    exposure = float(rng.uniform(0.7, 1.15))
    wb = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    gamma = float(rng.uniform(0.9, 1.15))
    rgb *= np.float32(255.0 * exposure) * wb
    np.clip(rgb, 0.0, 255.0, out=rgb)
    if abs(gamma - 1.0) > 0.02:
        rgb = (np.float32(255.0) * (rgb / np.float32(255.0)) ** np.float32(1.0 / gamma)).astype(np.float32)
    vig = float(rng.uniform(0.0, 0.3))
    xx = ((np.arange(Wi, dtype=np.float32) - Wi / 2) / (Wi / 2)) ** 2
    yy = ((np.arange(H, dtype=np.float32) - H / 2) / (Wi / 2)) ** 2
    rgb *= (1.0 - vig * (yy[:, None] + xx[None, :]))[..., None]
    if rng.random() < 0.6:
        rgb = _blur3(rgb)
    sig_read, sig_shot = float(rng.uniform(1.5, 5.0)), float(rng.uniform(0.0, 0.25))
    noise = rng.standard_normal(rgb.shape, dtype=np.float32)
    noise *= np.sqrt(np.float32(sig_read ** 2) + np.float32(sig_shot ** 2) * rgb)
    rgb += noise
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    pix_obj = np.where(c_on, obj_tab[cpi] if obj_tab.size else -1, -1).astype(np.int32)

    boxes, lines, labelled, occl, vfrac, bbox2d = make_labels(objs, own, pix_obj, calib, cfg, H, Wi)
    fr = SyntheticFrame(points=points, image=image, calib=calib, label_text="\n".join(lines) + ("\n" if lines else ""),
                        plane=road_plane(calib), names=[c for c, _, _ in objs], boxes_lidar=boxes, labelled=labelled,
                        occluded=occl, visible_fraction=vfrac, colours=colours, point_object=pobj.astype(np.int32),
                        pixel_object=pix_obj, bbox2d=bbox2d)
    fr.extras = {"profile": "kitti_v2", "ray_material": mat.astype(np.int8), "point_material": pmat.astype(np.int8),
                 "ray_range": np.where(hit, t, np.inf), "ray_returned": valid,
                 "elevations": elev, "n_objects": n_obj, "layout": layout, "prims": prims}
    return fr
