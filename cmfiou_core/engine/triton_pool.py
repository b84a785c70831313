"""Fused grid pooling (Triton): voxel query + grouping + position MLP + max-pool + output MLP of every (source,
scale) pair of one modality in ONE kernel launch, instead of ~140 torch ops a stage and modality.

One program takes ``BM`` query points (RoI grid points) and one (source s, scale k) pair:

0. **The query's voxel** at the source's stride from its integral stride-1 grid coordinates (``floor(c / stride)``
   in integers, the torch path's ``coords // stride`` and ``.int()``), and its sample (frame ``m // P`` pools
   sample ``sample_offset + m // P``).
1. **Voxel query** (integers and the distance test only): the scale's cube of (2rz+1)(2ry+1)(2rx+1) cells around
   the query's voxel, in the eager scan order (dz outermost, dy, dx innermost), ``BC`` cells at a time. A cell is a
   hit when it lies inside the source's (B, Z, Y, X) grid, its voxel -> row map entry is a row (padding rows are
   never in the map) and its float32 distance ``((dx*dx + dy*dy) + dz*dz)`` is not above ``radius^2`` (float32),
   with ``d = ((index + 0.5) * voxel + origin) - q``: the torch path's operations, in the same order, with
   floating-point contraction (FMA) switched off at compile time, so the neighbour sets are bit-identical. The first
   ``nsample`` hits in scan order are written to a slot table (a running count per query, a prefix sum per block);
   the scan of a block stops once every query of it has ``nsample`` hits.
2. **Grouping and pooling**: the selected rows' ``mlps_in`` features and voxel centres are gathered (a
   (BM, nsample, C) tile), ``relu(f + (gx * A0 + gy * A1 + gz * A2 + a))`` with the folded position MLP, then the
   max over the slots; a query without a hit pools ``relu(a)`` (the eager module zeroes an empty query's
   features and offsets). Then the folded output MLP ``relu(nf @ W + b)`` as one tile product, written straight
   into the (M, S*Kn*Cout) output in the eager channel order (source-major, then scale).

The torch code in ``engine.roi.fused_grid_pool`` stays the reference and the CPU implementation. Equality: the
neighbour rows and counts are identical (integers, tested exactly), the pooled features equal the torch path up
to float32 rounding of the 3-term position product and the output product (fp32 accumulation, IEEE products unless
torch's matmul TF32 switch is on: ``torch.backends.cuda.matmul.allow_tf32``, as ``triton_conv``); the max itself
is exact. ``test/test_engine_pool.py`` runs the kernel against the torch path under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) and on the GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..opcount import kernel_launch
from .triton_conv import AVAILABLE, INTERPRETER, supports, tl, triton

# (query points per program (>= 16: the output product's tile height), cube cells per scan step, warps): compiled
# (sm_90: 128 registers, no spills) and interpreted (fewer, larger numpy steps; the interpreter's cost is per op)
BLOCKS_CUDA = (16, 64, 8)
BLOCKS_INTERPRETED = (128, 256, 4)


if AVAILABLE:
    @triton.jit
    def _grid_pool_kernel(coords_ptr, P, sample0, q_ptr, v2p_ptr, srci_ptr, srcf_ptr, ski_ptr, skf_ptr, f_ptr, xyz_ptr,
                          pw_ptr, pb_ptr, ow_ptr, ob_ptr, out_ptr, idx_ptr, cnt_ptr, M, px, py, pz,
                          KN: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr, C: tl.constexpr,
                          CP: tl.constexpr, CO: tl.constexpr, COP: tl.constexpr, OUTW: tl.constexpr,
                          BM: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        sk = tl.program_id(1)                      # (source, scale) pair: s * KN + k
        s = sk // KN
        base = tl.load(srci_ptr + s * 6)           # offset of the source in the voxel -> row map
        nb_b = tl.load(srci_ptr + s * 6 + 1)       # (B, Z, Y, X) of the source's grid
        nz = tl.load(srci_ptr + s * 6 + 2)
        ny = tl.load(srci_ptr + s * 6 + 3)
        nx = tl.load(srci_ptr + s * 6 + 4)
        st = tl.load(srci_ptr + s * 6 + 5).to(tl.int32)   # the source's stride
        vx = tl.load(srcf_ptr + s * 3)             # float32 voxel size at the source's stride
        vy = tl.load(srcf_ptr + s * 3 + 1)
        vz = tl.load(srcf_ptr + s * 3 + 2)
        off = tl.load(ski_ptr + sk * 4)            # table row offset of (s, k)
        rz = tl.load(ski_ptr + sk * 4 + 1).to(tl.int32)
        ry = tl.load(ski_ptr + sk * 4 + 2).to(tl.int32)
        rx = tl.load(ski_ptr + sk * 4 + 3).to(tl.int32)
        r2 = tl.load(skf_ptr + sk)                 # float32 radius^2
        m = pid * BM + tl.arange(0, BM)
        mok = m < M
        m64 = m.to(tl.int64)
        # the query's voxel at the source's stride: floor(c / stride) of the integral stride-1 coordinates (the torch
        # path's float ``coords // stride`` then ``.int()``; exact for |c| < 2^31), in non-negative integer divisions
        # (C and Python division agree there); frame m // P pools sample sample0 + m // P
        cb = (sample0 + m // P).to(tl.int64)
        gx0 = tl.load(coords_ptr + m64 * 3, mask=mok, other=0.0).to(tl.int32)
        gy0 = tl.load(coords_ptr + m64 * 3 + 1, mask=mok, other=0.0).to(tl.int32)
        gz0 = tl.load(coords_ptr + m64 * 3 + 2, mask=mok, other=0.0).to(tl.int32)
        cx = tl.where(gx0 >= 0, gx0 // st, -((st - 1 - gx0) // st))
        cy = tl.where(gy0 >= 0, gy0 // st, -((st - 1 - gy0) // st))
        cz = tl.where(gz0 >= 0, gz0 // st, -((st - 1 - gz0) // st))
        qx = tl.load(q_ptr + m64 * 3, mask=mok, other=0.0)
        qy = tl.load(q_ptr + m64 * 3 + 1, mask=mok, other=0.0)
        qz = tl.load(q_ptr + m64 * 3 + 2, mask=mok, other=0.0)
        bok = mok & (cb >= 0) & (cb < nb_b)
        dxn = 2 * rx + 1
        dyn = 2 * ry + 1
        dyx = dyn * dxn
        ncell = (2 * rz + 1) * dyx
        slot_row = (sk * M + m64) * NSP
        # ---- 1. voxel query: the first NS hits in scan order -> idx[sk, m, slot]
        cnt = tl.where(mok, 0, NS)                 # rows past M count as full (they end the scan)
        col = tl.arange(0, BC)
        c0 = ncell * 0
        go = ncell > 0
        while go:
            c = c0 + col
            cok = c < ncell
            zz = cz[:, None] + (c // dyx - rz)[None, :]
            yy = cy[:, None] + ((c // dxn) % dyn - ry)[None, :]
            xx = cx[:, None] + (c % dxn - rx)[None, :]
            inb = bok[:, None] & cok[None, :] & (zz >= 0) & (zz < nz) & (yy >= 0) & (yy < ny) & \
                (xx >= 0) & (xx < nx)
            flat = base + ((cb[:, None] * nz + zz) * ny + yy) * nx + xx
            nb = tl.load(v2p_ptr + tl.where(inb, flat, 0), mask=inb, other=-1)
            ddx = ((xx.to(tl.float32) + 0.5) * vx + px) - qx[:, None]
            ddy = ((yy.to(tl.float32) + 0.5) * vy + py) - qy[:, None]
            ddz = ((zz.to(tl.float32) + 0.5) * vz + pz) - qz[:, None]
            d2 = (ddx * ddx + ddy * ddy) + ddz * ddz
            hit = (nb >= 0) & ~(d2 > r2)           # the torch path's test (a NaN distance counts as a hit there too)
            hi = hit.to(tl.int32)
            slot = cnt[:, None] + tl.cumsum(hi, axis=1) - 1
            take = hit & (slot < NS)
            tl.store(idx_ptr + slot_row[:, None] + slot, nb.to(tl.int32), mask=take)
            cnt = cnt + tl.sum(hi, axis=1)
            c0 += BC
            go = (c0 < ncell) & (tl.min(cnt, axis=0) < NS)
        n = tl.minimum(cnt, NS)
        tl.store(cnt_ptr + sk * M + m64, n, mask=mok)
        tl.debug_barrier()                         # this program's slot table, written by other threads
        # ---- 2. grouping, position MLP, max over the slots
        j = tl.arange(0, NSP)
        valid = (j[None, :] < n[:, None]) & mok[:, None]
        row = tl.load(idx_ptr + slot_row[:, None] + j[None, :], mask=valid, other=0).to(tl.int64) + off
        ch = tl.arange(0, CP)
        chok = ch < C
        f = tl.load(f_ptr + row[:, :, None] * C + ch[None, None, :], mask=valid[:, :, None] & chok[None, None, :],
                    other=0.0)
        gx = tl.load(xyz_ptr + row * 3, mask=valid, other=0.0) - qx[:, None]
        gy = tl.load(xyz_ptr + row * 3 + 1, mask=valid, other=0.0) - qy[:, None]
        gz = tl.load(xyz_ptr + row * 3 + 2, mask=valid, other=0.0) - qz[:, None]
        w0 = tl.load(pw_ptr + (sk * 3) * C + ch, mask=chok, other=0.0)
        w1 = tl.load(pw_ptr + (sk * 3 + 1) * C + ch, mask=chok, other=0.0)
        w2 = tl.load(pw_ptr + (sk * 3 + 2) * C + ch, mask=chok, other=0.0)
        pb = tl.load(pb_ptr + sk * C + ch, mask=chok, other=0.0)
        pos = ((gx[:, :, None] * w0[None, None, :] + gy[:, :, None] * w1[None, None, :]) +
               gz[:, :, None] * w2[None, None, :]) + pb[None, None, :]
        v = tl.where(valid[:, :, None], tl.maximum(f + pos, 0.0), 0.0)   # relu >= 0: 0 is neutral for the max
        nf = tl.max(v, axis=1)                                              # (BM, CP)
        nf = tl.where((n == 0)[:, None], tl.maximum(pb, 0.0)[None, :], nf)  # empty query: relu(a)
        # ---- 3. output MLP (folded BN) + ReLU
        ci = tl.arange(0, CP)
        co = tl.arange(0, COP)
        cook = co < CO
        w = tl.load(ow_ptr + (sk * C + ci[:, None]) * CO + co[None, :], mask=(ci < C)[:, None] & cook[None, :],
                    other=0.0)
        if IEEE:
            o = tl.dot(nf, w, input_precision="ieee")
        else:
            o = tl.dot(nf, w)
        o = tl.maximum(o + tl.load(ob_ptr + sk * CO + co, mask=cook, other=0.0)[None, :], 0.0)
        tl.store(out_ptr + m64[:, None] * OUTW + sk * CO + co[None, :], o, mask=mok[:, None] & cook[None, :])


def grid_pool(fm, coords: torch.Tensor, q: torch.Tensor, sample_offset: int = 0, with_rows: bool = False,
              blocks: Optional[tuple] = None) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """``engine.roi.fused_grid_pool`` as one kernel: fm a ``FusedModality``, coords (B, P, 3) float integral grid
    coordinates at stride 1 (x, y, z) of frame b's queries (which pool sample ``sample_offset + b``), q (B*P, 3)
    float32 query points -> (B*P, S*Kn*Cout) pooled features, and with
    ``with_rows`` the slot table (S*Kn, M, NSP) int32 (rows within the source; slots >= count unspecified) and the
    per-query hit counts (S*Kn, M) int32 (capped at nsample). ``blocks``: (BM, BC, warps) instead of the defaults."""
    if not supports(q):
        raise RuntimeError(f"triton_pool.grid_pool: the kernel needs Triton and CUDA tensors (or Triton's interpreter "
                           f"for CPU tensors), got {q.device.type} tensors with Triton "
                           f"{'installed' if AVAILABLE else 'missing'}; use engine.roi.fused_grid_pool's torch path")
    if fm.f_in.dtype != torch.float32 or q.dtype != torch.float32:
        raise TypeError(f"triton_pool.grid_pool: float32 features and queries, got {fm.f_in.dtype} / {q.dtype}")
    bm, bc, warps = blocks or (BLOCKS_INTERPRETED if INTERPRETER else BLOCKS_CUDA)
    S = int(fm.src_i.shape[0])
    P = int(coords.shape[1])
    M = int(coords.shape[0]) * P
    if q.shape != (M, 3):
        raise ValueError(f"triton_pool.grid_pool: q {tuple(q.shape)} for coords {tuple(coords.shape)}")
    coords = coords.reshape(M, 3).float().contiguous()
    KN = len(fm.ranges)
    SK = S * KN
    NS = int(fm.nsample[0])
    C = int(fm.f_in.shape[1])
    CO = int(fm.out_w.shape[2])
    dev = q.device
    out = torch.empty((M, SK * CO), dtype=torch.float32, device=dev)
    NSP = triton.next_power_of_2(NS)
    idx = torch.empty((SK, M, NSP), dtype=torch.int32, device=dev)
    cnt = torch.empty((SK, M), dtype=torch.int32, device=dev)
    if M:
        px, py, pz = (float(v) for v in fm.origin)
        grid = (triton.cdiv(M, bm), SK)
        with kernel_launch("triton.grid_pool"):
            _grid_pool_kernel[grid](
                coords, P, int(sample_offset), q, fm.v2p, fm.src_i, fm.src_f, fm.sk_i, fm.sk_f, fm.f_in, fm.xyz, fm.pos_w, fm.pos_b, fm.out_w,
                fm.out_b, out, idx, cnt, M, px, py, pz, KN=KN, NS=NS, NSP=NSP, C=C,
                CP=max(16, triton.next_power_of_2(C)), CO=CO, COP=max(16, triton.next_power_of_2(CO)), OUTW=SK * CO,
                BM=bm, BC=bc, IEEE=not torch.backends.cuda.matmul.allow_tf32, num_warps=warps,
                enable_fp_fusion=False)     # no FMA contraction: the distances round as the torch path's
    return out, ((idx, cnt) if with_rows else None)
