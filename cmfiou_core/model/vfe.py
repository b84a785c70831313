"""MeanVFE: voxel feature = mean of its points over all columns; for raw voxels (``flag_reduce='max'``,
official ``MODEL: max``) the last (flag) column takes the max instead. Pseudo voxels: plain mean. Handles every test
view (keys with suffix ``''``, ``'1'``, ``'2'`` ...)."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn


def mean_voxel_features(voxels: torch.Tensor, num_points: torch.Tensor, flag_max: bool) -> torch.Tensor:
    s = voxels.sum(dim=1)
    normalizer = torch.clamp_min(num_points.view(-1, 1), min=1.0).type_as(voxels)
    out = s / normalizer
    if flag_max:
        out[:, -1] = voxels[:, :, -1].max(dim=1)[0]
    return out.contiguous()


class MeanVFE(nn.Module):
    def __init__(self, num_point_features: int = 8, flag_reduce: str = "max"):
        super().__init__()
        if flag_reduce not in ("max", "mean"):
            raise ValueError(f"MeanVFE: flag_reduce must be 'max' or 'mean', got {flag_reduce!r}")
        self.num_point_features = num_point_features
        self.flag_max = flag_reduce == "max"

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        num_views = batch["transform_param"].shape[1] if "transform_param" in batch else 1
        for i in range(num_views):
            sfx = "" if i == 0 else str(i)
            batch["voxel_features" + sfx] = mean_voxel_features(batch["voxels" + sfx], batch["voxel_num_points" + sfx],
                                                               self.flag_max)
            if "voxels_mm" + sfx in batch:
                batch["voxel_features_mm" + sfx] = mean_voxel_features(batch["voxels_mm" + sfx],
                                                                      batch["voxel_num_points_mm" + sfx], False)
        return batch
