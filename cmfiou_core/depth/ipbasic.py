"""IP-Basic depth completion (Ku et al., "In Defense of Classical Image Processing: Fast Depth Completion on the CPU",
CRV 2018), the ``fill_in_fast`` pipeline, re-written in vectorised torch (CPU or GPU, fixed kernels, no host syncs).

Steps (paper / public code semantics): invert valid depths (d > 0.1) as ``max_depth - d``; dilate with a shaped kernel
(diamond 5x5 by default); morphological close with a full 5x5; fill empty pixels from a 7x7 full dilation; optionally
extend the top valid pixel of each column to the image top and fill with a 31x31 dilation; 5x5 median; bilateral
(d=5, sigma_color=1.5, sigma_space=2.0) or gaussian (5x5, sigma 1.1, valid pixels only) blur; re-invert.

Grey dilation with shaped kernels is built from max-pools: full kxk = separable (1xk then kx1); cross k = max of a
(1xk) and a (kx1) pool; diamond 5 = cross3 (+) cross3, diamond 7 = cross3 (+) cross3 (+) cross3 (Minkowski sums).
Padding is -inf, matching OpenCV's dilate/erode border (the border never wins). Median/bilateral/gaussian use
OpenCV's border modes (replicate for medianBlur, reflect-101 for the others).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import IPBasicConfig


def _pool(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return F.max_pool2d(x, (kh, kw), stride=1, padding=(kh // 2, kw // 2))


def dilate(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """Grey dilation of (B, 1, H, W) with a named structuring element (see module doc)."""
    kind, k = kernel.rstrip("0123456789"), int(kernel[len(kernel.rstrip("0123456789")):])
    if kind == "full":
        return _pool(_pool(x, 1, k), k, 1)
    if kind == "cross":
        return torch.maximum(_pool(x, 1, k), _pool(x, k, 1))
    if kind == "diamond":
        for _ in range((k - 1) // 2):
            x = torch.maximum(_pool(x, 1, 3), _pool(x, 3, 1))
        return x
    raise ValueError(f"unknown kernel {kernel!r}")


def erode(x: torch.Tensor, kernel: str) -> torch.Tensor:
    return -dilate(-x, kernel)


def _shifts(p: torch.Tensor, H: int, W: int, offsets):
    """Views of a 2-padded (B, C, H+4, W+4) tensor shifted by each (dy, dx) offset."""
    return [p[:, :, 2 + dy:2 + dy + H, 2 + dx:2 + dx + W] for dy, dx in offsets]


_OFF25 = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
_DISK2 = [(dy, dx) for dy, dx in _OFF25 if dy * dy + dx * dx <= 4]  # OpenCV bilateral d=5: radius-2 disk, 13 taps


def median5(x: torch.Tensor) -> torch.Tensor:
    """5x5 median, replicate border (cv2.medianBlur)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (2, 2, 2, 2), mode="replicate")
    return torch.stack(_shifts(p, H, W, _OFF25), -1).median(dim=-1).values


def bilateral5(x: torch.Tensor, sigma_color: float = 1.5, sigma_space: float = 2.0) -> torch.Tensor:
    """cv2.bilateralFilter(x, 5, sigma_color, sigma_space) for float images: disk of radius 2 (13 taps),
    reflect-101 border, weights exp(-r^2 / 2 s_s^2) * exp(-dI^2 / 2 s_c^2)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (2, 2, 2, 2), mode="reflect")
    num = torch.zeros_like(x)
    den = torch.zeros_like(x)
    ic = -0.5 / (sigma_color * sigma_color)
    for (dy, dx), nb in zip(_DISK2, _shifts(p, H, W, _DISK2)):
        w = math.exp(-(dy * dy + dx * dx) / (2 * sigma_space * sigma_space)) * torch.exp((nb - x) ** 2 * ic)
        num = num + w * nb
        den = den + w
    return num / den


def gaussian5(x: torch.Tensor) -> torch.Tensor:
    """cv2.GaussianBlur(x, (5, 5), 0): with sigma <= 0 and ksize <= 7 OpenCV uses its fixed binomial table
    [1, 4, 6, 4, 1] / 16 (separable), reflect-101 border."""
    H, W = x.shape[-2:]
    p = F.pad(x, (2, 2, 0, 0), mode="reflect")
    taps = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
    y = sum(t * p[..., :, i:i + W] for i, t in enumerate(taps))
    p = F.pad(y, (0, 0, 2, 2), mode="reflect")
    return sum(t * p[..., i:i + H, :] for i, t in enumerate(taps))


def extend_to_top(x: torch.Tensor, thr: float = 0.1) -> torch.Tensor:
    """Per column, copy the top-most valid (> thr) value to all rows above it (no-op for empty columns)."""
    valid = x > thr
    H = x.shape[-2]
    top = valid.to(torch.uint8).argmax(dim=-2, keepdim=True)  # first valid row (0 if none)
    top_val = torch.gather(x, -2, top)
    rows = torch.arange(H, device=x.device).view(1, 1, H, 1)
    return torch.where(rows < top, top_val.expand_as(x), x)


def ipbasic_complete(depth: torch.Tensor, cfg: IPBasicConfig = IPBasicConfig()) -> torch.Tensor:
    """Dense depth from a sparse (H, W) or (B, 1, H, W) depth map (0 = empty); same shape, device and dtype."""
    shape = depth.shape
    x = depth.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float32)
    md = float(cfg.max_depth)
    x = torch.where(x > 0.1, md - x, torch.zeros_like(x))          # invert (far -> small, so max favours near)
    x = dilate(x, cfg.dilation_kernel)                              # shaped dilation
    x = erode(dilate(x, "full5"), "full5")                          # hole closing
    x = torch.where(x < 0.1, dilate(x, "full7"), x)                 # fill empty with 7x7 dilation
    if cfg.extrapolate:
        x = extend_to_top(x)
        x = torch.where(x < 0.1, dilate(x, "full31"), x)            # large fill
    x = median5(x)
    if cfg.blur == "bilateral":
        x = bilateral5(x, 1.5, 2.0)
    elif cfg.blur == "gaussian":
        x = torch.where(x > 0.1, gaussian5(x), x)
    # re-invert; values <= 0.1 are 'empty' (IP-Basic leaves them as tiny depths; we zero them so they never lift)
    x = torch.where(x > 0.1, md - x, torch.zeros_like(x))
    return x.to(depth.dtype).reshape(shape)
