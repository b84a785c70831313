"""Typed data at the package boundaries.

Conventions (used everywhere in cmfiou_core):
- LiDAR frame (REP-103): x forward, y left, z up, metres.
- 3D boxes in the LiDAR frame: ``[x, y, z, dx, dy, dz, heading]`` (OpenPCDet): (x, y, z) is the box *centre*,
  dx/dy/dz the full length/width/height, heading the yaw about +z from +x (radians).
- Class ids: 1 = Car, 2 = Pedestrian, 3 = Cyclist (0 is background); names in ``CLASS_NAMES``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from .calib import Calibration

CLASS_NAMES: Tuple[str, ...] = ("Car", "Pedestrian", "Cyclist")


@dataclass
class Frame:
    """One synchronised sensor frame: the input of :class:`cmfiou_core.pipeline.Pipeline`.

    points: (N, 4) float32 LiDAR points ``x, y, z, intensity`` (intensity in [0, 1] as in KITTI .bin files).
    image:  (H, W, 3) uint8 RGB camera image, or ``None`` (LiDAR-only inference: the pseudo branch is empty).
    calib:  camera/LiDAR calibration; required when ``image`` is given.
    stamp_ns: the LiDAR stamp in nanoseconds (outputs carry it unchanged).
    """

    points: np.ndarray
    image: Optional[np.ndarray] = None
    calib: Optional[Calibration] = None
    stamp_ns: int = 0
    frame_id: str = "velodyne"
    index: Optional[str] = None  # dataset frame id such as "000008", when known

    def __post_init__(self) -> None:
        pts = np.asarray(self.points)
        if pts.ndim != 2 or pts.shape[1] < 4:
            raise ValueError(f"Frame.points must be (N, 4) x,y,z,intensity; got shape {pts.shape}")
        if not np.issubdtype(pts.dtype, np.floating):
            raise ValueError(f"Frame.points must be floating point; got {pts.dtype}")
        self.points = np.ascontiguousarray(pts[:, :4], dtype=np.float32)
        if self.image is not None:
            img = np.asarray(self.image)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"Frame.image must be (H, W, 3) uint8 RGB; got {img.shape} {img.dtype}")
            if self.calib is None:
                raise ValueError("Frame.image given without a calibration: cannot project LiDAR into the image")
            self.calib.check_image_size(img.shape[1], img.shape[0])
            self.image = img

    @property
    def has_camera(self) -> bool:
        return self.image is not None


@dataclass
class Detections:
    """Detector output for one frame (all arrays on the CPU, numpy).

    boxes: (M, 7) float32 LiDAR boxes (see module doc). labels: (M,) int64 in 1..3.
    cls_scores: raw classification probability; iou_scores: predicted 3D IoU in [0, 1] (NaN when the model has
    no IoU branch); scores: the rectified score used for ranking/thresholding (``cls^(1-a) * iou^a`` by default).
    timings_ms: per-stage wall/CUDA-event time in milliseconds, in execution order.
    lidar_only: True when the camera was missing/too old and the pseudo branch ran empty.
    score_mode: how ``scores`` was computed (``model.post_processing.score_mode`` of the model config: "cls",
    "rectified" or "add"; cmfiou_core.model.iou_joint.SCORE_MODES).
    note: why the frame has no detections or ran without its image although one was given ('' otherwise), e.g.
    "no LiDAR point inside the detection range".
    """

    boxes: np.ndarray
    labels: np.ndarray
    cls_scores: np.ndarray
    iou_scores: np.ndarray
    scores: np.ndarray
    stamp_ns: int = 0
    frame_id: str = "velodyne"
    lidar_only: bool = False
    timings_ms: Dict[str, float] = field(default_factory=dict)
    class_names: Tuple[str, ...] = CLASS_NAMES
    score_mode: str = "cls"
    note: str = ""

    def __post_init__(self) -> None:
        m = len(self.boxes)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(m, 7)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(m)
        for name in ("cls_scores", "iou_scores", "scores"):
            arr = np.asarray(getattr(self, name), dtype=np.float32).reshape(-1)
            if arr.shape[0] != m:
                raise ValueError(f"Detections.{name} has {arr.shape[0]} entries for {m} boxes")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def names(self) -> list:
        return [self.class_names[int(l) - 1] for l in self.labels]

    @classmethod
    def empty(cls, stamp_ns: int = 0, frame_id: str = "velodyne", lidar_only: bool = False,
              score_mode: str = "cls", note: str = "") -> "Detections":
        z = np.zeros((0,), np.float32)
        return cls(np.zeros((0, 7), np.float32), np.zeros((0,), np.int64), z, z, z, stamp_ns, frame_id, lidar_only,
                   score_mode=score_mode, note=note)
