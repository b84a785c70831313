"""Static-shape sparse convolution: kernel maps built on the device, gather -> one GEMM over all kernel offsets.

Every tensor has a fixed row capacity and the number of valid rows stays on the device (``PaddedSparse.count``), so a
whole backbone runs without a host sync and can be captured in a CUDA graph. The semantics are spconv's (2.x):

* ``subm``: output sites = input sites; output o gathers input ``o + k - K//2`` for every kernel offset k.
* ``conv`` (kernel K, stride s, padding p): output o exists when some valid input ``i = o*s - p + k`` exists
  (0 <= o < out_shape); it gathers those inputs.
* ``inverse`` (paired with a ``conv`` by spconv's ``indice_key``): output sites = that conv's input sites; fine site f
  gathers the coarse sites c with ``f = c*s - p + k``, with the same weight offset k as the forward pair.

Weights are spconv's ``(Cout, *K, Cin)`` layout, flattened to ``(prod(K) * Cin, Cout)`` with BatchNorm folded in.
Site tables are sorted linear keys, looked up with ``searchsorted``: no hashing, so the result does not depend on the
order of the input rows or on the device. Rows of a ``PaddedSparse`` are always sorted by key (valid rows first).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .padded import PaddedSparse

SENTINEL = torch.iinfo(torch.int64).max
# Site tables: on CUDA a dense grid over the key space (prefix-sum compaction, O(1) lookups) when it has at most
# DENSE_MAX cells, else (and on the CPU) sorted keys with sort / searchsorted. Both give identical tables.
DENSE_MAX = 1 << 30
USE_TRITON = True            # CUDA: the fused Triton conv (engine.triton_conv) instead of gather + GEMM
USE_TRITON_MAPS = True       # CUDA: kernel maps by engine.triton_maps (one or two kernels a map) on dense grids
_FORCE_DENSE = None          # tests: True / False to force a path, None = by device
TRITON_ON_CPU = False        # tests: the Triton kernels on CPU tensors too (needs Triton's interpreter, see triton_conv)


def use_dense(device, key_space: int) -> bool:
    dense = (torch.device(device).type == "cuda") if _FORCE_DENSE is None else _FORCE_DENSE
    return bool(dense) and key_space <= DENSE_MAX


# --------------------------------------------------------------------------------------------------- keys and tables
def linear_keys(indices: torch.Tensor, spatial_shape: Sequence[int], valid: Optional[torch.Tensor] = None):
    """(N, 1 + nd) int (b, *coords) -> (N,) int64 key ``((b * S0 + c0) * S1 + c1) ...``; invalid rows -> SENTINEL."""
    idx = indices.long()
    key = idx[:, 0]
    for d, s in enumerate(spatial_shape):
        key = key * int(s) + idx[:, 1 + d]
    if valid is None:
        valid = idx[:, 0] >= 0
    return torch.where(valid, key, torch.full_like(key, SENTINEL))


def keys_to_indices(keys: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`linear_keys` -> (N, 1 + nd) int32; SENTINEL rows -> -1."""
    valid = keys != SENTINEL
    k = torch.where(valid, keys, torch.zeros_like(keys))
    cols = []
    for s in reversed([int(v) for v in spatial_shape]):
        cols.append(k % s)
        k = k // s
    cols.append(k)
    out = torch.stack(cols[::-1], dim=1).int()
    return torch.where(valid[:, None], out, torch.full_like(out, -1))


def lookup(table_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Row of each query key in a sorted key table, or ``len(table)`` (the zero row of a gather) when absent."""
    cap = table_keys.shape[0]
    pos = torch.searchsorted(table_keys, query).clamp_max(cap - 1)
    hit = (table_keys[pos] == query) & (query != SENTINEL)
    return torch.where(hit, pos, torch.full_like(pos, cap))


def compact_unique(keys: torch.Tensor, capacity: int, key_space: Optional[int] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique keys of ``keys`` (SENTINEL = none), sorted, in a (capacity,) buffer padded with SENTINEL.

    Returns ``(table, count, overflow)``: count = number of unique keys kept (<= capacity), overflow = how many did not
    fit (both 0-dim device tensors). Static shapes: sort, first-of-run mask, prefix sum, scatter; or, with
    ``key_space`` on CUDA, an occupancy grid over all possible keys and its prefix sum (no sort)."""
    if key_space is not None and use_dense(keys.device, key_space):
        return _compact_dense(keys, capacity, key_space)
    s, _ = torch.sort(keys)
    first = torch.ones_like(s, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    first &= s != SENTINEL
    pos = torch.cumsum(first.long(), 0) - 1
    total = first.sum()
    keep = first & (pos < capacity)
    dst = torch.where(keep, pos, torch.full_like(pos, capacity))
    table = torch.full((capacity + 1,), SENTINEL, dtype=torch.int64, device=keys.device)
    table.scatter_(0, dst, torch.where(keep, s, torch.full_like(s, SENTINEL)))
    count = torch.clamp(total, max=capacity)
    return table[:capacity], count, total - count


def _compact_dense(keys: torch.Tensor, capacity: int, key_space: int):
    valid = keys != SENTINEL
    k = torch.where(valid, keys, torch.full_like(keys, key_space))
    mark = torch.zeros(key_space + 1, dtype=torch.int32, device=keys.device)
    mark.scatter_(0, k, torch.ones_like(k, dtype=torch.int32))
    pos = torch.cumsum(mark[:key_space], 0, dtype=torch.int32)
    total = pos[-1].long()
    rank = pos.gather(0, k.clamp(max=key_space - 1)).long() - 1       # rank of each key among the occupied cells
    keep = valid & (rank < capacity)
    table = torch.full((capacity + 1,), SENTINEL, dtype=torch.int64, device=keys.device)
    table.scatter_(0, torch.where(keep, rank, torch.full_like(rank, capacity)),
                   torch.where(keep, keys, torch.full_like(keys, SENTINEL)))
    count = torch.clamp(total, max=capacity)
    return table[:capacity], count, total - count


def _triton_device(device) -> bool:
    """The Triton kernels run for tensors on ``device``: CUDA, or the CPU in tests (``TRITON_ON_CPU``)."""
    t = torch.device(device).type
    return t == "cuda" or (TRITON_ON_CPU and t == "cpu")


def _triton_maps(device, key_space: int) -> bool:
    if not (USE_TRITON_MAPS and _triton_device(device) and use_dense(device, key_space)):
        return False
    from . import triton_conv
    return triton_conv.supports(device)


def row_grid(sites: PaddedSparse) -> torch.Tensor:
    """Dense (key_space + 1,) int32 grid: the row of each occupied site, ``capacity`` elsewhere (cached per site set)."""
    g = sites.__dict__.get("_row_grid")
    if g is None and _triton_maps(sites.indices.device, sites.key_space):
        from .triton_maps import fill_row_grid
        g = fill_row_grid(sites.indices, sites.count, sites.batch_size, sites.spatial_shape, sites.capacity)
        sites.__dict__["_row_grid"] = g
    if g is None:
        cap = sites.capacity
        keys = linear_keys(sites.indices, sites.spatial_shape, sites.valid)
        ks = sites.key_space
        g = torch.full((ks + 1,), cap, dtype=torch.int32, device=keys.device)
        g.scatter_(0, torch.where(keys != SENTINEL, keys, torch.full_like(keys, ks)),
                   torch.arange(cap, dtype=torch.int32, device=keys.device))
        g[ks:].fill_(cap)     # the dump cell of the padding rows
        sites.__dict__["_row_grid"] = g
    return g


def lookup_sites(sites: PaddedSparse, query: torch.Tensor) -> torch.Tensor:
    """Row of each query key among ``sites`` (``capacity`` when absent or SENTINEL)."""
    ks = sites.key_space
    if use_dense(query.device, ks):
        g = row_grid(sites)
        q = torch.where(query != SENTINEL, query, torch.full_like(query, ks))
        return g[q].long()
    return lookup(linear_keys(sites.indices, sites.spatial_shape, sites.valid), query)


def sort_sites(features: torch.Tensor, indices: torch.Tensor, spatial_shape: Sequence[int], batch_size: int,
               capacity: int, valid: Optional[torch.Tensor] = None) -> PaddedSparse:
    """Unordered rows (unique sites) -> a key-sorted ``PaddedSparse`` of ``capacity`` rows (rows beyond the capacity are
    dropped, the largest keys first). ``valid`` marks the rows to keep (default: all)."""
    n = indices.shape[0]
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=indices.device)
    keys = linear_keys(indices, spatial_shape, valid)
    s, order = torch.sort(keys, stable=True)
    if n >= capacity:
        s, order = s[:capacity], order[:capacity]
    else:
        pad = capacity - n
        s = torch.cat([s, s.new_full((pad,), SENTINEL)])
        order = torch.cat([order, order.new_full((pad,), n)])
    ok = s != SENTINEL
    feats = torch.cat([features, features.new_zeros((1, features.shape[1]))])[torch.where(ok, order, n)]
    return PaddedSparse(feats, keys_to_indices(s, spatial_shape), ok.sum(), tuple(int(v) for v in spatial_shape),
                        batch_size)


# --------------------------------------------------------------------------------------------------- geometry
_OFFSETS = {}


def _kernel_offsets(kernel: Sequence[int], device) -> torch.Tensor:
    """(prod(K), nd) offsets in spconv's weight order (first spatial dim outermost). Cached per device, so that a CUDA
    graph capture (after a warm-up run) makes no host->device copy."""
    key = (tuple(kernel), str(device))
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.tensor(list(itertools.product(*[range(k) for k in kernel])), dtype=torch.long,
                                     device=device)
    return _OFFSETS[key]


def _tuple(v, nd: int) -> Tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def conv_out_shape(shape: Sequence[int], kernel, stride, padding) -> Tuple[int, ...]:
    nd = len(shape)
    k, s, p = _tuple(kernel, nd), _tuple(stride, nd), _tuple(padding, nd)
    return tuple((shape[d] + 2 * p[d] - k[d]) // s[d] + 1 for d in range(nd))


@dataclass
class KernelMap:
    """For every output row: the input row per kernel offset (``in_capacity`` = absent). (out_cap, K) int64."""
    rows: torch.Tensor
    out: PaddedSparse          # output site set (features unset: zeros of width 0)


def _neighbour_rows(sites: PaddedSparse, out_idx: torch.Tensor, out_valid: torch.Tensor, offsets: torch.Tensor,
                    stride: Sequence[int], padding: Sequence[int], in_shape: Sequence[int],
                    out_count: Optional[torch.Tensor] = None, kernel: Sequence[int] = ()) -> torch.Tensor:
    """Input rows ``o*s - p + k`` for outputs ``out_idx`` (cap, 1+nd) and offsets (K, nd) -> (cap, K)."""
    nd = offsets.shape[1]
    if out_count is not None and _triton_maps(out_idx.device, sites.key_space):
        from .triton_maps import gather_rows
        return gather_rows(out_idx, out_count, row_grid(sites), sites.capacity, in_shape, stride, padding, kernel)
    coords = torch.stack([out_idx[:, 1 + d].long()[:, None] * int(stride[d]) - int(padding[d]) + offsets[None, :, d]
                          for d in range(nd)], dim=-1)
    inside = torch.ones(coords.shape[:2], dtype=torch.bool, device=out_idx.device)
    for d in range(nd):
        inside &= (coords[..., d] >= 0) & (coords[..., d] < int(in_shape[d]))
    inside &= out_valid[:, None]
    key = out_idx[:, 0].long()[:, None].expand(-1, offsets.shape[0])
    for d in range(nd):
        key = key * int(in_shape[d]) + coords[..., d]
    key = torch.where(inside, key, torch.full_like(key, SENTINEL))
    return lookup_sites(sites, key.reshape(-1)).reshape(key.shape)


def subm_map(sites: PaddedSparse, kernel) -> KernelMap:
    nd = len(sites.spatial_shape)
    k = _tuple(kernel, nd)
    offs = _kernel_offsets(k, sites.indices.device)
    rows = _neighbour_rows(sites, sites.indices, sites.valid, offs, (1,) * nd, tuple(x // 2 for x in k),
                           sites.spatial_shape, sites.count, k)
    return KernelMap(rows, sites)


def conv_map(sites: PaddedSparse, kernel, stride, padding, out_capacity: int) -> Tuple[KernelMap, torch.Tensor]:
    """Strided (or stride-1 dilating) sparse conv: output sites by candidate generation + sort/unique compaction, then
    the gather map. Returns ``(map, overflow)`` (overflow: output sites that did not fit, a device tensor)."""
    nd = len(sites.spatial_shape)
    k, s, p = _tuple(kernel, nd), _tuple(stride, nd), _tuple(padding, nd)
    out_shape = conv_out_shape(sites.spatial_shape, k, s, p)
    dev = sites.indices.device
    offs = _kernel_offsets(k, dev)
    space = int(sites.batch_size) * int(np.prod(out_shape))
    if _triton_maps(dev, space) and _triton_maps(dev, sites.key_space):
        from .triton_maps import gather_rows, strided_sites
        out_idx, count, overflow, grid = strided_sites(sites.indices, sites.count, sites.batch_size, out_shape, s, p, k,
                                                       out_capacity)
        out = PaddedSparse(sites.features.new_zeros((out_capacity, 0)), out_idx, count, out_shape, sites.batch_size)
        out.__dict__["_row_grid"] = grid
        rows = gather_rows(out_idx, count, row_grid(sites), sites.capacity, sites.spatial_shape, s, p, k)
        return KernelMap(rows, out), overflow
    ok = sites.valid[:, None].expand(-1, offs.shape[0])
    o = []
    for d in range(nd):
        num = sites.indices[:, 1 + d].long()[:, None] + int(p[d]) - offs[None, :, d]   # o * s for each (i, k)
        od = torch.div(num, int(s[d]), rounding_mode="floor")
        ok = ok & (num - od * int(s[d]) == 0) & (od >= 0) & (od < out_shape[d])
        o.append(od)
    key = sites.indices[:, 0].long()[:, None].expand(-1, offs.shape[0])
    for d in range(nd):
        key = key * out_shape[d] + o[d]
    key = torch.where(ok, key, torch.full_like(key, SENTINEL))
    table, count, overflow = compact_unique(key.reshape(-1), out_capacity, space)
    out_idx = keys_to_indices(table, out_shape)
    out = PaddedSparse(sites.features.new_zeros((out_capacity, 0)), out_idx, count, out_shape, sites.batch_size)
    rows = _neighbour_rows(sites, out_idx, out.valid, offs, s, p, sites.spatial_shape)
    return KernelMap(rows, out), overflow


def inverse_map(coarse: PaddedSparse, fine: PaddedSparse, kernel, stride, padding) -> KernelMap:
    """Inverse of ``conv_map(fine, kernel, stride, padding)``: fine site f gathers coarse c with f = c*s - p + k."""
    nd = len(fine.spatial_shape)
    k, s, p = _tuple(kernel, nd), _tuple(stride, nd), _tuple(padding, nd)
    dev = fine.indices.device
    if _triton_maps(dev, coarse.key_space):
        from .triton_maps import inverse_rows
        rows = inverse_rows(fine.indices, fine.count, row_grid(coarse), coarse.capacity, coarse.spatial_shape, s, p, k)
        return KernelMap(rows, fine)
    offs = _kernel_offsets(k, dev)
    ok = fine.valid[:, None].expand(-1, offs.shape[0])
    c = []
    for d in range(nd):
        num = fine.indices[:, 1 + d].long()[:, None] + int(p[d]) - offs[None, :, d]
        cd = torch.div(num, int(s[d]), rounding_mode="floor")
        ok = ok & (num - cd * int(s[d]) == 0) & (cd >= 0) & (cd < int(coarse.spatial_shape[d]))
        c.append(cd)
    key = fine.indices[:, 0].long()[:, None].expand(-1, offs.shape[0])
    for d in range(nd):
        key = key * int(coarse.spatial_shape[d]) + c[d]
    key = torch.where(ok, key, torch.full_like(key, SENTINEL))
    rows = lookup_sites(coarse, key.reshape(-1)).reshape(key.shape)
    return KernelMap(rows, fine)


# --------------------------------------------------------------------------------------------------- compute
class FoldedConv(nn.Module):
    """A spconv conv (no bias) with an optional following eval BatchNorm folded in: y = gather(x) @ W + b."""

    def __init__(self, conv: nn.Module, bn: Optional[nn.Module] = None):
        super().__init__()
        w = conv.weight.detach()                               # (Cout, *K, Cin)
        cout, cin = w.shape[0], w.shape[-1]
        self.kernel = tuple(int(v) for v in w.shape[1:-1])
        wf = w.reshape(cout, -1, cin).permute(1, 2, 0).reshape(-1, cout).float()   # (K*Cin, Cout)
        bias = w.new_zeros(cout).float() if getattr(conv, "bias", None) is None else conv.bias.detach().float()
        if bn is not None:
            scale, shift = bn_affine(bn)
            wf = wf * scale[None]
            bias = bias * scale + shift
        self.register_buffer("weight", wf.contiguous())
        self.register_buffer("weight_t", wf.t().contiguous())       # (Cout, K*Cin): the fused kernel's WT tiles
        self.register_buffer("bias", bias.contiguous())
        self.cin, self.cout = cin, cout

    def forward(self, x: torch.Tensor, kmap: KernelMap, relu: bool = False, residual: Optional[torch.Tensor] = None,
                mask: bool = False) -> torch.Tensor:
        """gather(x) @ W + b [+ residual] [-> ReLU] [-> padding rows of the output set zeroed (``mask``)]."""
        if USE_TRITON and _triton_device(x.device):
            from . import triton_conv

            if triton_conv.supports(x) and triton_conv.TILES.get(x.dtype) != "torch":
                return triton_conv.sparse_conv(x, kmap.rows, self.weight, self.bias, relu=relu, residual=residual,
                                               count=kmap.out.count if mask else None, weight_t=self.weight_t)
        y = gather_gemm(x, kmap.rows, self.weight, self.bias, relu=relu, residual=residual)
        return masked(y, kmap.out.valid) if mask else y


def gather_gemm(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool = False,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused conv's torch path (its reference and the CPU implementation): gather(x, rows) @ weight + bias
    [+ residual] [-> ReLU]; rows[m, k] >= len(x) is an absent tap. x (N, Cin), rows (M, K), weight (K*Cin, Cout)."""
    xp = torch.cat([x, x.new_zeros((1, x.shape[1]))])
    g = xp[torch.clamp(rows, max=x.shape[0])]                # (M, K, Cin)
    y = torch.addmm(bias.to(x.dtype), g.reshape(g.shape[0], -1), weight.to(x.dtype))
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y


def bn_affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as (scale, shift) in float32."""
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.detach().float() + bn.eps)
    shift = bn.bias.detach().float() - bn.running_mean.detach().float() * scale
    return scale, shift


class Affine(nn.Module):
    """An eval BatchNorm1d as buffers: ``x * scale + shift``."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        scale, shift = bn_affine(bn)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def masked(y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the padding rows (the bias of an all-absent gather is not zero)."""
    return torch.where(valid[:, None], y, torch.zeros_like(y))
