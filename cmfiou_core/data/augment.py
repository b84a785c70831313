"""Training augmentation chain (the official CMF-IOU-MM ``DATA_AUGMENTOR`` list) on the combined 8-column cloud
``[x, y, z, i*10, R/3, G/3, B/3, flag]``.

All steps work on a ``dict`` sample (OpenPCDet ``data_dict`` style):

- ``points``: (N, C >= 8) float64 during augmentation (the dataset casts to float32 at the end); only x, y, z are
  changed; columns beyond 8 pass through untouched (tests use one to track points);
- ``gt_boxes`` (M, 7) float64 LiDAR boxes, ``gt_names`` (M,) str, ``valid_noise`` (M,) int (0 original, 1 pasted);
- optional ``calib`` and ``road_plane`` (rect-frame plane, for ``use_road_plane``);
- written here: ``aug_param`` = [rot, flip, scale] (world transforms, in the order applied), ``local_trans`` (3,).

Chain (``AugmentConfig`` defaults = CMF-IOU-MM): gt_sampling -> da_sampling (LiDAR-aware) -> random_local_noise ->
random_world_rotation -> random_world_flip -> random_world_scaling -> random_local_trans -> random_local_pyramid_aug
-> heading wrap to [-pi, pi).

Decisions (documented deviations / choices):
- DB sampling draws without replacement per call with the sample's RNG (OpenPCDet walks a shuffled list with a
  pointer; same distribution, no hidden sampler state, reproducible per seed).
- ``LIMIT_WHOLE_SCENE`` defaults to False (the model config's augmentor list replaces the base one and does not set
  it). Collision test = OpenPCDet: a sampled box is rejected if its rotated BEV IoU with an existing box **or any
  other sampled box of the same draw** is > 0 (both members of an overlapping pair are dropped).
- da_sampling: the VirConv quirk (``max_sampling_dis`` taken from ``MIN_SAMPLING_DIS``, so the x shift is always 0)
  is **reproduced** by default to match the official training; ``fix_sampling_dis: true`` uses MAX_SAMPLING_DIS.
  Azimuth uses atan2 (same as atan(y/x) in the camera FOV, x > 0).
- random_local_noise follows SECOND ``noise_per_object_v3_``: objects are processed one after the other (each sees
  the already moved boxes), the 100 tries of one object are tested at once; the first collision-free try wins;
  points inside the box enlarged by ``extra_width`` move rigidly with it; only ``valid_noise == 1`` boxes move.
- pyramid swap: the donor pyramid (same face index, another box) must hold >= ``swap_threshold`` points; its points
  are copied in normalised box coordinates into the recipient, whose own pyramid points are removed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..config import ConfigError, Section
from ..geometry.iou import boxes_iou_bev
from ..geometry.points_in_boxes import points_in_boxes_mask
from ..geometry.view_transform import inverse_view_transform, view_transform_points, x_trans_backward, \
    x_trans_forward


# ----------------------------------------------------------------------------------------------- helpers
def iou_bev_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    return boxes_iou_bev(torch.from_numpy(np.ascontiguousarray(a[:, :7], dtype=np.float64)),
                         torch.from_numpy(np.ascontiguousarray(b[:, :7], dtype=np.float64))).numpy()


def rotate_z(xyz: np.ndarray, angle: float) -> np.ndarray:
    """Counter-clockwise rotation about +z (OpenPCDet ``rotate_points_along_z`` semantics)."""
    c, s = math.cos(angle), math.sin(angle)
    out = xyz.copy()
    out[:, 0] = xyz[:, 0] * c - xyz[:, 1] * s
    out[:, 1] = xyz[:, 0] * s + xyz[:, 1] * c
    return out


def to_box_frame(xyz: np.ndarray, box: np.ndarray) -> np.ndarray:
    return rotate_z(xyz[:, :3] - box[:3], -float(box[6]))


def from_box_frame(local: np.ndarray, box: np.ndarray) -> np.ndarray:
    return rotate_z(local, float(box[6])) + box[:3]


def wrap_heading(h: np.ndarray) -> np.ndarray:
    """Wrap into [-pi, pi) (``limit_period(h, 0.5, 2 pi)``)."""
    return h - np.floor(h / (2 * np.pi) + 0.5) * 2 * np.pi


def enlarge_boxes(boxes: np.ndarray, extra: Sequence[float]) -> np.ndarray:
    out = boxes.copy()
    out[:, 3:6] += np.asarray(extra, dtype=np.float64)
    return out


# ----------------------------------------------------------------------------------------------- world transforms
def world_transform(points: np.ndarray, boxes: np.ndarray, rot: float, flip: float, scale: float):
    """The chain's world transform: rotation about z, then flip of y (if flip), then scaling -- the one
    [rot, flip, scale] transform of :mod:`cmfiou_core.geometry.view_transform`, in float64 (the model inverts
    ``aug_param`` with the same functions). Points (N, 3+C): only x, y, z change; boxes (M, 7).

    The rotation is a float64 matmul: where the BLAS fuses a multiply-add, a value may differ in its last bit from
    two separate products (``x c - y s``); the float32 samples the dataset returns are the same either way."""
    param = torch.tensor([rot, flip, scale], dtype=torch.float64)
    p = view_transform_points(torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64)), param)
    b = x_trans_forward(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64))[None], param[None])[0]
    return p.numpy(), b.numpy()


def inverse_world_transform(points: np.ndarray, boxes: np.ndarray, rot: float, flip: float, scale: float):
    """Exact inverse of :func:`world_transform` (scale^-1, flip, -rot); headings are returned unwrapped."""
    param = torch.tensor([rot, flip, scale], dtype=torch.float64)
    p = np.array(points, dtype=np.float64)
    p[:, :3] = inverse_view_transform(torch.from_numpy(p[:, :3].copy()), param).numpy()
    b = x_trans_backward(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64))[None], param[None])[0]
    return p, b.numpy()


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GTSamplingConfig:
    enabled: bool = True
    sample_groups: Tuple[Tuple[str, int], ...] = (("Car", 10), ("Pedestrian", 10), ("Cyclist", 10))
    min_points: Tuple[Tuple[str, int], ...] = (("Car", 5), ("Pedestrian", 5), ("Cyclist", 5))
    filter_difficulty: Tuple[int, ...] = (-1,)
    remove_extra_width: Tuple[float, float, float] = (0.0, 0.0, -0.2)
    use_road_plane: bool = True
    limit_whole_scene: bool = False


@dataclass(frozen=True)
class DASamplingConfig(GTSamplingConfig):
    vert_res: float = 0.006
    hor_res: float = 0.003
    occlusion_noise: float = 0.2
    occlusion_offset: float = 2.0
    min_sampling_dis: float = 0.0
    max_sampling_dis: float = 20.0
    fix_sampling_dis: bool = False  # False reproduces the VirConv quirk (x shift always 0)


@dataclass(frozen=True)
class AugmentConfig:
    gt_sampling: GTSamplingConfig = GTSamplingConfig()
    da_sampling: DASamplingConfig = DASamplingConfig()
    local_noise: bool = True
    local_rot_range: Tuple[float, float] = (-math.pi / 4, math.pi / 4)
    local_trans_std: Tuple[float, float, float] = (1.0, 1.0, 0.5)
    local_noise_tries: int = 100
    local_noise_extra_width: Tuple[float, float, float] = (0.2, 0.2, 0.0)
    world_rot_range: Tuple[float, float] = (-math.pi / 4, math.pi / 4)
    world_flip: bool = True
    world_scale_range: Tuple[float, float] = (0.95, 1.05)
    local_trans_range: Tuple[float, float, float] = (1.0, 1.0, 0.2)
    pyramid: bool = True
    pyramid_dropout_prob: float = 0.25
    pyramid_sparsify_prob: float = 0.05
    pyramid_sparsify_points: int = 50
    pyramid_swap_prob: float = 0.1
    pyramid_swap_threshold: int = 50
    # photometric domain randomisation of the pseudo points' colours (flag-1 rows, columns R/3, G/3, B/3), one draw
    # per frame after GT sampling, so pasted objects share the frame's camera: per-channel gains (white balance),
    # brightness, contrast about the frame's mean grey, saturation, grey images with photo_gray_prob, Gaussian noise
    # (8-bit units), clipped to the 8-bit range. Off by default (the demo checkpoint's recipe); issue 19's sim2real
    # runs turn it on (cmfiou-train --set data.augment.photometric=true). No random draw is made while it is off.
    photometric: bool = False
    photo_gain_range: Tuple[float, float] = (0.85, 1.15)
    photo_brightness_range: Tuple[float, float] = (0.6, 1.4)
    photo_contrast_range: Tuple[float, float] = (0.7, 1.3)
    photo_saturation_range: Tuple[float, float] = (0.5, 1.5)
    photo_gray_prob: float = 0.1
    photo_noise_std: float = 2.0

    @classmethod
    def from_dict(cls, data: Optional[dict], source: str = "<config>", path: str = "augment") -> "AugmentConfig":
        """Validated construction (unknown keys are errors). Keys = field names; ``gt_sampling``/``da_sampling`` are
        mappings with their field names (``sample_groups`` / ``min_points`` as {class: int})."""
        sec = Section(data, path, source)
        d = cls()

        def sampler(key, base):
            s = sec.sub(key)
            kw = {}
            for f in base.__dataclass_fields__:
                if not s.has(f):
                    continue
                v = s.raw(f, None)
                if f in ("sample_groups", "min_points"):
                    if not isinstance(v, dict) or not all(isinstance(x, int) and x >= 0 for x in v.values()):
                        raise ConfigError(f"{source}: '{s.path}.{f}' must map class names to ints >= 0, got {v!r}")
                    v = tuple((str(k), int(x)) for k, x in v.items())
                elif isinstance(getattr(base, f), tuple):
                    v = tuple(v)
                elif isinstance(getattr(base, f), bool):
                    v = s.bool(f)
                elif isinstance(getattr(base, f), float):
                    v = s.float(f)
                kw[f] = v
            s.finish()
            return type(base)(**{**base.__dict__, **kw})

        kw = {"gt_sampling": sampler("gt_sampling", d.gt_sampling), "da_sampling": sampler("da_sampling", d.da_sampling)}
        for f, default in d.__dict__.items():
            if f in kw or not sec.has(f):
                continue
            if isinstance(default, bool):
                kw[f] = sec.bool(f, default)
            elif isinstance(default, int):
                kw[f] = sec.int(f, default, min=0)
            elif isinstance(default, float):
                kw[f] = sec.float(f, default, min=0.0)
            else:
                kw[f] = tuple(sec.floats(f, list(default), length=len(default)))
        sec.finish()
        for f in ("photo_gain_range", "photo_brightness_range", "photo_contrast_range", "photo_saturation_range"):
            if f in kw and not 0.0 <= kw[f][0] <= kw[f][1]:
                raise ConfigError(f"{source}: '{path}.{f}' must be [low, high] with 0 <= low <= high, "
                                  f"got {list(kw[f])}")
        if kw.get("photo_gray_prob", 0.0) > 1.0:
            raise ConfigError(f"{source}: '{path}.photo_gray_prob' must be in [0, 1], got {kw['photo_gray_prob']}")
        return cls(**{**d.__dict__, **kw})


# ----------------------------------------------------------------------------------------------- GT database
class GTDatabase:
    """The JSON index + per-object ``.npy`` point files written by :mod:`cmfiou_core.data.gt_database`."""

    def __init__(self, root: Union[str, Path], index_file: Union[str, Path]):
        self.root = Path(root)
        index_file = Path(index_file)
        if not index_file.is_file():
            raise FileNotFoundError(f"GT database index not found: {index_file} (run cmfiou-create-infos)")
        data = json.loads(index_file.read_text())
        if not isinstance(data, dict) or "objects" not in data:
            raise ValueError(f"{index_file}: not a cmfiou GT database index (missing 'objects')")
        self.infos: Dict[str, List[dict]] = data["objects"]
        # where the objects' raw LiDAR rows came from: "bin" (float32), "velodyne_depth" (float16 file rows),
        # "none" (custom points_fn) or None (index written before this was recorded)
        self.raw_rows_from: Optional[str] = data.get("raw_rows_from")
        self._cache: Dict[str, np.ndarray] = {}

    def load(self, info: dict) -> np.ndarray:
        rel = info["path"]
        pts = self._cache.get(rel)
        if pts is None:
            pts = np.load(self.root / rel, allow_pickle=False)
            if pts.ndim != 2 or pts.shape[1] != 8:
                raise ValueError(f"{self.root / rel}: expected (K, 8) object points, got {pts.shape}")
            if len(self._cache) < 20000:
                self._cache[rel] = pts
        return pts


def _filtered(db: GTDatabase, cfg: GTSamplingConfig) -> Dict[str, List[dict]]:
    minp = dict(cfg.min_points)
    out = {}
    for cls, _n in cfg.sample_groups:
        lst = [i for i in db.infos.get(cls, []) if int(i["difficulty"]) not in cfg.filter_difficulty
               and int(i["num_points_in_gt"]) >= minp.get(cls, 0)]
        out[cls] = lst
    return out


def put_boxes_on_road_plane(boxes: np.ndarray, plane: np.ndarray, calib) -> Tuple[np.ndarray, np.ndarray]:
    """Move boxes vertically so their bottom lies on the road plane; returns (boxes, mv_height)."""
    a, b, c, d = (float(v) for v in plane)
    centre = calib.lidar_to_rect(boxes[:, :3].astype(np.float64))
    centre[:, 1] = (-d - a * centre[:, 0] - c * centre[:, 2]) / b
    ground_z = calib.rect_to_lidar(centre)[:, 2]
    mv = boxes[:, 2] - boxes[:, 5] / 2 - ground_z
    out = boxes.copy()
    out[:, 2] -= mv
    return out, mv


def lidar_aware_sample(pts: np.ndarray, box: np.ndarray, cfg: DASamplingConfig, rng: np.random.Generator
                       ) -> np.ndarray:
    """VirConv LiDAR-aware resampling of one pasted object's points (scene coordinates)."""
    xyz = pts[:, :3]
    r = np.linalg.norm(xyz, axis=1)
    theta = np.arccos(np.clip(xyz[:, 2] / np.maximum(r, 1e-9), -1, 1))
    phi = np.arctan2(xyz[:, 1], xyz[:, 0])
    ti = np.floor(theta / cfg.vert_res).astype(np.int64)
    pi = np.floor(phi / cfg.hor_res).astype(np.int64)
    key = (ti - ti.min()) * (pi.max() - pi.min() + 1) + (pi - pi.min()) if len(ti) else ti
    order = np.lexsort((theta, key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    kept = pts[np.sort(order[first])]
    if kept.shape[0] < 5:
        kept = pts
    local = to_box_frame(kept[:, :3], box)
    for _ in range(10):
        side = int(rng.integers(4))
        coord = local[:, 1] if side < 2 else local[:, 2]
        noisy = coord + rng.normal(0.0, cfg.occlusion_noise, coord.shape)
        m = noisy < cfg.occlusion_offset if side % 2 == 0 else noisy >= -cfg.occlusion_offset
        if m.sum() >= 5:
            return kept[m]
    return kept


def gt_sampling(d: dict, db: GTDatabase, cfg: GTSamplingConfig, rng: np.random.Generator,
                da: Optional[DASamplingConfig] = None, filtered: Optional[Dict[str, List[dict]]] = None) -> dict:
    """Paste DB objects (``gt_sampling``; with ``da`` the VirConv LiDAR-aware variant ``da_sampling``)."""
    if filtered is None:
        filtered = _filtered(db, cfg)
    boxes, names = d["gt_boxes"], d["gt_names"]
    existing = boxes[:, :7].copy()
    acc_boxes, acc_infos, acc_mv = [], [], []
    use_plane = cfg.use_road_plane and d.get("road_plane") is not None and d.get("calib") is not None
    for cls, group in cfg.sample_groups:
        n = int(group) - (int(np.sum(names == cls)) if cfg.limit_whole_scene else 0)
        pool = filtered.get(cls, [])
        if n <= 0 or not pool:
            continue
        idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        infos = [pool[i] for i in idx]
        sb = np.array([i["box3d_lidar"] for i in infos], dtype=np.float64).reshape(-1, 7)
        if da is not None:
            hi = da.max_sampling_dis if da.fix_sampling_dis else da.min_sampling_dis
            sb[:, 0] += rng.uniform(da.min_sampling_dis, hi, sb.shape[0]) if hi > da.min_sampling_dis else \
                da.min_sampling_dis
        mv = np.zeros(sb.shape[0])
        if use_plane:
            sb, mv = put_boxes_on_road_plane(sb, d["road_plane"], d["calib"])
        iou1 = iou_bev_np(sb, existing)
        iou2 = iou_bev_np(sb, sb)
        np.fill_diagonal(iou2, 0)
        m1 = iou1.max(axis=1) if iou1.shape[1] else np.zeros(sb.shape[0])
        m2 = iou2.max(axis=1) if iou2.shape[1] else np.zeros(sb.shape[0])
        valid = np.nonzero((m1 + m2) == 0)[0]
        for v in valid:
            acc_boxes.append(sb[v])
            acc_infos.append(infos[v])
            acc_mv.append(mv[v])
        existing = np.concatenate([existing, sb[valid]], 0)
    if not acc_boxes:
        return d
    sampled = np.array(acc_boxes).reshape(-1, 7)
    pts = d["points"]
    C = pts.shape[1]
    obj_pts = []
    for box, info, mv in zip(sampled, acc_infos, acc_mv):
        p = db.load(info).astype(np.float64)
        p[:, :3] += box[:3]  # stored centre-relative; the box only moved along x (da shift) and z (road plane)
        if da is not None:
            p = lidar_aware_sample(p, box, da, rng)
        full = np.zeros((p.shape[0], C))
        full[:, :8] = p
        if C > 8:
            full[:, 8:] = -1.0  # pasted points carry -1 in the pass-through columns
        obj_pts.append(full)
    large = enlarge_boxes(sampled, cfg.remove_extra_width)
    inside = points_in_boxes_mask(pts, large).any(axis=1)
    d["points"] = np.concatenate(obj_pts + [pts[~inside]], 0)
    d["gt_boxes"] = np.concatenate([boxes, sampled], 0)
    d["gt_names"] = np.concatenate([names, np.array([i["name"] for i in acc_infos])])
    d["valid_noise"] = np.concatenate([d["valid_noise"], np.ones(len(acc_infos), dtype=np.int64)])
    return d


# ----------------------------------------------------------------------------------------------- local noise
def random_local_noise(d: dict, cfg: AugmentConfig, rng: np.random.Generator) -> dict:
    boxes = d["gt_boxes"]
    M = boxes.shape[0]
    if M == 0:
        return d
    T = cfg.local_noise_tries
    rot = rng.uniform(cfg.local_rot_range[0], cfg.local_rot_range[1], (M, T))
    trans = rng.normal(0.0, 1.0, (M, T, 3)) * np.asarray(cfg.local_trans_std)
    pts = d["points"]
    inside = points_in_boxes_mask(pts, enlarge_boxes(boxes, cfg.local_noise_extra_width))
    owner = np.where(inside.any(1), inside.argmax(1), -1)
    cur = boxes.copy()
    for i in np.nonzero(d["valid_noise"] == 1)[0]:
        cand = np.repeat(cur[i:i + 1], T, 0)
        cand[:, :3] += trans[i]
        cand[:, 6] += rot[i]
        others = np.delete(cur, i, 0)
        coll = iou_bev_np(cand, others).max(1) > 0 if others.shape[0] else np.zeros(T, bool)
        ok = np.nonzero(~coll)[0]
        if ok.size == 0:
            continue
        k = ok[0]
        sel = owner == i
        if sel.any():
            local = pts[sel, :3] - cur[i, :3]
            pts[sel, :3] = rotate_z(local, rot[i, k]) + cur[i, :3] + trans[i, k]
        cur[i] = cand[k]
    d["gt_boxes"] = cur
    d["points"] = pts
    return d


# ----------------------------------------------------------------------------------------------- world
_GREY = np.array([0.299, 0.587, 0.114])   # ITU-R BT.601 luma weights


def random_photometric(d: dict, cfg: AugmentConfig, rng: np.random.Generator) -> dict:
    """The frame's pseudo-point colours (rows with flag 1: columns 4:7 hold R/3, G/3, B/3) through one random camera
    response (see ``AugmentConfig.photometric``); geometry, raw rows and flags are untouched."""
    pts = d["points"]
    ps = pts[:, 7] == 1
    gains = rng.uniform(cfg.photo_gain_range[0], cfg.photo_gain_range[1], 3)
    bright, contrast, sat = (rng.uniform(a, b) for a, b in (cfg.photo_brightness_range, cfg.photo_contrast_range,
                                                            cfg.photo_saturation_range))
    grey_img = rng.random() < cfg.photo_gray_prob
    noise_seed = int(rng.integers(2 ** 62))
    if not ps.any():
        return d
    c = pts[ps, 4:7] * 3.0                                 # 8-bit units
    c = c * gains[None] * bright
    grey = c @ _GREY
    c = grey.mean() + contrast * (c - grey.mean())
    grey = (c @ _GREY)[:, None]
    c = grey + (0.0 if grey_img else sat) * (c - grey)
    if cfg.photo_noise_std > 0:
        c = c + np.random.default_rng(noise_seed).normal(0.0, cfg.photo_noise_std, c.shape)
    pts = pts.copy()
    pts[ps, 4:7] = np.clip(c, 0.0, 255.0) / 3.0
    d["points"] = pts
    return d


def random_world(d: dict, cfg: AugmentConfig, rng: np.random.Generator) -> dict:
    rot = float(rng.uniform(*cfg.world_rot_range))
    flip = float(rng.random() < 0.5) if cfg.world_flip else 0.0
    scale = float(rng.uniform(*cfg.world_scale_range))
    d["points"], d["gt_boxes"] = world_transform(d["points"], d["gt_boxes"], rot, flip, scale)
    d["aug_param"] = np.array([rot, flip, scale], dtype=np.float64)
    return d


def random_local_trans(d: dict, cfg: AugmentConfig, rng: np.random.Generator) -> dict:
    shift = (rng.random(3) - 0.5) * np.asarray(cfg.local_trans_range)
    d["points"][:, :3] += shift
    d["gt_boxes"][:, :3] += shift
    d["local_trans"] = shift
    return d


# ----------------------------------------------------------------------------------------------- pyramids
def pyramid_labels(points: np.ndarray, boxes: np.ndarray):
    """-> (box index (N,) or -1, pyramid index (N,) in 0..5 (+x,-x,+y,-y,+z,-z), normalised local coords (N, 3))."""
    N = points.shape[0]
    inside = points_in_boxes_mask(points, boxes)
    owner = np.where(inside.any(1), inside.argmax(1), -1) if boxes.shape[0] else np.full(N, -1)
    norm = np.zeros((N, 3))
    pyr = np.full(N, -1)
    sel = np.nonzero(owner >= 0)[0]
    if sel.size:
        b = boxes[owner[sel]]
        rel = points[sel, :3] - b[:, :3]
        c, s = np.cos(-b[:, 6]), np.sin(-b[:, 6])
        loc = np.stack([rel[:, 0] * c - rel[:, 1] * s, rel[:, 0] * s + rel[:, 1] * c, rel[:, 2]], 1)
        nl = loc / (b[:, 3:6] / 2)
        ax = np.argmax(np.abs(nl), 1)
        neg = np.take_along_axis(nl, ax[:, None], 1)[:, 0] < 0
        pyr[sel] = ax * 2 + neg
        norm[sel] = nl
    return owner, pyr, norm


def random_local_pyramid_aug(d: dict, cfg: AugmentConfig, rng: np.random.Generator) -> dict:
    boxes = d["gt_boxes"]
    M = boxes.shape[0]
    if M == 0:
        return d
    pts = d["points"]
    # dropout
    owner, pyr, _ = pyramid_labels(pts, boxes)
    drop_box = rng.random(M) < cfg.pyramid_dropout_prob
    drop_pyr = rng.integers(0, 6, M)
    kill = (owner >= 0) & drop_box[np.maximum(owner, 0)] & (pyr == drop_pyr[np.maximum(owner, 0)])
    pts = pts[~kill]
    # sparsify
    owner, pyr, _ = pyramid_labels(pts, boxes)
    sp_box = rng.random(M) < cfg.pyramid_sparsify_prob
    sp_pyr = rng.integers(0, 6, M)
    cand = (owner >= 0) & sp_box[np.maximum(owner, 0)] & (pyr == sp_pyr[np.maximum(owner, 0)])
    if cand.any():
        idx = np.nonzero(cand)[0]
        grp = owner[idx]
        order = np.lexsort((rng.random(idx.size), grp))
        sg = grp[order]
        start = np.r_[0, np.nonzero(sg[1:] != sg[:-1])[0] + 1]
        counts = np.diff(np.r_[start, sg.size])
        rank = np.arange(sg.size) - np.repeat(start, counts)
        cnt = np.repeat(counts, counts)
        remove = (cnt > cfg.pyramid_sparsify_points) & (rank >= cfg.pyramid_sparsify_points)
        keep = np.ones(pts.shape[0], bool)
        keep[idx[order[remove]]] = False
        pts = pts[keep]
    # swap
    sw_box = np.nonzero(rng.random(M) < cfg.pyramid_swap_prob)[0]
    sw_pyr = rng.integers(0, 6, M)
    if sw_box.size and M > 1:
        owner, pyr, norm = pyramid_labels(pts, boxes)
        counts = np.zeros((M, 6), dtype=np.int64)
        np.add.at(counts, (owner[owner >= 0], pyr[owner >= 0]), 1)
        keep = np.ones(pts.shape[0], bool)
        new = []
        for i in sw_box:
            p = sw_pyr[i]
            donors = np.nonzero((counts[:, p] >= cfg.pyramid_swap_threshold) & (np.arange(M) != i))[0]
            if donors.size == 0:
                continue
            j = int(donors[rng.integers(donors.size)])
            keep &= ~((owner == i) & (pyr == p))
            src = np.nonzero((owner == j) & (pyr == p))[0]
            q = pts[src].copy()
            q[:, :3] = from_box_frame(norm[src] * (boxes[i, 3:6] / 2), boxes[i])
            new.append(q)
        pts = np.concatenate([pts[keep]] + new, 0)
    d["points"] = pts
    return d


# ----------------------------------------------------------------------------------------------- chain
class Augmentor:
    """The full chain; ``db`` may be None (then gt_sampling / da_sampling are skipped)."""

    def __init__(self, cfg: AugmentConfig = AugmentConfig(), db: Optional[GTDatabase] = None):
        self.cfg = cfg
        self.db = db
        self._f1 = _filtered(db, cfg.gt_sampling) if db is not None else None
        self._f2 = _filtered(db, cfg.da_sampling) if db is not None else None

    def __call__(self, d: dict, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        d["points"] = np.asarray(d["points"], dtype=np.float64)
        d["gt_boxes"] = np.asarray(d["gt_boxes"], dtype=np.float64)[:, :7].copy()
        d.setdefault("valid_noise", np.zeros(d["gt_boxes"].shape[0], dtype=np.int64))
        if self.db is not None and cfg.gt_sampling.enabled:
            d = gt_sampling(d, self.db, cfg.gt_sampling, rng, None, self._f1)
        if self.db is not None and cfg.da_sampling.enabled:
            d = gt_sampling(d, self.db, cfg.da_sampling, rng, cfg.da_sampling, self._f2)
        if cfg.photometric:
            d = random_photometric(d, cfg, rng)
        if cfg.local_noise:
            d = random_local_noise(d, cfg, rng)
        d = random_world(d, cfg, rng)
        d = random_local_trans(d, cfg, rng)
        if cfg.pyramid:
            d = random_local_pyramid_aug(d, cfg, rng)
        d["gt_boxes"][:, 6] = wrap_heading(d["gt_boxes"][:, 6])
        return d
