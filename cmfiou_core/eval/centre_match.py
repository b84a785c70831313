"""Centre matching of confident detections against label_2: the diagnostics beside KITTI AP that say what a user sees
on a real recording (not a KITTI metric).

Detections with ``score >= score_min`` are matched one-to-one to the labelled objects of their frame by BEV centre
distance (camera x and z of the box centre), greedily in descending score, each detection taking the nearest free
object within the object's radius: ``vehicle_radius`` (2 m) for Car, Van, Truck and Tram, ``other_radius`` (1 m) for
every other type (Pedestrian, Person_sitting, Cyclist, Misc). DontCare regions are no objects. The match ignores the
classes; the report then says whether they agree. Reported:

- ``unmatched``: confident detections that matched no labelled object (of any type) -- a second detection on an object
  already taken counts here too (``duplicates``: those within reach of a taken object); ``unmatched_per_frame`` =
  ``unmatched`` / frames;
- per evaluated class (Car, Pedestrian, Cyclist; every labelled object of the class, all difficulties, as in
  :func:`kitti_eval.localization_quality`): ``num_gt``, ``found`` (matched), ``found_right_class`` (matched by a
  detection of that class), ``median_centre_error_m`` of the found ones;
- ``car_size``: for labelled cars matched by a Car detection, the median (and mean) absolute error of length, width and
  height (m), and the spread (standard deviation) of the detected and the labelled lengths -- a detector that gives
  every car one template size has a detected spread near 0 whatever the labels' spread.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

VEHICLES = ("Car", "Van", "Truck", "Tram")
EVALUATED = ("Car", "Pedestrian", "Cyclist")


def _stat(a: np.ndarray, fn) -> Optional[float]:
    return float(fn(a)) if a.size else None  # None, not NaN: the summary is strict JSON


def centre_match(gt_annos: Sequence[Dict[str, np.ndarray]], dt_annos: Sequence[Dict[str, np.ndarray]],
                 score_min: float = 0.5, vehicle_radius: float = 2.0, other_radius: float = 1.0) -> Dict[str, object]:
    """The report of the module doc for parallel per-frame annotation lists (``kitti_io`` layout)."""
    if len(gt_annos) != len(dt_annos):
        raise ValueError(f"{len(gt_annos)} ground-truth frames but {len(dt_annos)} prediction frames")
    if not (vehicle_radius > 0 and other_radius > 0):
        raise ValueError(f"radii must be positive, got {vehicle_radius} / {other_radius}")
    per = {c: {"num_gt": 0, "found": 0, "found_right_class": 0, "err": []} for c in EVALUATED}
    n_conf = unmatched = duplicates = 0
    size_err, det_len, gt_len = [], [], []
    for gt, dt in zip(gt_annos, dt_annos):
        gname = np.asarray(gt["name"]).astype(str)
        keep = gname != "DontCare"
        gname = gname[keep]
        gloc, gdim = np.asarray(gt["location"], float)[keep], np.asarray(gt["dimensions"], float)[keep]
        # box centre: the label's location is the bottom centre; x and z (BEV) do not depend on the height
        gxz = gloc[:, [0, 2]]
        radius = np.where(np.isin(gname, VEHICLES), vehicle_radius, other_radius)
        for c in EVALUATED:
            per[c]["num_gt"] += int((gname == c).sum())
        dscore = np.asarray(dt["score"], float)
        conf = np.nonzero(dscore >= score_min)[0]
        conf = conf[np.argsort(-dscore[conf], kind="stable")]
        n_conf += conf.size
        dname = np.asarray(dt["name"]).astype(str)
        dxz = np.asarray(dt["location"], float)[:, [0, 2]] if len(dname) else np.zeros((0, 2))
        ddim = np.asarray(dt["dimensions"], float) if len(dname) else np.zeros((0, 3))
        taken = np.zeros(len(gname), bool)
        for d in conf:
            dist = np.linalg.norm(gxz - dxz[d], axis=1) if len(gname) else np.zeros(0)
            reach = dist <= radius
            free = reach & ~taken
            if not free.any():
                unmatched += 1
                duplicates += int(reach.any())
                continue
            g = int(np.argmin(np.where(free, dist, np.inf)))
            taken[g] = True
            c = gname[g]
            if c in per:
                per[c]["found"] += 1
                per[c]["err"].append(float(dist[g]))
                if dname[d] == c:
                    per[c]["found_right_class"] += 1
                    if c == "Car":
                        # dimensions are (l, h, w): report l, w, h
                        size_err.append(np.abs(ddim[d] - gdim[g])[[0, 2, 1]])
                        det_len.append(ddim[d, 0])
                        gt_len.append(gdim[g, 0])
    n_frames = len(gt_annos)
    classes = {}
    for c, q in per.items():
        e = np.asarray(q["err"])
        classes[c] = {"num_gt": q["num_gt"], "found": q["found"], "found_right_class": q["found_right_class"],
                      "found_share": q["found"] / q["num_gt"] if q["num_gt"] else None,
                      "median_centre_error_m": _stat(e, np.median)}
    se = np.asarray(size_err).reshape(-1, 3)
    car_size = {"matched": int(se.shape[0]),
                "median_abs_error_lwh_m": [float(x) for x in np.median(se, 0)] if se.size else None,
                "mean_abs_error_lwh_m": [float(x) for x in se.mean(0)] if se.size else None,
                "detected_length_std_m": _stat(np.asarray(det_len), np.std),
                "labelled_length_std_m": _stat(np.asarray(gt_len), np.std)}
    return {"score_min": score_min, "radius_m": {"vehicles": vehicle_radius, "others": other_radius},
            "vehicle_types": list(VEHICLES), "frames": n_frames, "confident_detections": int(n_conf),
            "unmatched": int(unmatched), "duplicates": int(duplicates),
            "unmatched_per_frame": unmatched / n_frames if n_frames else None, "classes": classes,
            "car_size": car_size}
