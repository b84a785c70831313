"""Kernel maps on CUDA (Triton): each map of a sparse convolution in one or two kernels instead of ~60 torch ops.

One kernel, ``_map_kernel``, walks (site row, kernel offset) pairs of a site set and does one of four things, chosen
at compile time (``MODE``):

* ``GATHER`` (subm / strided conv gather map): target site ``o*s - p + k`` of output site o, looked up in the input's
  dense row grid -> ``rows[o, k]`` (``absent`` when outside, empty or o is a padding row);
* ``INVERSE`` (inverse conv gather map): coarse site ``(f + p - k) / s`` (when divisible) of fine site f, looked up in
  the coarse row grid -> ``rows[f, k]``;
* ``MARK`` (strided conv output sites): the same coarse sites written as 1 into an occupancy grid;
* ``EMIT`` (after a prefix sum over the occupancy grid): each output site's rank (= its row, rows sorted by key) ->
  the output indices ``(b, c...)`` and the output's dense row grid.

``_fill_kernel`` writes a site set's dense row grid (row of every valid site). The torch code in ``engine.sparse`` is
the reference and the CPU implementation; ``test/test_engine_triton.py`` compares both (identical integers: these
kernels do no floating-point arithmetic), on the GPU and on the CPU under Triton's interpreter
(``triton_conv.supports``).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .triton_conv import AVAILABLE, launched, supports, tl, triton

GATHER, INVERSE, MARK, EMIT = 0, 1, 2, 3

if AVAILABLE:
    @triton.jit
    def _site(idx_ptr, r, ok, ND: tl.constexpr):
        """(b, x0, x1, x2) int64 of site rows ``r`` of the (N, ND + 1) index table (x2 = 0 for 2-D tensors)."""
        row = r.to(tl.int64) * (ND + 1)
        b = tl.load(idx_ptr + row, mask=ok, other=0).to(tl.int64)
        x0 = tl.load(idx_ptr + row + 1, mask=ok, other=0).to(tl.int64)
        x1 = tl.load(idx_ptr + row + 2, mask=ok, other=0).to(tl.int64)
        if ND == 3:
            x2 = tl.load(idx_ptr + row + 3, mask=ok, other=0).to(tl.int64)
        else:
            x2 = tl.zeros_like(x0)
        return b, x0, x1, x2

    @triton.jit
    def _map_kernel(idx_ptr, count_ptr, N, grid_ptr, pos_ptr, out_ptr, out_grid_ptr, absent, cap_out,
                    T0, T1, T2, S0, S1, S2, P0, P1, P2,
                    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KP: tl.constexpr,
                    ND: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK + tl.arange(0, BLOCK)                       # site rows
        k = tl.arange(0, KP)                                        # kernel offsets (first dim outermost)
        K = K0 * K1 * K2
        count = tl.load(count_ptr)
        r_ok = (r < N) & (r < count)
        k_ok = k < K
        k0 = k // (K1 * K2)
        k1 = (k // K2) % K1
        k2 = k % K2
        b, x0, x1, x2 = _site(idx_ptr, r, r_ok, ND)
        ok = r_ok[:, None] & k_ok[None, :]
        if MODE == 0:
            c0 = x0[:, None] * S0 - P0 + k0[None, :]
            c1 = x1[:, None] * S1 - P1 + k1[None, :]
            c2 = x2[:, None] * S2 - P2 + k2[None, :]
        else:
            n0 = x0[:, None] + P0 - k0[None, :]
            n1 = x1[:, None] + P1 - k1[None, :]
            n2 = x2[:, None] + P2 - k2[None, :]
            ok = ok & (n0 >= 0) & (n1 >= 0) & (n2 >= 0)
            n0 = tl.where(ok, n0, 0)
            n1 = tl.where(ok, n1, 0)
            n2 = tl.where(ok, n2, 0)
            ok = ok & (n0 % S0 == 0) & (n1 % S1 == 0) & (n2 % S2 == 0)
            c0 = n0 // S0
            c1 = n1 // S1
            c2 = n2 // S2
        ok = ok & (c0 >= 0) & (c0 < T0) & (c1 >= 0) & (c1 < T1) & (c2 >= 0) & (c2 < T2)
        key = ((b[:, None] * T0 + c0) * T1 + c1) * T2 + c2
        key = tl.where(ok, key, 0)
        if MODE <= 1:
            got = tl.load(grid_ptr + key, mask=ok, other=absent).to(tl.int64)
            dst = r.to(tl.int64)[:, None] * K + k[None, :]
            tl.store(out_ptr + dst, got, mask=(r < N)[:, None] & k_ok[None, :])
        elif MODE == 2:
            tl.store(grid_ptr + key, tl.full(key.shape, 1, tl.int32), mask=ok)
        else:
            rank = tl.load(pos_ptr + key, mask=ok, other=1).to(tl.int64) - 1
            keep = ok & (rank < cap_out)
            base = rank * (ND + 1)
            bb = b[:, None] + tl.zeros_like(key)
            tl.store(out_ptr + base, bb.to(tl.int32), mask=keep)
            tl.store(out_ptr + base + 1, c0.to(tl.int32), mask=keep)
            tl.store(out_ptr + base + 2, c1.to(tl.int32), mask=keep)
            if ND == 3:
                tl.store(out_ptr + base + 3, c2.to(tl.int32), mask=keep)
            tl.store(out_grid_ptr + key, rank.to(tl.int32), mask=keep)

    @triton.jit
    def _fill_kernel(idx_ptr, count_ptr, N, grid_ptr, T0, T1, T2, ND: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = (r < N) & (r < tl.load(count_ptr))
        b, x0, x1, x2 = _site(idx_ptr, r, ok, ND)
        key = ((b * T0 + x0) * T1 + x1) * T2 + x2
        tl.store(grid_ptr + tl.where(ok, key, 0), r.to(tl.int32), mask=ok)


def _check(t: torch.Tensor, what: str) -> None:
    if not supports(t):
        raise RuntimeError(f"{what}: the Triton kernels need Triton and a CUDA tensor (or Triton's interpreter for a "
                           f"CPU tensor), got a {t.device.type} tensor with Triton "
                           f"{'installed' if AVAILABLE else 'missing'}; use engine.sparse's torch path")


def _dims3(v: Sequence[int], fill: int) -> Tuple[int, int, int]:
    v = [int(x) for x in v]
    return tuple(v + [fill] * (3 - len(v)))


def _launch(mode, idx, count, target_shape, stride, padding, kernel, grid=None, pos=None, out=None, out_grid=None,
            absent=0, cap_out=0, block=128):
    nd = len(target_shape)
    if nd not in (2, 3):
        raise ValueError(f"kernel maps: 2 or 3 spatial dimensions, got {nd}")
    _check(idx, "kernel maps")
    n = idx.shape[0]
    K = _dims3(kernel, 1)
    KP = triton.next_power_of_2(K[0] * K[1] * K[2])
    dummy = idx
    ic, cnt = idx.contiguous(), count.reshape(1)
    with launched("map"):
        _map_kernel[(triton.cdiv(max(n, 1), block),)](
            ic, cnt, n, grid if grid is not None else dummy,
            pos if pos is not None else dummy, out if out is not None else dummy,
            out_grid if out_grid is not None else dummy, int(absent), int(cap_out),
            *_dims3(target_shape, 1), *_dims3(stride, 1), *_dims3(padding, 0),
            K0=K[0], K1=K[1], K2=K[2], KP=KP, ND=nd, MODE=mode, BLOCK=block, num_warps=4)


def gather_rows(out_idx, out_count, in_grid, in_capacity: int, in_shape, stride, padding, kernel) -> torch.Tensor:
    """(cap_out, K) int64 input row of every (output site, offset): ``o*s - p + k`` in ``in_grid``."""
    K = _dims3(kernel, 1)
    rows = torch.empty((out_idx.shape[0], K[0] * K[1] * K[2]), dtype=torch.int64, device=out_idx.device)
    _launch(GATHER, out_idx, out_count, in_shape, stride, padding, kernel, grid=in_grid, out=rows,
            absent=in_capacity)
    return rows


def inverse_rows(fine_idx, fine_count, coarse_grid, coarse_capacity: int, coarse_shape, stride, padding, kernel):
    """(cap_fine, K) int64 coarse row of every (fine site, offset): ``(f + p - k) / s`` in ``coarse_grid``."""
    K = _dims3(kernel, 1)
    rows = torch.empty((fine_idx.shape[0], K[0] * K[1] * K[2]), dtype=torch.int64, device=fine_idx.device)
    _launch(INVERSE, fine_idx, fine_count, coarse_shape, stride, padding, kernel, grid=coarse_grid, out=rows,
            absent=coarse_capacity)
    return rows


def strided_sites(in_idx, in_count, batch_size: int, out_shape, stride, padding, kernel, out_capacity: int):
    """Output sites of a strided (or stride-1 non-subm) sparse conv: occupancy grid, prefix sum, emission.

    -> (out_idx (cap, 1+nd) int32 key-sorted, -1 padding; count () int64; overflow () int64; out_grid: the output's
    dense row grid (key_space + 1,) int32, ``out_capacity`` where empty)."""
    dev = in_idx.device
    space = int(batch_size)
    for s in out_shape:
        space *= int(s)
    mark = torch.zeros(space, dtype=torch.int32, device=dev)
    _launch(MARK, in_idx, in_count, out_shape, stride, padding, kernel, grid=mark)
    pos = torch.cumsum(mark, 0, dtype=torch.int32)
    total = pos[-1].long()
    out_idx = torch.full((int(out_capacity), len(out_shape) + 1), -1, dtype=torch.int32, device=dev)
    out_grid = torch.full((space + 1,), int(out_capacity), dtype=torch.int32, device=dev)
    _launch(EMIT, in_idx, in_count, out_shape, stride, padding, kernel, pos=pos, out=out_idx, out_grid=out_grid,
            cap_out=out_capacity)
    count = torch.clamp(total, max=int(out_capacity))
    return out_idx, count, total - count, out_grid


def fill_row_grid(idx, count, batch_size: int, shape, capacity: int) -> torch.Tensor:
    """Dense (key_space + 1,) int32 grid: the row of each valid site, ``capacity`` elsewhere."""
    space = int(batch_size)
    for s in shape:
        space *= int(s)
    _check(idx, "fill_row_grid")
    g = torch.full((space + 1,), int(capacity), dtype=torch.int32, device=idx.device)
    n = idx.shape[0]
    ic, cnt = idx.contiguous(), count.reshape(1)
    with launched("fill"):
        _fill_kernel[(triton.cdiv(max(n, 1), 256),)](ic, cnt, n, g, *_dims3(shape, 1), ND=len(shape), BLOCK=256,
                                                     num_warps=4)
    return g
