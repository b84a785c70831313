"""Synthetic KITTI-like ground truth + predictions (for the evaluator benchmark and tests; no real data needed)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

_TYPES = np.array(["Car", "Van", "Pedestrian", "Person_sitting", "Cyclist", "Truck", "DontCare"])
_P = np.array([0.55, 0.06, 0.15, 0.02, 0.07, 0.03, 0.12])
_DIMS = {"Car": (1.5, 1.6, 3.9), "Van": (2.2, 1.9, 5.0), "Pedestrian": (1.75, 0.6, 0.8),
         "Person_sitting": (1.2, 0.6, 0.8), "Cyclist": (1.7, 0.6, 1.8), "Truck": (3.2, 2.5, 10.0),
         "DontCare": (-1, -1, -1)}
_F = 721.5377


def _bbox(loc, dims_hwl, ry):
    """Approximate 2D box from a pinhole projection of the box extent (enough for synthetic data)."""
    h, w, l = dims_hwl
    x, y, z = loc
    ext = 0.5 * (abs(l * np.cos(ry)) + abs(w * np.sin(ry)))
    z = max(z, 1.0)
    u1, u2 = _F * (x - ext) / z + 609.6, _F * (x + ext) / z + 609.6
    v1, v2 = _F * (y - h) / z + 172.9, _F * y / z + 172.9
    x1, y1 = min(max(u1, 0.0), 1241.0), min(max(v1, 0.0), 374.0)
    return [x1, y1, max(min(max(u2, 0.0), 1241.0), x1), max(min(max(v2, 0.0), 374.0), y1)]


def make_frame(rng: np.random.Generator, n_obj: int) -> Dict[str, np.ndarray]:
    names = rng.choice(_TYPES, size=n_obj, p=_P)
    rows = []
    for nm in names:
        if nm == "DontCare":
            u1, v1 = rng.uniform(0, 1150), rng.uniform(150, 200)
            rows.append((nm, -1, -1, -10, [u1, v1, u1 + rng.uniform(5, 80), v1 + rng.uniform(5, 40)],
                         (-1, -1, -1), (-1000, -1000, -1000), -10))
            continue
        h, w, l = np.array(_DIMS[nm]) * rng.uniform(0.9, 1.1, 3)
        loc = (rng.uniform(-15, 15), rng.uniform(1.4, 1.9), rng.uniform(4, 70))
        ry = rng.uniform(-np.pi, np.pi)
        trunc = float(rng.choice([0.0, 0.0, 0.0, 0.2, 0.4, 0.7]))
        occ = int(rng.integers(0, 4))
        alpha = ry - np.arctan2(loc[0], loc[2])
        rows.append((nm, trunc, occ, alpha, _bbox(loc, (h, w, l), ry), (h, w, l), loc, ry))
    return _to_anno(rows, np.zeros(len(rows)))


def _to_anno(rows, score):
    if not rows:
        from .kitti_io import empty_annotations

        return empty_annotations()
    return {"name": np.array([r[0] for r in rows], dtype="<U16"),
            "truncated": np.array([r[1] for r in rows], float), "occluded": np.array([r[2] for r in rows], float),
            "alpha": np.array([r[3] for r in rows], float), "bbox": np.array([r[4] for r in rows], float),
            "dimensions": np.array([[r[5][2], r[5][0], r[5][1]] for r in rows], float),
            "location": np.array([r[6] for r in rows], float), "rotation_y": np.array([r[7] for r in rows], float),
            "score": np.asarray(score, float)}


def make_predictions(rng: np.random.Generator, gt: Dict[str, np.ndarray], n_fp: int, p_miss: float = 0.15,
                     noise: float = 0.15) -> Dict[str, np.ndarray]:
    rows, scores = [], []
    m = np.isin(gt["name"], ["Car", "Pedestrian", "Cyclist", "Van"])
    for i in np.nonzero(m)[0]:
        if rng.random() < p_miss:
            continue
        nm = str(gt["name"][i])
        nm = "Car" if nm == "Van" else nm
        l, h, w = gt["dimensions"][i] * rng.normal(1, noise / 3, 3)
        loc = gt["location"][i] + rng.normal(0, noise, 3) * [1, 0.3, 1]
        ry = gt["rotation_y"][i] + rng.normal(0, noise)
        bbox = np.array(gt["bbox"][i]) + rng.normal(0, 10 * noise, 4)
        bbox = [bbox[0], bbox[1], max(bbox[2], bbox[0]), max(bbox[3], bbox[1])]
        rows.append((nm, -1, -1, gt["alpha"][i] + rng.normal(0, noise), bbox, (h, w, l), tuple(loc), ry))
        scores.append(float(rng.uniform(0.3, 1.0)))
    for _ in range(n_fp):
        nm = str(rng.choice(["Car", "Pedestrian", "Cyclist"], p=[0.7, 0.2, 0.1]))
        h, w, l = np.array(_DIMS[nm]) * rng.uniform(0.9, 1.1, 3)
        loc = (rng.uniform(-15, 15), rng.uniform(1.4, 1.9), rng.uniform(4, 70))
        ry = rng.uniform(-np.pi, np.pi)
        rows.append((nm, -1, -1, ry - np.arctan2(loc[0], loc[2]), _bbox(loc, (h, w, l), ry), (h, w, l), loc, ry))
        scores.append(float(rng.uniform(0.0, 0.6)))
    return _to_anno(rows, np.array(scores))


def make_dataset(n_frames: int = 3769, seed: int = 0, mean_obj: float = 9.0, n_fp: int = 20
                 ) -> Tuple[List[Dict[str, np.ndarray]], List[Dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    gts = [make_frame(rng, int(rng.poisson(mean_obj))) for _ in range(n_frames)]
    dts = [make_predictions(rng, g, int(rng.poisson(n_fp))) for g in gts]
    return gts, dts
