"""``PaddedSparse``: a sparse tensor with a fixed row capacity, the engine's exchange format between stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass
class PaddedSparse:
    """Sparse voxels in fixed-capacity buffers.

    features: (cap, C) float; rows ``>= count`` are zero.
    indices:  (cap, 1 + ndim) int32 ``(b, z, y, x)`` (or ``(b, u, v)`` in 2D); rows ``>= count`` are -1.
    count:    () int64 device tensor, the number of valid rows. It is never read on the host in the hot path.
    Valid rows come first and are sorted by their linear key (b, z, y, x), so the layout is a function of the site
    set alone (no dependence on input order or on a hash).
    """
    features: torch.Tensor
    indices: torch.Tensor
    count: torch.Tensor
    spatial_shape: Tuple[int, ...]
    batch_size: int

    @property
    def capacity(self) -> int:
        return int(self.indices.shape[0])

    @property
    def valid(self) -> torch.Tensor:
        """(cap,) bool mask of the valid rows."""
        return torch.arange(self.capacity, device=self.indices.device) < self.count

    def replace_feature(self, features: torch.Tensor) -> "PaddedSparse":
        return PaddedSparse(features, self.indices, self.count, self.spatial_shape, self.batch_size)

    def to_dense_rows(self):
        """(features, indices) of the valid rows only (syncs: for tests and debugging, never in the hot path)."""
        n = int(self.count)
        return self.features[:n], self.indices[:n]
