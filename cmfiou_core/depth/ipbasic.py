"""IP-Basic depth completion (Ku et al., "In Defense of Classical Image Processing: Fast Depth Completion on the CPU",
CRV 2018), the ``fill_in_fast`` pipeline, re-written in vectorised torch (CPU or GPU, fixed kernels, no host syncs).

Steps (paper / public code semantics): invert valid depths (d > 0.1) as ``max_depth - d``; dilate with a shaped kernel
(diamond 5x5 by default); morphological close with a full 5x5; fill empty pixels from a 7x7 full dilation; optionally
extend the top valid pixel of each column to the image top and fill with a 31x31 dilation; 5x5 median; bilateral
(d=5, sigma_color=1.5, sigma_space=2.0) or gaussian (5x5, sigma 1.1, valid pixels only) blur; re-invert.

Grey dilation with shaped kernels is built from max-pools: full kxk = one kxk pool on CUDA (k <= 7), separable
(1xk then kx1) otherwise; cross k = max of a (1xk) and a (kx1) pool; diamond k = max of the pools over the
rectangles (2a+1) x (k-2a), a = 0..(k-1)/2, whose union is the diamond (diamond 5 = 1x5 | 3x3 | 5x1).
Launch counts matter on the GPU (the stage is launch-bound at this image size): the whole completion is ~70 ops
there. Every path is bit-identical to the frozen code (cmfiou_core.depth.reference; tests force the CUDA paths on
the CPU with ``FORCE_GPU_PATHS``).
Padding is -inf, matching OpenCV's dilate/erode border (the border never wins). Median/bilateral/gaussian use
OpenCV's border modes (replicate for medianBlur, reflect-101 for the others).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..device_const import device_const
from .config import IPBasicConfig


FORCE_GPU_PATHS = None  # None: pick the code path by device; True/False: force it (tests run the CUDA paths on CPU)


def _gpu_path(x: torch.Tensor) -> bool:
    return x.is_cuda if FORCE_GPU_PATHS is None else bool(FORCE_GPU_PATHS)


def _pool(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return F.max_pool2d(x, (kh, kw), stride=1, padding=(kh // 2, kw // 2))


def _full(x: torch.Tensor, k: int) -> torch.Tensor:
    # one k x k pool on the GPU (one launch; the kernel reads the window from cache), separable on the CPU (faster
    # there) and for large windows; max is exact, so both give identical values
    if _gpu_path(x) and k <= 7:
        return _pool(x, k, k)
    return _pool(_pool(x, 1, k), k, 1)


def dilate(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """Grey dilation of (B, 1, H, W) with a named structuring element (see module doc)."""
    kind, k = kernel.rstrip("0123456789"), int(kernel[len(kernel.rstrip("0123456789")):])
    if kind == "full":
        return _full(x, k)
    if kind == "cross":
        return torch.maximum(_pool(x, 1, k), _pool(x, k, 1))
    if kind == "diamond":
        # |dy| + |dx| <= m  is the union of the rectangles (2a+1) x (2(m-a)+1), a = 0..m: m+1 pools, m maximums
        m = (k - 1) // 2
        out = _pool(x, 1, k)
        for a in range(1, m + 1):
            out = torch.maximum(out, _pool(x, 2 * a + 1, 2 * (m - a) + 1))
        return out
    raise ValueError(f"unknown kernel {kernel!r}")


def erode(x: torch.Tensor, kernel: str) -> torch.Tensor:
    return -dilate(-x, kernel)


def _windows(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W, 5, 5) view of the 2-padded 5x5 neighbourhoods (no copy)."""
    p = F.pad(x, (2, 2, 2, 2), mode=mode)
    return p.unfold(-2, 5, 1).unfold(-2, 5, 1)


_OFF25 = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
_DISK2 = [(dy, dx) for dy, dx in _OFF25 if dy * dy + dx * dx <= 4]  # OpenCV bilateral d=5: radius-2 disk, 13 taps
def median5(x: torch.Tensor, sort=None) -> torch.Tensor:
    """5x5 median, replicate border (cv2.medianBlur). The 25 window values are gathered with one copy of an unfold
    view; the median is ``torch.median`` on the CPU and the 13th value of a sort on CUDA (same value for finite
    inputs; CUDA's median runs a radix select with one thread block per pixel, its small-slice sort batches many
    pixels per block). ``sort`` forces one or the other (tests)."""
    shape = x.shape
    v = _windows(x, "replicate").reshape(*shape, 25)
    if _gpu_path(x) if sort is None else sort:
        return torch.sort(v, dim=-1).values[..., 12]
    return v.median(dim=-1).values


def _bilateral5_taps(x: torch.Tensor, sigma_color: float, sigma_space: float) -> torch.Tensor:
    """Per-tap loop (the frozen reference code; fastest on the CPU, ~90 small ops)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (2, 2, 2, 2), mode="reflect")
    num = torch.zeros_like(x)
    den = torch.zeros_like(x)
    ic = -0.5 / (sigma_color * sigma_color)
    for dy, dx in _DISK2:
        nb = p[:, :, 2 + dy:2 + dy + H, 2 + dx:2 + dx + W]
        w = math.exp(-(dy * dy + dx * dx) / (2 * sigma_space * sigma_space)) * torch.exp((nb - x) ** 2 * ic)
        num = num + w * nb
        den = den + w
    return num / den


def bilateral5(x: torch.Tensor, sigma_color: float = 1.5, sigma_space: float = 2.0, vectorised=None) -> torch.Tensor:
    """cv2.bilateralFilter(x, 5, sigma_color, sigma_space) for float images: disk of radius 2 (13 taps),
    reflect-101 border, weights exp(-r^2 / 2 s_s^2) * exp(-dI^2 / 2 s_c^2).

    ``vectorised`` (default: on CUDA): one gather of the 13 neighbours and one weight computation for all taps
    (~30 launches instead of ~90), then summed tap by tap in the disk order with plain adds, so num / den round
    exactly like the per-tap loop (tested equal on the CPU)."""
    if not (_gpu_path(x) if vectorised is None else vectorised):
        return _bilateral5_taps(x, sigma_color, sigma_space)
    dev = x.device
    win = _windows(x, "reflect").permute(4, 5, 0, 1, 2, 3)  # (5, 5, B, C, H, W) view
    nb = win[device_const([dy + 2 for dy, _ in _DISK2], torch.int64, dev),
             device_const([dx + 2 for _, dx in _DISK2], torch.int64, dev)]  # (13, B, C, H, W)
    ic = -0.5 / (sigma_color * sigma_color)
    space = device_const([math.exp(-(dy * dy + dx * dx) / (2 * sigma_space * sigma_space)) for dy, dx in _DISK2],
                   torch.float32, dev).view(-1, *([1] * x.dim()))
    w = space * torch.exp((nb - x) ** 2 * ic)
    t = torch.stack([w * nb, w], 1)  # (13, 2, B, C, H, W): numerator and denominator terms
    acc = t[0] + t[1]
    for i in range(2, len(_DISK2)):
        acc = acc + t[i]
    return acc[0] / acc[1]


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
    x = torch.where(x > 0.1, md - x, 0.0)                           # invert (far -> small, so max favours near)
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
    x = torch.where(x > 0.1, md - x, 0.0)
    return x.to(depth.dtype).reshape(shape)
