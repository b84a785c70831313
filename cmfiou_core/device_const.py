"""Small constant tensors cached per device.

Creating a tensor from Python values on a GPU is a pageable host->device copy, which PyTorch completes with a stream
synchronisation; in per-frame code (depth stage, RoI head, scoring) such constants are therefore built once per
(values, dtype, device) and reused. The cache holds configuration-derived values only (tap offsets, grid bounds,
voxel sizes, class alphas), so it stays small.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Sequence

import torch

_CACHE: Dict[tuple, torch.Tensor] = {}


def device_cached(key: Hashable, device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()`` once per (``key``, device); later calls return the same tensor."""
    k = (key, str(torch.device(device)))
    t = _CACHE.get(k)
    if t is None:
        t = _CACHE[k] = build()
    return t


def device_const(values: Sequence, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, built once per (values, dtype, device)."""
    vals = tuple(values)
    return device_cached(("const", vals, dtype), device, lambda: torch.tensor(vals, dtype=dtype, device=device))
