"""Voxelization with the semantics of spconv 2's ``Point2VoxelCPU3d`` (the official ``VoxelGeneratorWrapper``), on the
device of the points, fully vectorized and deterministic (spconv's CUDA ``PointToVoxel`` orders voxels by hash-table
slot and is not usable for exact reproduction).

Semantics (checked against spconv 2.3.8 CPU and ``official_dense/inputs.npz`` in test/test_model_dense.py):
- voxel coordinate per axis ``c = floor((p - range_min) / voxel_size)`` in float32 (the kernel's arithmetic); a point
  with any ``c`` outside ``[0, grid)`` is dropped;
- voxels are numbered in order of the first point that falls into them (input order); voxels beyond ``max_voxels``
  are dropped together with their points;
- each voxel keeps its first ``max_points`` points in input order; the rest of the slots are zero;
- coordinates are returned as (z, y, x) int32, ``num_points`` int32.
The kernel keeps no state between calls (its hash map is reset after each call), so voxelizing raw then pseudo with
one generator equals two fresh generators (verified, see the test).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


class Voxelizer:
    def __init__(self, voxel_size: Sequence[float], point_cloud_range: Sequence[float], max_points: int,
                 max_voxels: int):
        self.voxel_size = [float(v) for v in voxel_size]
        self.pc_range = [float(v) for v in point_cloud_range]
        self.max_points = int(max_points)
        self.max_voxels = int(max_voxels)
        # grid size as spconv computes it: round((max - min) / vsize) in float32
        vs = torch.tensor(self.voxel_size, dtype=torch.float32)
        r = torch.tensor(self.pc_range, dtype=torch.float32)
        self.grid_size_xyz = [int(x) for x in torch.round((r[3:] - r[:3]) / vs).tolist()]

    def __call__(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """points (N, C) float32 -> voxels (V, max_points, C) float32, coords (V, 3) int32 (z, y, x), num (V,) int32."""
        if points.dim() != 2 or points.shape[1] < 3:
            raise ValueError(f"Voxelizer: points must be (N, >=3), got {tuple(points.shape)}")
        points = points.to(torch.float32)
        dev = points.device
        N, C = points.shape
        vs = torch.tensor(self.voxel_size, dtype=torch.float32, device=dev)
        rmin = torch.tensor(self.pc_range[:3], dtype=torch.float32, device=dev)
        grid = torch.tensor(self.grid_size_xyz, dtype=torch.int64, device=dev)
        c = torch.floor((points[:, :3] - rmin) / vs)
        # clamp before the cast so that inf / huge values cannot overflow the integer conversion
        c = torch.clamp(c, -1, float(max(self.grid_size_xyz)) + 1).to(torch.int64)
        valid = ((c >= 0) & (c < grid)).all(dim=1)
        pidx = torch.nonzero(valid, as_tuple=False).squeeze(1)
        cv = c[pidx]
        gx, gy, gz = self.grid_size_xyz
        key = (cv[:, 2] * gy + cv[:, 1]) * gx + cv[:, 0]
        if key.numel() == 0:
            return (points.new_zeros((0, self.max_points, C)), torch.zeros((0, 3), dtype=torch.int32, device=dev),
                    torch.zeros((0,), dtype=torch.int32, device=dev))
        uniq, inv = torch.unique(key, return_inverse=True)
        first = torch.full((uniq.numel(),), N, dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, inv, pidx, reduce="amin", include_self=True)
        order = torch.argsort(first)                       # voxel ids in first-appearance order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=dev)
        vid = rank[inv]                                    # per valid point, its voxel id
        # slot of each point inside its voxel = number of earlier points of the same voxel (input order)
        perm = torch.sort(vid, stable=True).indices
        counts = torch.bincount(vid, minlength=order.numel())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(vid)
        slot[perm] = torch.arange(vid.numel(), device=dev) - starts[vid[perm]]
        nv = min(order.numel(), self.max_voxels)
        keep = (vid < nv) & (slot < self.max_points)
        voxels = points.new_zeros((nv, self.max_points, C))
        voxels[vid[keep], slot[keep]] = points[pidx[keep]]
        num = torch.clamp(counts[:nv], max=self.max_points).to(torch.int32)
        k = uniq[order[:nv]]
        x = k % gx
        y = (k // gx) % gy
        z = k // (gx * gy)
        coords = torch.stack([z, y, x], dim=1).to(torch.int32)
        return voxels, coords, num
