"""Batching of :class:`cmfiou_core.data.kitti.KittiDataset` items (voxelization happens later, on the device, in
the model's ``prepare_batch``).

Output: ``batch_size``; ``points`` / ``points_mm`` (N, 9) float32 tensors ``[b, x, y, z, ...]``; ``gt_boxes``
(B, M_max, 8) zero-padded (class id 0 = padding); ``aug_param`` (B, 3); ``image_shape`` (B, 2) int64;
``calib`` / ``frame_id`` lists; ``num_points`` / ``num_points_mm`` (B,) counts.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch


def _cat_with_batch(arrs: List[np.ndarray]) -> torch.Tensor:
    C = max((a.shape[1] for a in arrs), default=8)
    out = [np.concatenate([np.full((a.shape[0], 1), b, np.float32), a.astype(np.float32)], 1)
           for b, a in enumerate(arrs)]
    return torch.from_numpy(np.concatenate(out, 0)) if out else torch.zeros((0, C + 1))


def collate_batch(items: List[dict]) -> dict:
    if not items:
        raise ValueError("collate_batch: empty batch")
    B = len(items)
    m = max(it["gt_boxes"].shape[0] for it in items)
    gt = np.zeros((B, max(m, 1), 8), np.float32)
    for b, it in enumerate(items):
        gt[b, :it["gt_boxes"].shape[0]] = it["gt_boxes"]
    return {
        "batch_size": B,
        "points": _cat_with_batch([it["points"] for it in items]),
        "points_mm": _cat_with_batch([it["points_mm"] for it in items]),
        "num_points": torch.tensor([it["points"].shape[0] for it in items]),
        "num_points_mm": torch.tensor([it["points_mm"].shape[0] for it in items]),
        "gt_boxes": torch.from_numpy(gt),
        "aug_param": torch.from_numpy(np.stack([np.asarray(it["aug_param"], np.float32) for it in items])),
        "image_shape": torch.from_numpy(np.stack([np.asarray(it["image_shape"], np.int64) for it in items])),
        "calib": [it["calib"] for it in items],
        "frame_id": [it["frame_id"] for it in items],
    }
