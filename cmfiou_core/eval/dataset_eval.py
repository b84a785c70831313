"""Evaluate the inference pipeline on a KITTI-layout split (real KITTI or generated scenes) with the KITTI protocol.

Every frame of the split goes through :class:`cmfiou_core.pipeline.Pipeline` (the same path as the ROS node), its
detections are written as KITTI result lines (``label_2`` format with score) and scored against ``label_2`` with
:func:`cmfiou_core.eval.kitti_eval.evaluate`. A frame whose inference fails is evaluated as an empty detection set
and counted (never silently dropped).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from ..calib import Calibration
from ..types import Frame
from .kitti_eval import EvalResult, evaluate, localization_quality
from .kitti_io import lidar_boxes_to_result_text, parse_kitti_text, read_ids, read_kitti_file

log = logging.getLogger(__name__)


@dataclass
class DatasetEvalResult:
    result: EvalResult
    frames: int
    failed: List[str] = field(default_factory=list)
    latency_ms: Dict[str, float] = field(default_factory=dict)
    localization: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)  # localization_quality

    def summary(self) -> Dict:
        js = self.result.to_json()
        return {"ap": js, "ap_ceiling": self.result.ceiling_json(), "warnings": self.result.small_set_warnings(),
                "frames": self.frames, "failed": self.failed, "latency_ms": self.latency_ms,
                "localization": self.localization}


def _split_root(root: Path) -> Path:
    for cand in (root / "training", root / "object" / "training", root):
        if (cand / "label_2").is_dir() and (cand / "velodyne").is_dir():
            return cand
    raise FileNotFoundError(f"{root}: no KITTI object layout (expected training/{{velodyne,label_2,calib,image_2}})")


def evaluate_split(pipeline, root: Union[str, Path], split: str = "val", out_dir: Optional[Union[str, Path]] = None,
                   lidar_only: bool = False, max_frames: Optional[int] = None,
                   pad_small: bool = False) -> DatasetEvalResult:
    from PIL import Image

    root = Path(root)
    data = _split_root(root)
    ids_file = root / "ImageSets" / f"{split}.txt"
    ids = read_ids(ids_file) if ids_file.is_file() else sorted(p.stem for p in (data / "label_2").glob("*.txt"))
    if max_frames:
        ids = ids[:max_frames]
    if not ids:
        raise ValueError(f"{root}: split {split!r} has no frames")
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "results").mkdir(parents=True, exist_ok=True)
    gt_annos, dt_annos, failed, totals = [], [], [], []
    for fid in ids:
        gt_annos.append(read_kitti_file(data / "label_2" / f"{fid}.txt"))
        img = np.array(Image.open(data / "image_2" / f"{fid}.png").convert("RGB"))
        calib = Calibration.from_kitti_object_file(data / "calib" / f"{fid}.txt", img.shape[1], img.shape[0])
        pts = np.fromfile(data / "velodyne" / f"{fid}.bin", np.float32).reshape(-1, 4)
        text = ""
        try:
            det = pipeline(Frame(pts, None if lidar_only else img, calib, index=fid))
            totals.append(det.timings_ms.get("total", float("nan")))
            text = lidar_boxes_to_result_text(det.boxes, det.labels, det.scores, calib, img.shape[:2],
                                              class_names=tuple(det.class_names), pad_small=pad_small)
        except Exception as e:  # noqa: BLE001 - a failed frame is evaluated as empty and reported
            log.error("frame %s failed (%s: %s): evaluated as an empty detection set", fid, type(e).__name__, e)
            failed.append(fid)
        if out:
            (out / "results" / f"{fid}.txt").write_text(text)
        dt_annos.append(parse_kitti_text(text, f"{fid}.txt", is_result=True))
    res = evaluate(gt_annos, dt_annos)
    loc = localization_quality(gt_annos, dt_annos)
    lat = {}
    if totals:
        a = np.asarray(totals)
        lat = {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
               "p99": float(np.percentile(a, 99))}
    return DatasetEvalResult(res, len(ids), failed, lat, loc)


def make_eval_fn(cfg, root, split: str = "val", use_pseudo: bool = True, max_frames: Optional[int] = None):
    """``eval_fn(model, epoch) -> {metric: value}`` for the training engine: the model under training is wrapped in
    a :class:`Pipeline` (same inference path as deployment); moderate R40 3D AP per class is returned."""
    from ..pipeline import Pipeline

    def eval_fn(model, epoch=None):
        m = model.module if hasattr(model, "module") else model
        was_training = m.training
        dev = next(m.parameters()).device
        pipe = Pipeline(cfg, m, dev, timing=True)
        try:
            r = evaluate_split(pipe, root, split, lidar_only=not use_pseudo, max_frames=max_frames)
        finally:
            m.train(was_training)
        js = r.result.to_json()["R40"]
        return {f"AP3d_R40_mod/{c}": float(v["3d"][1]) for c, v in js.items()}

    return eval_fn
