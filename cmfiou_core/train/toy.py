"""A small real model + synthetic point-cloud dataset with the detector's data contract, for engine tests and GPU
smoke tests of the training stack (``cmfiou-train --toy``) without the detector or KITTI.

Frames are dicts ``{'points': (N, 8) float32 [x, y, z, i, r, g, b, flag], 'target': (3,) float32}`` of variable N,
with random augmentation (y flip, jitter) drawn from numpy's global RNG.  ``toy_collate`` builds the batched
``(N, 9)`` points with a leading batch column; the model predicts the frame target from a per-point MLP + mean pool.
The loss is the mean over frames (so the DDP average equals the single-process value at the same global batch).
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["ToyPointDataset", "toy_collate", "ToyPointNet"]


class ToyPointDataset(Dataset):
    def __init__(self, n: int = 64, seed: int = 123, min_points: int = 32, max_points: int = 96, augment: bool = True):
        rng = np.random.default_rng(seed)
        self.frames = []
        w = rng.normal(size=(8, 3)).astype(np.float32)
        for _ in range(n):
            k = int(rng.integers(min_points, max_points + 1))
            centre = rng.normal(size=(1, 8)).astype(np.float32)
            pts = (centre + 0.5 * rng.normal(size=(k, 8))).astype(np.float32)
            pts[:, 7] = rng.choice([1.0, 2.0], size=k)
            target = np.tanh(centre @ w)[0].astype(np.float32)
            self.frames.append((pts, target))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        pts, target = self.frames[i]
        pts = pts.copy()
        if self.augment:  # global-RNG augmentation, like the KITTI augmentors
            if np.random.rand() < 0.5:
                pts[:, 1] = -pts[:, 1]
            pts[:, :3] += np.random.normal(scale=0.01, size=(len(pts), 3)).astype(np.float32)
        return {"points": pts, "target": target.copy(), "frame_id": f"{i:06d}"}


def toy_collate(frames: List[Dict[str, np.ndarray]]) -> Dict[str, object]:
    pts = [np.concatenate([np.full((len(f["points"]), 1), b, np.float32), f["points"]], 1) for b, f in enumerate(frames)]
    return {"batch_size": len(frames), "points": torch.from_numpy(np.concatenate(pts, 0)),
            "target": torch.from_numpy(np.stack([f["target"] for f in frames])),
            "frame_id": [f["frame_id"] for f in frames]}


class ToyPointNet(nn.Module):
    def __init__(self, hidden: int = 32, norm: str = "bn", dropout: float = 0.0):
        super().__init__()
        layers = [nn.Linear(8, hidden, bias=norm != "bn")]
        if norm == "bn":
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU()]
        self.point_mlp = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, 3)
        self.register_buffer("global_step", torch.zeros(1, dtype=torch.long))

    def update_global_step(self) -> None:
        self.global_step += 1

    def forward(self, batch):
        pts = batch["points"]
        b = pts[:, 0].long()
        bs = int(batch["batch_size"])
        feat = self.point_mlp(pts[:, 1:])
        pooled = torch.zeros(bs, feat.shape[1], device=feat.device, dtype=feat.dtype).index_add_(0, b, feat)
        cnt = torch.bincount(b, minlength=bs).clamp(min=1).to(feat.dtype)
        pred = self.head(pooled / cnt[:, None])
        per_frame = ((pred.float() - batch["target"]) ** 2).mean(1)
        loss = per_frame.mean()
        return loss, {"loss_reg": loss.detach(), "pred_abs": pred.detach().abs().mean()}
