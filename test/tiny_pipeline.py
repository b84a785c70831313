"""A tiny deterministic detector with the Pipeline contract, for ROS-layer tests until/besides the real pipeline.

``TinyPipeline.from_config(config_path, checkpoint=None, device="cpu")``; ``pipe(frame) -> Detections``; ``warmup()``.
It bins above-ground LiDAR points in front of the sensor into 4 m BEV cells and reports the densest cells as
car-sized boxes (score = cell count / max count, IoU = a fixed function of the count). Same input -> same output.
Set CMFIOU_TINY_FAIL_EVERY=N to make every N-th call raise (error-path tests); CMFIOU_TINY_SLEEP_MS adds latency.
"""
from __future__ import annotations

import os
import time

import numpy as np

from cmfiou_core.types import Detections, Frame


class TinyPipeline:
    def __init__(self, max_boxes: int = 8, cell: float = 4.0):
        self.max_boxes, self.cell = max_boxes, cell
        self.calls = 0
        self.fail_every = int(os.environ.get("CMFIOU_TINY_FAIL_EVERY", "0"))
        self.sleep_ms = float(os.environ.get("CMFIOU_TINY_SLEEP_MS", "0"))
        self.frames = []  # (stamp_ns, has_camera) of every call, for assertions

    @classmethod
    def from_config(cls, config_path=None, checkpoint=None, device="cpu"):
        return cls()

    def warmup(self) -> None:
        self(Frame(np.zeros((10, 4), np.float32)))
        self.calls = 0
        self.frames.clear()

    def __call__(self, frame: Frame) -> Detections:
        self.calls += 1
        self.frames.append((frame.stamp_ns, frame.image is not None))
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError(f"tiny pipeline: injected failure on call {self.calls}")
        t0 = time.perf_counter()
        if self.sleep_ms:
            time.sleep(self.sleep_ms / 1e3)
        p = frame.points
        m = (p[:, 0] > 0) & (p[:, 0] < 70) & (np.abs(p[:, 1]) < 40) & (p[:, 2] > -1.4) & (p[:, 2] < 1.0)
        p = p[m]
        if len(p) == 0:
            det = Detections.empty(frame.stamp_ns, frame.frame_id, frame.image is None)
            det.timings_ms = {"tiny": (time.perf_counter() - t0) * 1e3}
            return det
        ij = np.floor(p[:, :2] / self.cell).astype(np.int64)
        keys, inv, counts = np.unique(ij, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        order = np.lexsort((keys[:, 1], keys[:, 0], -counts))[: self.max_boxes]
        boxes, cnt = [], []
        for k in order:
            sel = p[inv == k]
            c = sel[:, :3].mean(axis=0)
            boxes.append([c[0], c[1], c[2], 3.9, 1.6, 1.56, 0.1 * (k % 7)])
            cnt.append(counts[k])
        cnt = np.asarray(cnt, np.float32)
        cls = cnt / cnt.max()
        iou = np.clip(0.3 + 0.6 * cls, 0, 1)
        score = np.sqrt(cls * iou)
        labels = np.ones(len(boxes), np.int64)
        labels[1::3] = 2
        labels[2::3] = 3
        det = Detections(np.asarray(boxes, np.float32), labels, cls, iou, score, frame.stamp_ns, frame.frame_id,
                         lidar_only=frame.image is None)
        det.timings_ms = {"bin": (time.perf_counter() - t0) * 1e3 * 0.5, "boxes": (time.perf_counter() - t0) * 1e3 * 0.5}
        return det


class _Echo:
    """A recording pipeline: a frame with a camera gets one detection (class 1, scores 1) per row of
    ``self.boxes(frame)``, which encodes what the node handed over; a LiDAR-only frame gets none."""

    @classmethod
    def from_config(cls, config_path=None, checkpoint=None, device="cpu"):
        return cls()

    def __call__(self, frame: Frame) -> Detections:
        if frame.image is None:
            return Detections.empty(frame.stamp_ns, frame.frame_id, lidar_only=True)
        boxes = np.asarray(self.boxes(frame), np.float32)
        one = np.ones(len(boxes), np.float32)
        return Detections(boxes, np.ones(len(boxes), np.int64), one, one, one, frame.stamp_ns, frame.frame_id,
                          lidar_only=False)


class CalibrationEcho(_Echo):
    """One detection carrying the calibration and image size the node handed over (centre = P2[0,0], P2[0,2],
    Tr[0,3]; size = image width, height, 1 + |Tr[2,3]|). Lets a cross-process test check which calibration each
    output was fused with."""

    def boxes(self, frame: Frame):
        c, (h, w) = frame.calib, frame.image.shape[:2]
        return [[c.P2[0, 0], c.P2[0, 2], c.Tr_velo_to_cam[0, 3], w, h, 1.0 + abs(c.Tr_velo_to_cam[2, 3]), 0.0]]


class ExtrinsicEcho(_Echo):
    """For TF tests: four detections whose centres are the four columns of the LiDAR->camera extrinsic the frame was
    fused with (``Tr_velo_to_cam``, 3x4)."""

    def boxes(self, frame: Frame):
        Tr = np.asarray(frame.calib.Tr_velo_to_cam, np.float64)
        return [[Tr[0, j], Tr[1, j], Tr[2, j], 1.0, 1.0, 1.0, 0.0] for j in range(4)]
