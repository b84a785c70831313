"""GT database for gt_sampling / da_sampling , stored without pickle.

``gt_database_mm/<id>_<cls>_<k>.npy``: float32 (K, 8) combined-cloud points (raw + pseudo) inside GT box k,
box-centre relative (``xyz - box centre``, not rotated: OpenPCDet). ``kitti_dbinfos_train_mm.json``:
``{"format": "cmfiou-gt-db-v1", "objects": {class: [info, ...]}}`` with per object ``name``, ``path`` (relative to
the dataset root), ``image_idx``, ``gt_idx``, ``box3d_lidar`` (7), ``num_points_in_gt`` (**raw** points only,
flag == 2), ``num_points_all``, ``difficulty``, ``bbox``, ``score``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..geometry.points_in_boxes import points_in_boxes_mask
from .kitti import calib_from_info, fov_flag, load_points_mm


def create_gt_database(root: Union[str, Path], infos: List[dict], db_dir: str = "gt_database_mm",
                       index_name: str = "kitti_dbinfos_train_mm.json", used_classes: Optional[Sequence[str]] = None,
                       points_fn: Optional[Callable[[dict], np.ndarray]] = None, split_dir: str = "training",
                       fov_only: bool = True, raw_from_bin: bool = False) -> Path:
    """Write the per-object point files and the JSON index; returns the index path.

    ``points_fn(info) -> (N, 8)`` overrides how the combined cloud is obtained (default: :func:`load_points_mm`,
    which reads ``velodyne_depth`` or generates + caches pseudo points; ``raw_from_bin`` as there). The index records
    where the raw rows came from (``raw_rows_from``: bin / velodyne_depth / none)."""
    root = Path(root)
    out_dir = root / db_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    objects: Dict[str, List[dict]] = {}
    for info in infos:
        fid = info["point_cloud"]["lidar_idx"]
        calib = calib_from_info(info)
        a = info["annos"]
        boxes = np.asarray(a["gt_boxes_lidar"], dtype=np.float64).reshape(-1, 7)
        if boxes.shape[0] == 0:
            continue
        pts = points_fn(info) if points_fn is not None else load_points_mm(root, fid, split_dir, True, None, calib,
                                                                               raw_from_bin=raw_from_bin)
        if fov_only:
            pts = pts[fov_flag(pts, calib, info["image"]["image_shape"])]
        mask = points_in_boxes_mask(pts, boxes)
        for k in range(boxes.shape[0]):
            name = str(a["name"][k])
            if used_classes is not None and name not in used_classes:
                continue
            g = pts[mask[:, k]].astype(np.float32)
            g[:, :3] -= boxes[k, :3].astype(np.float32)
            rel = f"{db_dir}/{fid}_{name}_{k}.npy"
            with open(root / rel, "wb") as f:
                np.save(f, g, allow_pickle=False)
            objects.setdefault(name, []).append({
                "name": name, "path": rel, "image_idx": fid, "gt_idx": k, "box3d_lidar": boxes[k].tolist(),
                "num_points_in_gt": int(np.sum(g[:, 7] == 2)), "num_points_all": int(g.shape[0]),
                "difficulty": int(a["difficulty"][k]), "bbox": np.asarray(a["bbox"][k]).tolist(),
                "score": float(a["score"][k])})
    index = root / index_name
    # recorded for the dataset's consistency check; with a custom points_fn, raw_from_bin=True declares .bin rows
    raw_source = "bin" if raw_from_bin else ("velodyne_depth" if points_fn is None else "none")
    index.write_text(json.dumps({"format": "cmfiou-gt-db-v1", "raw_rows_from": raw_source, "objects": objects}))
    return index
