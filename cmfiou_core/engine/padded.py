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
        out = PaddedSparse(features, self.indices, self.count, self.spatial_shape, self.batch_size)
        grid = self.__dict__.get("_row_grid")
        if grid is not None:           # the site set is unchanged: keep its dense row grid (engine.sparse.row_grid)
            out.__dict__["_row_grid"] = grid
        return out

    @property
    def key_space(self) -> int:
        """Number of possible sites: batch_size x prod(spatial_shape)."""
        n = int(self.batch_size)
        for s in self.spatial_shape:
            n *= int(s)
        return n

    @classmethod
    def from_spconv(cls, t, capacity: int) -> "PaddedSparse":
        """A ``spconv.SparseConvTensor`` (any row order) -> ``PaddedSparse`` of ``capacity`` rows: valid rows sorted by
        their linear key (b, z, y, x), then padding (features 0, indices -1). Host-side (reads the row count): for
        tests and for feeding the engine from the eager backbone, not for the hot path. ``capacity`` below the row
        count is an error."""
        feats, idx = t.features, t.indices
        n = int(idx.shape[0])
        if n > int(capacity):
            raise ValueError(f"PaddedSparse.from_spconv: {n} rows exceed capacity {int(capacity)}")
        key = idx[:, 0].long()
        for d, s in zip(range(1, idx.shape[1]), t.spatial_shape):
            key = key * int(s) + idx[:, d].long()
        order = torch.sort(key, stable=True)[1]
        f = feats.new_zeros((int(capacity), feats.shape[1]))
        i = torch.full((int(capacity), idx.shape[1]), -1, dtype=torch.int32, device=idx.device)
        f[:n] = feats[order]
        i[:n] = idx[order].to(torch.int32)
        count = torch.tensor(n, dtype=torch.int64, device=idx.device)
        return cls(f, i, count, tuple(int(s) for s in t.spatial_shape), int(t.batch_size))

    def to_dense_rows(self):
        """(features, indices) of the valid rows only (syncs: for tests and debugging, never in the hot path)."""
        n = int(self.count)
        return self.features[:n], self.indices[:n]
