"""Batching of :class:`cmfiou_core.data.kitti.KittiDataset` items. Voxelization happens later, on the device, in
the model's ``prepare_batch(raw_points, pseudo_points, calibs, cfg, image_shapes=, aug_params=, gt_boxes=)``, which
takes per-sample lists - so the clouds stay lists here.

Output: ``batch_size``; ``points`` / ``points_mm``: lists of (N_b, 8) float32 arrays; ``gt_boxes``: list of
(M_b, 8) float32 arrays (box + class id); ``gt_boxes_padded``: (B, max(M_b, 1), 8) float32 tensor, zero padded
(class id 0 = padding, OpenPCDet layout); ``aug_param``: (B, 3) float32 tensor; ``image_shape``: (B, 2) int64
tensor (H, W); ``calib`` / ``frame_id``: lists; ``local_trans``: list (training only, may be absent).
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch


def collate_batch(items: List[dict]) -> dict:
    if not items:
        raise ValueError("collate_batch: empty batch")
    B = len(items)
    m = max(it["gt_boxes"].shape[0] for it in items)
    gt = np.zeros((B, max(m, 1), 8), np.float32)
    for b, it in enumerate(items):
        gt[b, :it["gt_boxes"].shape[0]] = it["gt_boxes"]
    out = {
        "batch_size": B,
        "points": [np.asarray(it["points"], np.float32) for it in items],
        "points_mm": [np.asarray(it["points_mm"], np.float32) for it in items],
        "gt_boxes": [np.asarray(it["gt_boxes"], np.float32) for it in items],
        "gt_boxes_padded": torch.from_numpy(gt),
        "aug_param": torch.from_numpy(np.stack([np.asarray(it["aug_param"], np.float32) for it in items])),
        "image_shape": torch.from_numpy(np.stack([np.asarray(it["image_shape"], np.int64) for it in items])),
        "calib": [it["calib"] for it in items],
        "frame_id": [it["frame_id"] for it in items],
    }
    if all("local_trans" in it for it in items):
        out["local_trans"] = [it["local_trans"] for it in items]
    return out
