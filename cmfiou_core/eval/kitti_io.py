"""KITTI object label / result files: strict parsing with clear errors, and writing result lines.

Label line (devkit readme): ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry [score]`` (15 fields for ground
truth, 16 for results). Parsed annotations are plain dicts of numpy arrays (float64) with OpenPCDet's field layout:
``name`` (N,) str, ``truncated``, ``occluded``, ``alpha``, ``bbox`` (N, 4), ``dimensions`` (N, 3) **(l, h, w)**,
``location`` (N, 3) camera bottom centre, ``rotation_y``, ``score``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")


class KittiFormatError(ValueError):
    """A malformed label/result file; the message names the file, the line and the problem."""


def empty_annotations() -> Dict[str, np.ndarray]:
    z = np.zeros((0,), np.float64)
    return {"name": np.zeros((0,), dtype="<U16"), "truncated": z, "occluded": z, "alpha": z,
            "bbox": np.zeros((0, 4)), "dimensions": np.zeros((0, 3)), "location": np.zeros((0, 3)),
            "rotation_y": z, "score": z}


def parse_kitti_text(text: str, source: str = "<text>", is_result: bool = False) -> Dict[str, np.ndarray]:
    """Parse label_2 text (``is_result=False``: 15 fields, a 16th score column is accepted) or result text (16 fields).

    Checks: field count, known type names (exact KITTI spelling), numbers parse and are finite, bbox x2 >= x1 and
    y2 >= y1, positive dimensions for every type but DontCare, occlusion in {-1, 0, 1, 2, 3}.
    """
    names: List[str] = []
    rows: List[List[float]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}:{lineno}"
        if is_result and len(parts) != 16:
            raise KittiFormatError(f"{where}: a result line needs 16 fields (type, truncated, occluded, alpha, "
                                   f"4 bbox, h w l, x y z, ry, score); got {len(parts)}: {line[:80]!r}")
        if not is_result and len(parts) not in (15, 16):
            raise KittiFormatError(f"{where}: a label line needs 15 fields (16 with a score); got {len(parts)}: "
                                   f"{line[:80]!r}")
        name = parts[0]
        if name not in KITTI_TYPES:
            raise KittiFormatError(f"{where}: unknown object type {name!r} (expected one of {', '.join(KITTI_TYPES)})")
        try:
            vals = [float(x) for x in parts[1:]]
        except ValueError:
            bad = next(x for x in parts[1:] if not _is_float(x))
            raise KittiFormatError(f"{where}: non-numeric field {bad!r}") from None
        if not all(math.isfinite(v) for v in vals):
            raise KittiFormatError(f"{where}: NaN or inf in a numeric field")
        if len(vals) == 14:
            vals.append(0.0)
        x1, y1, x2, y2 = vals[3:7]
        if x2 < x1 or y2 < y1:
            raise KittiFormatError(f"{where}: bbox has right < left or bottom < top ({x1}, {y1}, {x2}, {y2})")
        if name != "DontCare" and min(vals[7:10]) <= 0:
            raise KittiFormatError(f"{where}: dimensions h w l must be positive for {name}, got {vals[7:10]}")
        if vals[1] not in (-1.0, 0.0, 1.0, 2.0, 3.0):
            raise KittiFormatError(f"{where}: occluded must be one of -1, 0, 1, 2, 3; got {parts[2]!r}")
        names.append(name)
        rows.append(vals)
    if not rows:
        return empty_annotations()
    a = np.asarray(rows, dtype=np.float64)
    return {"name": np.asarray(names, dtype="<U16"), "truncated": a[:, 0], "occluded": a[:, 1], "alpha": a[:, 2],
            "bbox": a[:, 3:7], "dimensions": a[:, [9, 7, 8]],  # file h w l -> (l, h, w)
            "location": a[:, 10:13], "rotation_y": a[:, 13], "score": a[:, 14]}


def _is_float(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def read_kitti_file(path: Union[str, Path], is_result: bool = False) -> Dict[str, np.ndarray]:
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise KittiFormatError(f"{path}: not a text file") from None
    return parse_kitti_text(text, str(path), is_result)


def read_ids(path: Union[str, Path]) -> List[str]:
    """An ImageSets-style id list (one id per line; blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise KittiFormatError(f"id list not found: {path}")
    ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    for i, x in enumerate(ids, 1):
        if any(c in x for c in "/\\") or x.startswith("."):
            raise KittiFormatError(f"{path}:{i}: invalid frame id {x!r}")
    return ids


def load_folder(folder: Union[str, Path], ids: Optional[Sequence[str]], is_result: bool,
                allow_missing: bool = False) -> List[Dict[str, np.ndarray]]:
    """Read ``<folder>/<id>.txt`` for every id (all ``*.txt`` sorted when ``ids`` is None).

    A missing file is an error; for predictions (``is_result``) ``allow_missing`` counts it as a frame with no
    detections instead (a dropped frame is all false negatives, never skipped). Ground truth is never optional.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KittiFormatError(f"folder not found: {folder}")
    if ids is None:
        ids = sorted(p.stem for p in folder.glob("*.txt"))
        if not ids:
            raise KittiFormatError(f"{folder}: no *.txt files")
    out, missing = [], []
    for i in ids:
        p = folder / f"{i}.txt"
        if p.is_file():
            out.append(read_kitti_file(p, is_result))
        else:
            missing.append(i)
            out.append(empty_annotations())
    if missing and not is_result:
        raise KittiFormatError(f"{folder}: ground truth missing for {len(missing)} of {len(ids)} frames (first: "
                               f"{missing[0]}.txt): every evaluated frame needs its label file")
    if missing and not allow_missing:
        raise KittiFormatError(f"{folder}: {len(missing)} of {len(ids)} prediction files missing (first: "
                               f"{missing[0]}.txt); pass --allow-missing to count them as frames without detections")
    return out


# ---------------------------------------------------------------------------------------------- writing results
def format_result_lines(names, alpha, bbox, dimensions_lhw, location, rotation_y, score) -> str:
    """KITTI result text, OpenPCDet's format: ``name -1 -1 alpha x1 y1 x2 y2 h w l x y z ry score`` (%.4f)."""
    lines = []
    bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
    dims = np.asarray(dimensions_lhw, np.float64).reshape(-1, 3)
    loc = np.asarray(location, np.float64).reshape(-1, 3)
    for k, name in enumerate(names):
        lines.append("%s -1 -1 %.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f" % (
            name, alpha[k], bbox[k, 0], bbox[k, 1], bbox[k, 2], bbox[k, 3], dims[k, 1], dims[k, 2], dims[k, 0],
            loc[k, 0], loc[k, 1], loc[k, 2], rotation_y[k], score[k]))
    return "".join(ln + "\n" for ln in lines)


# largest value with 4 decimals inside [-pi, pi]: "%.4f" of a wrapped angle in (3.14155, pi] would print 3.1416 > pi
KITTI_ANGLE_LIMIT = 3.1415


def wrap_angle(a) -> np.ndarray:
    """Angles (radians) wrapped to [-pi, pi), float64."""
    a = np.asarray(a, np.float64)
    return a - 2.0 * np.pi * np.floor((a + np.pi) / (2.0 * np.pi))


def kitti_angle(a) -> np.ndarray:
    """An angle as a KITTI file writes it: wrapped to [-pi, pi] and kept inside after 4-decimal rounding."""
    return np.clip(wrap_angle(a), -KITTI_ANGLE_LIMIT, KITTI_ANGLE_LIMIT)


def canonical_lidar_boxes(boxes) -> np.ndarray:
    """(M, 7) LiDAR boxes in the one form every evaluation path converts: float32 values (as the pipeline produces
    them) with the heading wrapped to [-pi, pi) and rounded to float32 again, as float64. A box that went through a
    Detection3DArray (float64 fields, yaw as a quaternion) and the same box taken from ``Detections`` directly
    then give the same result line, digit for digit."""
    b = np.asarray(boxes, np.float64).reshape(-1, 7).astype(np.float32).astype(np.float64)
    b[:, 6] = wrap_angle(b[:, 6]).astype(np.float32)
    return b


def lidar_boxes_to_result_text(boxes, labels, scores, calib, image_shape=None, class_names=("Car", "Pedestrian", "Cyclist"),
                               pad_small: bool = False) -> str:
    """LiDAR boxes ``[x, y, z, dx, dy, dz, heading]`` -> KITTI result lines (OpenPCDet ``generate_prediction_dicts``).

    z_bottom = z - dz/2 -> rect frame (R0_rect Tr_velo_to_cam); ry = -heading - pi/2; camera box (l=dx, h=dz, w=dy);
    alpha = -atan2(-y, x) + ry; 2D box = min/max of the 8 P2-projected corners clipped to ``image_shape`` (H, W).
    ``pad_small``: CMF-IOU's release tweak (2D height < 25 px gets 2 px more at the bottom); off = plain OpenPCDet.
    Boxes are first put in :func:`canonical_lidar_boxes` form; ``rotation_y`` and ``alpha`` are written inside
    KITTI's [-pi, pi] (:func:`kitti_angle`). Boxes that the format cannot hold (non-finite, or a size under 1 cm,
    which the parser rejects) are left out with a warning.
    Uses ``cmfiou_core.geometry.boxes`` (one implementation of the conversion in the package).
    """
    from cmfiou_core.geometry.boxes import lidar_boxes_to_kitti

    boxes = canonical_lidar_boxes(boxes)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    ok = np.isfinite(boxes).all(axis=1) & (boxes[:, 3:6] >= 0.01).all(axis=1) & np.isfinite(scores)
    if not ok.all():
        log.warning("%d of %d boxes cannot be written as KITTI result lines (non-finite, or thinner than 1 cm): "
                    "left out", int((~ok).sum()), len(ok))
        boxes, labels, scores = boxes[ok], labels[ok], scores[ok]
    if len(boxes) == 0:
        return ""
    k = lidar_boxes_to_kitti(boxes, calib, image_shape, pad_small=pad_small)
    names = [class_names[int(l) - 1] for l in labels]
    return format_result_lines(names, kitti_angle(k["alpha"]), np.asarray(k["bbox"]), np.asarray(k["dimensions"]),
                               np.asarray(k["location"]), kitti_angle(k["rotation_y"]), scores)
