"""IoU joint prediction: the IoU branch's target/decoding conventions and the score combinations.

Decision (documented): the IoU branch (``roi_head.iou_layers``, 1024 -> 256 -> 256 -> 1, same trunk as
``cls_layers``) runs on each stage's fused feature (concat[pseudo 512, raw 512]) and predicts the 3D IoU of *that
stage's refined box* with its ground truth. It is trained against ``2 * IoU - 1`` with a smooth-L1 (beta 1/9) loss
on all sampled RoIs (background RoIs have IoU 0, i.e. target -1), like the Waymo VoxelNeXt IoU head of the official
repo. At test the per-stage raw predictions are averaged (as the stage logits are) and decoded
``iou = clamp((raw + 1) / 2, 0, 1)``.

Scores (``score_mode``):
- ``rectified`` (default): ``s = cls^(1 - a_c) * iou^a_c`` with per-class ``a`` (Car/Ped/Cyc 0.68/0.71/0.65);
- ``add``: ``s = (cls + iou) / 2`` (the paper figure's "Add");
- ``cls``: ``s = cls`` (official KITTI behaviour, no IoU factor).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..device_const import device_const

SCORE_MODES = ("rectified", "add", "cls")
DEFAULT_ALPHA = (0.68, 0.71, 0.65)


def encode_iou_target(iou: torch.Tensor) -> torch.Tensor:
    return 2.0 * iou - 1.0


def decode_iou_pred(raw: torch.Tensor) -> torch.Tensor:
    return torch.clamp((raw + 1.0) / 2.0, 0.0, 1.0)


def combine_scores(cls: torch.Tensor, iou: torch.Tensor, labels: torch.Tensor, mode: str = "rectified",
                   alpha: Sequence[float] = DEFAULT_ALPHA) -> torch.Tensor:
    """cls, iou in [0, 1] (N,), labels (N,) in 1..K -> (N,) scores."""
    if mode == "cls":
        return cls
    if mode == "add":
        return (cls + iou) / 2
    if mode == "rectified":
        at = device_const(tuple(float(x) for x in alpha), cls.dtype, cls.device)  # no per-frame host->device copy
        a = at[(labels.long().clamp(1, len(alpha)) - 1)]
        return torch.pow(cls.clamp_min(0), 1 - a) * torch.pow(iou.clamp_min(0), a)
    raise ValueError(f"score mode must be one of {SCORE_MODES}, got {mode!r}")
