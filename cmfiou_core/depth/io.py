"""The official ``velodyne_depth/<id>.npy`` format (float16, N x 8, raw rows flag 2 then pseudo rows flag 1) and the
test-time pseudo-point subsampling ``input_point_discard``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..segments import run_start


class VelodyneDepthError(ValueError):
    """A velodyne_depth .npy file is malformed (the message names the file and the problem)."""


def write_velodyne_depth(path: Union[str, Path], rows) -> Path:
    """Save (N, 8) rows (numpy or tensor) as float16 ``.npy`` (the official storage; ~3-6 cm quantisation far away)."""
    arr = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if arr.ndim != 2 or arr.shape[1] != 8:
        raise VelodyneDepthError(f"{path}: rows must be (N, 8), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise VelodyneDepthError(f"{path}: rows contain NaN/inf")
    with np.errstate(over="ignore"):
        a16 = arr.astype(np.float16)
    if not np.all(np.isfinite(a16)):
        raise VelodyneDepthError(f"{path}: values overflow float16 (|v| > 65504)")
    path = Path(path)
    with open(path, "wb") as f:  # np.save(path) would append .npy to names without it
        np.save(f, a16, allow_pickle=False)
    return path


def read_velodyne_depth(path: Union[str, Path]) -> np.ndarray:
    """Load and validate: a float16 (N, 8) array, all finite, last column (flag) in {1, 2}."""
    path = Path(path)
    if not path.is_file():
        raise VelodyneDepthError(f"velodyne_depth file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise VelodyneDepthError(f"{path}: not a plain .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise VelodyneDepthError(f"{path}: expected a single array, got {type(arr).__name__}")
    if arr.dtype != np.float16:
        raise VelodyneDepthError(f"{path}: dtype must be float16 (official format), got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 8:
        raise VelodyneDepthError(f"{path}: shape must be (N, 8) [x,y,z,i*10,r,g,b,flag], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise VelodyneDepthError(f"{path}: contains NaN/inf")
    if arr.shape[0] and not np.all(np.isin(arr[:, 7], (1.0, 2.0))):
        raise VelodyneDepthError(f"{path}: flag column must be 1 (pseudo) or 2 (raw)")
    return arr


def input_point_discard(points: torch.Tensor, rate: float = 0.8, bin_num: int = 10, max_dis: float = 60.0,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Official test-time ``input_point_discard(points, bin_num=10, rate=0.8)`` (``partition`` with max_dis 60).

    Points are binned by x in ``max_dis / bin_num`` slabs (last slab open-ended; x < 0 belongs to no slab and is
    dropped, as in the official code). Walking from the far slab inwards, the far slabs are kept whole while the
    running estimate stays under ``1 - rate`` of all points; each remaining near slab is randomly capped to
    ``int((int(N (1 - rate)) - kept_far) / (pos + 1e-4))`` points. Output order follows the official concatenation
    (far slab first; capped slabs in random order). ``generator`` (a ``torch.Generator`` on the points' device, or a
    CPU one) makes it reproducible. Host syncs: the 10 slab counts and the output size.
    """
    N = points.shape[0]
    if N == 0:
        return points
    retain = 1.0 - rate
    dev = points.device
    inter = max_dis / bin_num
    x = points[:, 0]
    b = torch.clamp(torch.floor(x / inter), max=bin_num - 1).to(torch.int64)
    inbin = x >= 0
    b = torch.where(inbin, b, torch.full_like(b, -1))
    counts = torch.bincount(b[inbin], minlength=bin_num).tolist()
    acc, pos, dist_acc = 0, bin_num - 1, 0
    for i in range(bin_num - 1, -1, -1):
        acc += counts[i]
        if (acc + i * counts[i]) / N < retain:
            pos, dist_acc = i, acc
    pos = max(pos, 0)
    per_bin = int((int(N * retain) - dist_acc) / (pos + 0.0001))
    if generator is not None and generator.device != dev:
        rnd = torch.rand(N, generator=generator, device=generator.device).to(dev)
    else:
        rnd = torch.rand(N, generator=generator, device=dev)
    # rank of each point inside its slab in random order
    key = (b + 1).to(torch.float64) * 2.0 + rnd.to(torch.float64)  # slab-major, random inside
    order = torch.argsort(key, stable=True)  # float32 draws repeat: ties keep input order on every host
    rank = torch.empty(N, dtype=torch.int64, device=dev)
    sb = b[order]
    start = torch.ones(N, dtype=torch.bool, device=dev)
    start[1:] = sb[1:] != sb[:-1]
    p = torch.arange(N, device=dev)
    rank[order] = p - run_start(start)
    capped = inbin & (b < pos)
    keep = inbin & ((b >= pos) | (rank < per_bin))
    within = torch.where(capped, rank, p)
    okey = torch.where(keep, (bin_num - 1 - b) * (N + 1) + within, torch.full_like(p, bin_num * (N + 1) + N))
    idx = torch.argsort(okey)[: int(keep.sum())]
    return points[idx]
