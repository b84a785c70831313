"""Evaluate the inference pipeline on a KITTI-layout split (real KITTI or generated scenes) with the KITTI protocol.

Every frame of the split goes through :class:`cmfiou_core.pipeline.Pipeline` (the same path as the ROS node), its
detections are written as KITTI result lines (``label_2`` format with score) and scored against ``label_2`` with
:func:`cmfiou_core.eval.kitti_eval.evaluate`. A frame whose inference fails is evaluated as an empty detection set
and counted (never silently dropped); a frame with a bad input file is named, skipped and counted (``strict``: the
run stops); frames that ran LiDAR-only (without depth completion) are listed with the reason.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..calib import Calibration
from .bag_io import ros_calibration
from ..types import Frame
from .centre_match import centre_match
from .kitti_eval import EvalResult, evaluate, localization_quality, perfect_predictions
from .kitti_io import KittiFormatError, lidar_boxes_to_result_text, parse_kitti_text, read_ids, read_kitti_file

log = logging.getLogger(__name__)


class BadInputError(ValueError):
    """An input file of a split that cannot be used (unreadable, truncated, malformed); the message names it."""


@dataclass
class DatasetEvalResult:
    result: EvalResult
    frames: int  # frames evaluated (skipped ones not included)
    failed: List[str] = field(default_factory=list)  # inference failed: evaluated as empty detection sets
    latency_ms: Dict[str, float] = field(default_factory=dict)
    localization: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)  # localization_quality
    skipped: Dict[str, str] = field(default_factory=dict)  # frame id -> bad input file (not evaluated)
    lidar_only: Dict[str, str] = field(default_factory=dict)  # frame id -> why it ran LiDAR-only (without depth)
    centre: Dict[str, object] = field(default_factory=dict)  # centre_match.centre_match at score >= 0.5

    def summary(self) -> Dict:
        js = self.result.to_json()
        return {"headline": self.headline(), "ap": js, "ap_ceiling": self.result.ceiling_json(),
                "num_valid_gt": self.result.num_valid_gt, "warnings": self.result.small_set_warnings(),
                "frames": self.frames, "failed": self.failed, "skipped": self.skipped,
                "lidar_only_frames": self.lidar_only, "latency_ms": self.latency_ms,
                "localization": self.localization, "centre_match": self.centre}

    def headline(self) -> Dict[str, object]:
        """The numbers a sim-to-real comparison quotes, flat: R40 AP (easy / moderate / hard, first overlap set)
        beside its ceiling (label_2 fed back) and object counts, the centre-match report at score >= 0.5 and the
        localization quality (best 3D IoU mean, recall at the class's AP threshold)."""
        ap, ceil = self.result.to_json()["R40"], self.result.ceiling_json() or {}
        out: Dict[str, object] = {}
        for c in ap:
            metrics = ("3d", "bev") if c == "Car" else ("3d",)
            out[c] = {"objects_easy_mod_hard": list(self.result.num_valid_gt.get(c, [])),
                      **{f"ap_{m}_r40": ap[c][m] for m in metrics},
                      **{f"ceiling_{m}_r40": ceil.get("R40", {}).get(c, {}).get(m) for m in metrics}}
            loc = self.localization.get(c) or {}
            out[c].update(best_iou_mean=loc.get("mean_best_iou"), recall_at_threshold=loc.get("recall"),
                          iou_threshold=loc.get("threshold"))
            cm = (self.centre.get("classes") or {}).get(c)
            if cm:
                out[c].update(found=cm["found"], found_right_class=cm["found_right_class"], num_gt=cm["num_gt"],
                              median_centre_error_m=cm["median_centre_error_m"])
        if self.centre:
            out.update(score_min=self.centre["score_min"], radius_m=self.centre["radius_m"],
                       unmatched=self.centre["unmatched"], unmatched_per_frame=self.centre["unmatched_per_frame"],
                       car_size=self.centre["car_size"])
        return out


def _split_root(root: Path) -> Path:
    for cand in (root / "training", root / "object" / "training", root):
        if (cand / "label_2").is_dir() and (cand / "velodyne").is_dir():
            return cand
    raise FileNotFoundError(f"{root}: no KITTI object layout (expected training/{{velodyne,label_2,calib,image_2}})")


SPLIT_ALL = "all"  # without an ImageSets/all.txt: every frame that has a label_2 file


def split_ids(root: Union[str, Path], split: str) -> Tuple[Path, List[str]]:
    """(the folder holding velodyne/ image_2/ calib/ label_2/, the ids of ``split``).

    ``split`` names ``ImageSets/<split>.txt`` (beside ``training/``); ``all`` without such a file means every
    ``label_2`` file. Errors name what is available: an unknown split, a split without frames, ground truth that
    is missing for some frame or empty (no label file at all)."""
    root = Path(root)
    data = _split_root(root)
    sets_dirs = [d for d in dict.fromkeys((root / "ImageSets", data.parent / "ImageSets")) if d.is_dir()]
    available = sorted({p.stem for d in sets_dirs for p in d.glob("*.txt")})
    files = [d / f"{split}.txt" for d in sets_dirs if (d / f"{split}.txt").is_file()]
    labels = sorted(p.stem for p in (data / "label_2").glob("*.txt"))
    if not labels:
        raise ValueError(f"{data / 'label_2'}: no ground truth (no label files): nothing to evaluate")
    if files:
        ids = read_ids(files[0])
    elif split == SPLIT_ALL:
        ids = labels
    else:
        where = ", ".join(str(d) for d in sets_dirs) or f"{root / 'ImageSets'} (missing)"
        raise ValueError(f"unknown split {split!r}: no {split}.txt in {where}; available splits: "
                         f"{', '.join(available) or 'none'}{'' if SPLIT_ALL in available else ' (or all = every label_2 file)'}")
    if not ids:
        raise ValueError(f"{files[0] if files else data}: split {split!r} has no frames")
    have = set(labels)
    missing = [i for i in ids if i not in have]
    if missing:
        raise ValueError(f"{data / 'label_2'}: ground truth missing for {len(missing)} of {len(ids)} frames of split "
                         f"{split!r} (first: {missing[0]}.txt); a split is evaluated only against its labels")
    evaluated = ("Car", "Pedestrian", "Cyclist")
    if not any(ln.split()[:1] and ln.split()[0] in evaluated
               for i in ids for ln in (data / "label_2" / f"{i}.txt").read_text(errors="replace").splitlines()):
        raise ValueError(f"{data / 'label_2'}: the ground truth of split {split!r} ({len(ids)} frames) has no Car, "
                         "Pedestrian or Cyclist object: AP is undefined")
    return data, ids


def read_image_rgb(path: Union[str, Path]) -> np.ndarray:
    """A PNG (or any PIL format) as (H, W, 3) uint8 RGB -- the one decoder of the evaluation paths (kitti2bag
    writes the same pixels into bags). Unreadable or truncated files raise :class:`BadInputError` naming them."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, bad chunks
        raise BadInputError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def read_velodyne_bin(path: Union[str, Path]) -> np.ndarray:
    """A KITTI ``velodyne/*.bin`` as (N, 4) float32; a size that is not a multiple of 16 bytes is named as truncated."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(raw) % 16:
        raise BadInputError(f"{path}: {len(raw)} bytes is not a multiple of 16 (N x 4 float32): truncated file?")
    return np.frombuffer(raw, np.float32).reshape(-1, 4).copy()


def load_frame(data: Path, fid: str):
    """(label annotations, image, calibration, points) of one frame; a bad file raises :class:`BadInputError` /
    :class:`KittiFormatError` naming it."""
    from ..calib import CalibrationError

    gt = read_kitti_file(data / "label_2" / f"{fid}.txt")
    img = read_image_rgb(data / "image_2" / f"{fid}.png")
    cp = data / "calib" / f"{fid}.txt"
    try:
        calib = Calibration.from_kitti_object_file(cp, img.shape[1], img.shape[0])
    except (CalibrationError, ValueError, OSError) as e:
        msg = str(e)
        raise BadInputError(msg if str(cp) in msg else f"{cp}: {msg}") from None
    pts = read_velodyne_bin(data / "velodyne" / f"{fid}.bin")
    return gt, img, calib, pts


def _progress(ids, desc: str):
    """tqdm progress bar on a terminal (stderr), none otherwise (logs, CI)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return ids
    return tqdm(ids, desc=desc, unit="frame", disable=not sys.stderr.isatty(), dynamic_ncols=True)


def evaluate_split(pipeline, root: Union[str, Path], split: str = "val", out_dir: Optional[Union[str, Path]] = None,
                   lidar_only: bool = False, max_frames: Optional[int] = None,
                   pad_small: bool = False, strict: bool = False) -> DatasetEvalResult:
    """Run ``pipeline`` over ``split`` of ``root`` and evaluate (module doc). A frame with a bad input file
    (label, image, calibration, point cloud) is named, skipped (not evaluated) and counted; ``strict`` raises
    instead. Raises ValueError for an unknown split and for missing or empty ground truth."""
    data, ids = split_ids(root, split)
    if max_frames:
        ids = ids[:max_frames]
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "results").mkdir(parents=True, exist_ok=True)
    gt_annos, dt_annos, failed, totals = [], [], [], []
    skipped: Dict[str, str] = {}
    lidar_only_frames: Dict[str, str] = {}
    for fid in _progress(ids, f"evaluate {split}"):
        try:
            gt, img, calib, pts = load_frame(data, fid)
        except (BadInputError, KittiFormatError) as e:
            if strict:
                raise
            log.error("frame %s skipped (not evaluated): %s", fid, e)
            skipped[fid] = str(e)
            continue
        text = ""
        try:
            # the pipeline sees the calibration as ROS carries it (bag_io.ros_calibration: what the node rebuilds from
            # CameraInfo + TF), the result lines are written with the exact one
            det = pipeline(Frame(pts, None if lidar_only else img, ros_calibration(calib), index=fid))
            totals.append(det.timings_ms.get("total", float("nan")))
            if det.lidar_only:
                lidar_only_frames[fid] = ("--lidar-only: no camera image given" if lidar_only else
                                          "the pipeline ran without depth completion (depth disabled in the "
                                          "configuration)")
            text = lidar_boxes_to_result_text(det.boxes, det.labels, det.scores, calib, img.shape[:2],
                                              class_names=tuple(det.class_names), pad_small=pad_small)
        except Exception as e:  # noqa: BLE001 - a failed frame is evaluated as empty and reported
            log.error("frame %s failed (%s: %s): evaluated as an empty detection set", fid, type(e).__name__, e)
            failed.append(fid)
        if out:
            (out / "results" / f"{fid}.txt").write_text(text)
        gt_annos.append(gt)
        dt_annos.append(parse_kitti_text(text, f"{fid}.txt", is_result=True))
    if skipped:
        log.error("%d of %d frames skipped for bad input files (not evaluated): %s", len(skipped), len(ids),
                  ", ".join(skipped))
    if not gt_annos:
        raise ValueError(f"{root}: every frame of split {split!r} was skipped (bad input files): nothing to evaluate")
    lat = {}
    if totals:
        a = np.asarray(totals)
        lat = {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
               "p99": float(np.percentile(a, 99))}
    return score(gt_annos, dt_annos, failed, lat, skipped, lidar_only_frames)


def score(gt_annos, dt_annos, failed=(), latency_ms=None, skipped=None, lidar_only=None) -> DatasetEvalResult:
    """AP (with ceiling), localization quality and the centre-match report of parallel annotation lists."""
    return DatasetEvalResult(evaluate(gt_annos, dt_annos), len(gt_annos), list(failed), dict(latency_ms or {}),
                             localization_quality(gt_annos, dt_annos), dict(skipped or {}), dict(lidar_only or {}),
                             centre_match(gt_annos, dt_annos))


def evaluate_predictions(root: Union[str, Path], split: str, pred_dir: Optional[Union[str, Path]] = None,
                         max_frames: Optional[int] = None) -> DatasetEvalResult:
    """Score result files ``pred_dir/<id>.txt`` (KITTI result lines; a missing file is an error naming it) instead of
    running a model; ``pred_dir=None`` feeds ``label_2`` back (Car / Pedestrian / Cyclist, score 1): the ceiling of
    this ground truth, with no unmatched detection and no size error. Malformed files raise naming file and line."""
    data, ids = split_ids(root, split)
    if max_frames:
        ids = ids[:max_frames]
    gt_annos = [read_kitti_file(data / "label_2" / f"{i}.txt") for i in ids]
    if pred_dir is None:
        dt_annos = perfect_predictions(gt_annos, ("Car", "Pedestrian", "Cyclist"))
    else:
        pred = Path(pred_dir)
        missing = [i for i in ids if not (pred / f"{i}.txt").is_file()]
        if missing:
            raise FileNotFoundError(f"{pred}: no result file for {len(missing)} of {len(ids)} frames "
                                    f"(first: {missing[0]}.txt)")
        dt_annos = [read_kitti_file(pred / f"{i}.txt", is_result=True) for i in ids]
    return score(gt_annos, dt_annos)


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
