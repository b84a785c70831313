"""KITTI ``label_2`` text files: parsing with validation, writing, and the OpenPCDet ``annos`` dict layout.

One object per line (KITTI object devkit readme)::

    type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry [score]

15 fields for ground truth, 16 for results (``score``). ``annos`` follows OpenPCDet ``get_infos``:
``dimensions`` are stored as **(l, h, w)** (the file order is h, w, l), ``location`` is the bottom centre in the
rectified camera frame.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")


class LabelError(ValueError):
    """A label line/file is malformed; the message names the file, line and field."""


def _f(tok: str, name: str, where: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise LabelError(f"{where}: field '{name}' is not a number: {tok!r}") from None
    if not np.isfinite(v):
        raise LabelError(f"{where}: field '{name}' is not finite: {tok!r}")
    return v


def parse_label_line(line: str, where: str = "<label>") -> Dict[str, object]:
    """Parse one line -> dict(name, truncated, occluded, alpha, bbox(4), dimensions_hwl(3), location(3), rotation_y,
    score). Raises :class:`LabelError` with the reason."""
    tok = line.split()
    if len(tok) not in (15, 16):
        raise LabelError(f"{where}: expected 15 fields (ground truth) or 16 (with score), got {len(tok)}: {line!r}")
    name = tok[0]
    if name not in KITTI_TYPES:
        raise LabelError(f"{where}: unknown object type {name!r} (expected one of {', '.join(KITTI_TYPES)})")
    trunc = _f(tok[1], "truncated", where)
    occ_f = _f(tok[2], "occluded", where)
    if occ_f != int(occ_f) or int(occ_f) not in (-1, 0, 1, 2, 3):
        raise LabelError(f"{where}: field 'occluded' must be an integer in {{-1, 0, 1, 2, 3}}, got {tok[2]!r}")
    alpha = _f(tok[3], "alpha", where)
    bbox = [_f(t, n, where) for t, n in zip(tok[4:8], ("x1", "y1", "x2", "y2"))]
    hwl = [_f(t, n, where) for t, n in zip(tok[8:11], ("h", "w", "l"))]
    loc = [_f(t, n, where) for t, n in zip(tok[11:14], ("x", "y", "z"))]
    ry = _f(tok[14], "rotation_y", where)
    score = _f(tok[15], "score", where) if len(tok) == 16 else -1.0
    if name != "DontCare":
        if not (-1e-6 <= trunc <= 1.0 + 1e-6):
            raise LabelError(f"{where}: 'truncated' must be in [0, 1], got {trunc}")
        if min(hwl) < 0:
            raise LabelError(f"{where}: dimensions h w l must be >= 0, got {hwl}")
        if abs(ry) > np.pi + 1e-2 or abs(alpha) > np.pi + 1e-2:
            raise LabelError(f"{where}: 'alpha'/'rotation_y' must be in [-pi, pi], got {alpha}, {ry}")
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise LabelError(f"{where}: 2D box must have x2 >= x1 and y2 >= y1, got {bbox}")
    return {"name": name, "truncated": trunc, "occluded": int(occ_f), "alpha": alpha, "bbox": bbox,
            "dimensions_hwl": hwl, "location": loc, "rotation_y": ry, "score": score}


def read_label_file(path: Union[str, Path]) -> List[Dict[str, object]]:
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"label file not found: {path}")
    objs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            objs.append(parse_label_line(line, f"{path}:{lineno}"))
    return objs


def kitti_level(obj: Dict[str, object]) -> int:
    """OpenPCDet ``Object3d.get_kitti_obj_level``: 0 easy, 1 moderate, 2 hard, -1 unknown (height = y2 - y1 + 1)."""
    h = obj["bbox"][3] - obj["bbox"][1] + 1
    t, o = obj["truncated"], obj["occluded"]
    if h >= 40 and t <= 0.15 and o <= 0:
        return 0
    if h >= 25 and t <= 0.3 and o <= 1:
        return 1
    if h >= 25 and t <= 0.5 and o <= 2:
        return 2
    return -1


def objects_to_annos(objs: List[Dict[str, object]]) -> Dict[str, np.ndarray]:
    """OpenPCDet ``annos`` dict (without the LiDAR-dependent keys ``gt_boxes_lidar`` / ``num_points_in_gt``)."""
    n = len(objs)
    a = {
        "name": np.array([o["name"] for o in objs], dtype="<U16"),
        "truncated": np.array([o["truncated"] for o in objs], dtype=np.float64).reshape(n),
        "occluded": np.array([o["occluded"] for o in objs], dtype=np.int64).reshape(n),
        "alpha": np.array([o["alpha"] for o in objs], dtype=np.float64).reshape(n),
        "bbox": np.array([o["bbox"] for o in objs], dtype=np.float64).reshape(n, 4),
        # (l, h, w) like OpenPCDet
        "dimensions": np.array([[o["dimensions_hwl"][2], o["dimensions_hwl"][0], o["dimensions_hwl"][1]]
                                for o in objs], dtype=np.float64).reshape(n, 3),
        "location": np.array([o["location"] for o in objs], dtype=np.float64).reshape(n, 3),
        "rotation_y": np.array([o["rotation_y"] for o in objs], dtype=np.float64).reshape(n),
        "score": np.array([o["score"] for o in objs], dtype=np.float64).reshape(n),
        "difficulty": np.array([kitti_level(o) for o in objs], dtype=np.int64).reshape(n),
    }
    num_objects = int(np.sum(a["name"] != "DontCare"))
    a["index"] = np.array(list(range(num_objects)) + [-1] * (n - num_objects), dtype=np.int64)
    return a


def _fmt(v: float, nd: int = 2) -> str:
    s = f"{v:.{nd}f}"
    return "0.00" if s in ("-0.00",) else s


def format_label_line(name: str, truncated: float, occluded: int, alpha: float, bbox, dimensions_hwl, location,
                      rotation_y: float, score: Optional[float] = None) -> str:
    """One KITTI line with the usual precision (2 decimals; score 4 decimals)."""
    if name not in KITTI_TYPES:
        raise LabelError(f"unknown object type {name!r}")
    parts = [name, _fmt(truncated), str(int(occluded)), _fmt(alpha)]
    parts += [_fmt(v) for v in bbox] + [_fmt(v) for v in dimensions_hwl] + [_fmt(v) for v in location]
    parts.append(_fmt(rotation_y))
    if score is not None:
        parts.append(f"{score:.4f}")
    return " ".join(parts)


def dontcare_line(bbox) -> str:
    return format_label_line("DontCare", -1, -1, -10, bbox, (-1, -1, -1), (-1000, -1000, -1000), -10)


def annos_to_text(annos: Dict[str, np.ndarray], with_score: bool = False) -> str:
    """Inverse of :func:`objects_to_annos` (dimensions (l, h, w) -> file order h w l)."""
    lines = []
    for i in range(len(annos["name"])):
        l, h, w = annos["dimensions"][i]
        lines.append(format_label_line(str(annos["name"][i]), annos["truncated"][i], int(annos["occluded"][i]),
                                       annos["alpha"][i], annos["bbox"][i], (h, w, l), annos["location"][i],
                                       annos["rotation_y"][i], annos["score"][i] if with_score else None))
    return "\n".join(lines) + ("\n" if lines else "")


def write_label_file(path: Union[str, Path], annos: Dict[str, np.ndarray], with_score: bool = False) -> Path:
    path = Path(path)
    path.write_text(annos_to_text(annos, with_score))
    return path
