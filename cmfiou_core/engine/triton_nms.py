"""Rotated-BEV NMS in two Triton kernels: the suppression matrix and the greedy walk (engine.nms on CUDA).

``suppression_bits`` -- two kernels for the whole (B, K, K) matrix: the first tests the eager candidate rule (i < j,
both valid, circumscribed BEV circles overlapping, float64) on tiles of one box i x 32 boxes j, clears the matrix
and lists the candidate pairs; the second (persistent programs) computes the rotated BEV intersection of each listed
pair with the arithmetic of
``geometry.iou._intersection_area_aligned`` in float64: the same 24 candidate vertices (corners of each box inside the
other, edge/edge crossings) with the same tolerances and the same operation order (no FMA contraction:
``enable_fp_fusion=False``; the headings' cos / sin come from torch), so every inside / crossing decision is the
torch path's. Two steps differ in rounding only: the vertex order (torch sorts by ``atan2`` about the centroid; here a
rank by a "diamond" pseudo-angle of the same vectors, monotone in the angle, ties by index) and the order of the
centroid and shoelace sums (torch's reduction order is its own). Both change an area by rounding only (vertices that
swap are the same point to rounding), so ``IoU > thresh`` differs only for an IoU within ~1e-12 of ``thresh``.

``greedy_walk`` -- one program per batch row holds the alive set of its K boxes in registers and loops over the
``max_keep`` steps (first alive box, keep it, clear it and the boxes its row suppresses): ``engine.nms.greedy_keep``
in one kernel instead of 3 per step.

``engine.nms`` keeps the torch paths as the reference and the CPU implementation; ``test/test_engine_triton_nms.py``
compares both (CUDA on the GPU host, Triton's interpreter on the CPU).
"""
from __future__ import annotations

import torch

from .triton_conv import AVAILABLE, launched, supports, tl, triton

if AVAILABLE:
    # tl.sum / tl.max / tl.zeros are @triton.jit library functions: under the interpreter every call of one re-patches
    # triton.language (~3 ms), so the kernels call tl.reduce with the library's combine functions (the same reduction,
    # which the interpreter maps to numpy) and tl.full, and inline their helpers.
    _ADD = tl.standard._sum_combine
    _MAX = tl.standard._elementwise_max
    _MIN = tl.standard._elementwise_min

    @triton.jit
    def _box_bev(box_ptr, row):
        """x, y, dx, dy (float64) of the boxes at element offsets ``row`` of the (., 7+) box table."""
        return (tl.load(box_ptr + row).to(tl.float64), tl.load(box_ptr + row + 1).to(tl.float64),
                tl.load(box_ptr + row + 3).to(tl.float64), tl.load(box_ptr + row + 4).to(tl.float64))

    @triton.jit
    def _corner(k, hx, hy, cs, sn, cx, cy, one):
        """Corner k (0..3, CCW from (+, +)) of a box with half sizes hx, hy, heading cos / sin cs, sn and centre
        cx, cy (relative to the pair's origin): geometry.iou._rect_corners_rel's arithmetic."""
        lx = hx * tl.where((k == 0) | (k == 3), one, -one)
        ly = hy * tl.where(k < 2, one, -one)
        return lx * cs - ly * sn + cx, lx * sn + ly * cs + cy

    @triton.jit
    def _cand_kernel(box_ptr, valid_ptr, c_ptr, sup_ptr, pairs_ptr, count_ptr, K, sbb, sbk, BI: tl.constexpr):
        """Tile (BI boxes i) x (32 boxes j) of frame b: clear its part of the matrix and append its candidate pairs
        ((b * K + i) * K + j) to the pair list (a block reserved with one atomic add: the list's order varies, the
        matrix does not)."""
        b = tl.program_id(0)
        i0 = tl.program_id(1) * BI
        j0 = tl.program_id(2) * 32
        P: tl.constexpr = BI * 32
        p = tl.arange(0, P)
        ii = i0 + p // 32
        jj = j0 + p % 32
        in_k = (ii < K) & (jj < K)
        i_s = tl.where(ii < K, ii, 0)
        j_s = tl.where(jj < K, jj, 0)
        out = (b * K + i_s).to(tl.int64) * K + j_s
        tl.store(sup_ptr + out, ii < 0, mask=in_k)
        if i0 < j0 + 32:                                    # any pair i < j in the tile
            bo = b.to(tl.int64) * sbb
            ai = bo + i_s.to(tl.int64) * sbk
            bj = bo + j_s.to(tl.int64) * sbk
            ax, ay, adx, ady = _box_bev(box_ptr, ai)
            bx, by, bdx, bdy = _box_bev(box_ptr, bj)
            va = tl.load(valid_ptr + b * K + i_s) != 0
            vb = tl.load(valid_ptr + b * K + j_s) != 0
            grow = tl.load(c_ptr + 1)      # 1 + 1e-6
            pad = tl.load(c_ptr + 2)       # 1e-6
            # the eager candidate rule (engine.nms.suppression_matrix)
            rad_a = tl.sqrt(adx * adx + ady * ady) / 2
            rad_b = tl.sqrt(bdx * bdx + bdy * bdy) / 2
            ddx = ax - bx
            ddy = ay - by
            d2 = ddx * ddx + ddy * ddy
            rr = (rad_a + rad_b) * grow + pad
            cand = in_k & (ii < jj) & va & vb & (d2 <= rr * rr)
            ci = cand.to(tl.int32)
            n = tl.reduce(ci, 0, _ADD)
            if n > 0:
                base = tl.atomic_add(count_ptr, n.to(tl.int64))
                rank = tl.associative_scan(ci, 0, _ADD) - 1
                tl.store(pairs_ptr + base + rank, out, mask=cand)

    @triton.jit
    def _iou_kernel(box_ptr, cs_ptr, sn_ptr, c_ptr, sup_ptr, iou_ptr, pairs_ptr, count_ptr, K, sbb, sbk, NPROG,
                    P: tl.constexpr, WRITE_IOU: tl.constexpr, LOOP: tl.constexpr):
        """Persistent: program g takes chunks g, g + NPROG, ... of P listed candidate pairs and sets their matrix bit
        (IoU > thresh)."""
        total = tl.load(count_ptr)
        thresh = tl.load(c_ptr)
        rel = tl.load(c_ptr + 3)       # geometry.iou._rel_eps(float64)
        tiny = tl.load(c_ptr + 4)      # 1e-30
        umin = tl.load(c_ptr + 5)      # 1e-8 (union clamp)
        n_chunks = (total + P - 1) // P
        for chunk in range(tl.program_id(0), n_chunks, NPROG):
            p = chunk * P + tl.arange(0, P)
            cand = p < total
            out = tl.load(pairs_ptr + p, mask=cand, other=0)
            b = out // K // K
            i_s = (out // K) % K
            j_s = out % K
            bo = b * sbb
            ai = bo + i_s * sbk
            bj = bo + j_s * sbk
            ax, ay, adx, ady = _box_bev(box_ptr, ai)
            bx, by, bdx, bdy = _box_bev(box_ptr, bj)
            acs = tl.load(cs_ptr + b * K + i_s)[:, None]
            asn = tl.load(sn_ptr + b * K + i_s)[:, None]
            bcs = tl.load(cs_ptr + b * K + j_s)[:, None]
            bsn = tl.load(sn_ptr + b * K + j_s)[:, None]
            ox = (ax + bx) / 2
            oy = (ay + by) / 2
            ahx = (adx / 2)[:, None]
            ahy = (ady / 2)[:, None]
            bhx = (bdx / 2)[:, None]
            bhy = (bdy / 2)[:, None]
            acx = (ax - ox)[:, None]
            acy = (ay - oy)[:, None]
            bcx = (bx - ox)[:, None]
            bcy = (by - oy)[:, None]
            c = tl.arange(0, 32)[None, :]                                  # candidate vertex column
            one = tl.full((P, 32), 1.0, tl.float64)
            zero = tl.full((P, 32), 0.0, tl.float64)
            is_a = c < 4                                                   # 0-3 corners of A, 4-7 of B
            # corner k of a box (CCW from (+, +): x sign + for k = 0, 3, y sign + for k = 0, 1), relative to the
            # pair origin: lx = hx * sx, ly = hy * sy, (lx cos - ly sin + cx, lx sin + ly cos + cy), as
            # geometry.iou._rect_corners_rel
            k = c % 4
            sxk = tl.where((k == 0) | (k == 3), one, -one)
            syk = tl.where(k < 2, one, -one)
            hx = tl.where(is_a, ahx, bhx)
            hy = tl.where(is_a, ahy, bhy)
            cs = tl.where(is_a, acs, bcs)
            sn = tl.where(is_a, asn, bsn)
            lx = hx * sxk
            ly = hy * syk
            cx_ = lx * cs - ly * sn + tl.where(is_a, acx, bcx)             # own corner of columns 0-7
            cy_ = lx * sn + ly * cs + tl.where(is_a, acy, bcy)
            mabs = tl.maximum(tl.abs(cx_), tl.abs(cy_))
            mag = tl.reduce(tl.where(c < 8, mabs, zero), 1, _MAX)
            eps = tl.maximum(mag * rel, tiny)[:, None]
            # corners inside the other box: signed distance to each of its edges >= -eps
            phx = tl.where(is_a, bhx, ahx)
            phy = tl.where(is_a, bhy, ahy)
            pcs = tl.where(is_a, bcs, acs)
            psn = tl.where(is_a, bsn, asn)
            pcx = tl.where(is_a, bcx, acx)
            pcy = tl.where(is_a, bcy, acy)
            inside = c < 8
            lx = phx                                                       # corner 0 of the other box
            ly = phy
            e0x = lx * pcs - ly * psn + pcx
            e0y = lx * psn + ly * pcs + pcy
            for e in tl.static_range(4):
                k1 = tl.full((P, 32), e, tl.int32) + 1
                k1 = k1 % 4
                lx = phx * tl.where((k1 == 0) | (k1 == 3), one, -one)
                ly = phy * tl.where(k1 < 2, one, -one)
                e1x = lx * pcs - ly * psn + pcx
                e1y = lx * psn + ly * pcs + pcy
                ex = e1x - e0x
                ey = e1y - e0y
                ln = tl.sqrt(ex * ex + ey * ey)
                px = cx_ - e0x
                py = cy_ - e0y
                cr = ex * py - ey * px
                inside = inside & (cr >= (-eps) * ln)
                e0x = e1x
                e0y = e1y
            # edge/edge crossings: column 8 + 4 i + j = edge i of A (p, p + r) with edge j of B (q, q + s)
            q = c - 8
            ei = (q // 4) % 4
            ej = q % 4
            ei1 = (ei + 1) % 4
            ej1 = (ej + 1) % 4
            p0x, p0y = _corner(ei, ahx, ahy, acs, asn, acx, acy, one)
            p1x, p1y = _corner(ei1, ahx, ahy, acs, asn, acx, acy, one)
            q0x, q0y = _corner(ej, bhx, bhy, bcs, bsn, bcx, bcy, one)
            q1x, q1y = _corner(ej1, bhx, bhy, bcs, bsn, bcx, bcy, one)
            rx = p1x - p0x
            ry = p1y - p0y
            sx = q1x - q0x
            sy = q1y - q0y
            rl = tl.sqrt(rx * rx + ry * ry)
            sl = tl.sqrt(sx * sx + sy * sy)
            den = rx * sy - ry * sx
            qpx = q0x - p0x
            qpy = q0y - p0y
            ok_den = tl.abs(den) > rel * rl * sl
            safe = tl.where(ok_den, den, one)
            t = (qpx * sy - qpy * sx) / safe
            u = (qpx * ry - qpy * rx) / safe
            tt = eps / tl.maximum(rl, tiny)
            tu = eps / tl.maximum(sl, tiny)
            cross_ok = ok_den & (t >= -tt) & (t <= 1.0 + tt) & (u >= -tu) & (u <= 1.0 + tu)
            X = tl.where(c < 8, cx_, p0x + t * rx)
            Y = tl.where(c < 8, cy_, p0y + t * ry)
            valid = tl.where(c < 8, inside, cross_ok) & (c < 24)
            w = tl.where(valid, one, zero)
            n = tl.reduce(valid.to(tl.int32), 1, _ADD)
            nf = tl.maximum(n, 1).to(tl.float64)
            cenx = tl.reduce(tl.where(c < 24, X * w, zero), 1, _ADD) / nf
            ceny = tl.reduce(tl.where(c < 24, Y * w, zero), 1, _ADD) / nf
            vx = X - cenx[:, None]
            vy = Y - ceny[:, None]
            # pseudo-angle in [-2, 2], increasing with atan2(vy, vx); invalid vertices last (torch: 10.0)
            s = tl.abs(vx) + tl.abs(vy)
            s = tl.where(s > 0, s, one)
            xn = vx / s
            yn = vy / s
            key = tl.where(vx >= 0, yn, tl.where(vy >= 0, 1.0 - xn, xn - 1.0))
            key = tl.where(valid, key, one * 10.0)
            # rank of each vertex in (key, column) order; the next vertex of the cycle has rank + 1 (the first
            # after the last valid one)
            if LOOP:     # (P, 32) at a time: few registers (CUDA)
                rank = tl.full((P, 32), 0, tl.int32)
                for m in tl.static_range(24):
                    km = tl.reduce(tl.where(c == m, key, zero), 1, _ADD)[:, None]
                    rank += ((km < key) | ((km == key) & (m < c))).to(tl.int32)
                tr = tl.where(rank == (n[:, None] - 1), 0, rank + 1)
                nx = zero
                ny = zero
                for m in tl.static_range(24):
                    rm = tl.reduce(tl.where(c == m, rank, 0), 1, _ADD)[:, None]
                    hit = rm == tr
                    nx = tl.where(hit, tl.reduce(tl.where(c == m, X, zero), 1, _ADD)[:, None], nx)
                    ny = tl.where(hit, tl.reduce(tl.where(c == m, Y, zero), 1, _ADD)[:, None], ny)
            else:        # (P, 32, 32) at once: few operations (the interpreter)
                km = key[:, None, :]
                kc = key[:, :, None]
                cm = c[:, None, :]
                cc = c[:, :, None]
                before = ((km < kc) | ((km == kc) & (cm < cc))) & (cm < 24)
                rank = tl.reduce(before.to(tl.int32), 2, _ADD)
                tr = tl.where(rank == (n[:, None] - 1), 0, rank + 1)
                hit = (rank[:, None, :] == tr[:, :, None]) & (cm < 24)
                z3 = tl.full((P, 32, 32), 0.0, tl.float64)
                nx = tl.reduce(tl.where(hit, X[:, None, :] + z3, z3), 2, _ADD)
                ny = tl.reduce(tl.where(hit, Y[:, None, :] + z3, z3), 2, _ADD)
            term = X * ny - Y * nx
            area = tl.abs(0.5 * tl.reduce(tl.where(valid, term, zero), 1, _ADD))
            area_a = adx * ady
            area_b = bdx * bdy
            area = tl.minimum(area, tl.minimum(area_a, area_b))
            area = tl.where(n >= 3, area, tl.full((P,), 0.0, tl.float64))
            iou_c = area / tl.maximum(area_a + area_b - area, umin)
            sup = cand & (iou_c > thresh)
            tl.store(sup_ptr + out, sup, mask=cand)
            if WRITE_IOU:
                tl.store(iou_ptr + out, iou_c, mask=cand)

    @triton.jit
    def _walk_kernel(sup_ptr, valid_ptr, pos_ptr, kept_ptr, flag_ptr, K, T, KP: tl.constexpr):
        b = tl.program_id(0)
        tl.store(flag_ptr + b * 0, b < 0, mask=b == 0)           # the caller's overflow flag: False
        ar = tl.arange(0, KP)
        in_k = ar < K
        alive = (tl.load(valid_ptr + b * K + ar, mask=in_k, other=0) != 0) & in_k
        for t in range(T):
            i = tl.reduce(tl.where(alive, ar, K), 0, _MIN)     # first alive sorted position, K if none
            some = i < K
            ic = tl.minimum(i, K - 1)
            tl.store(pos_ptr + b * T + t, ic.to(tl.int64))
            tl.store(kept_ptr + b * T + t, some)
            row = tl.load(sup_ptr + (b * K + ic).to(tl.int64) * K + ar, mask=in_k & (ar * 0 + i < K), other=0) != 0
            alive = alive & (row == 0) & (ar != i)


def _check(t: torch.Tensor, what: str) -> None:
    if not supports(t):
        raise RuntimeError(f"{what}: the Triton NMS needs Triton and a CUDA tensor (or Triton's interpreter for a CPU "
                           f"tensor), got a {t.device.type} tensor with Triton {'installed' if AVAILABLE else 'missing'};"
                           f" use engine.nms's torch path")


def _consts(thresh: float, device) -> torch.Tensor:
    """float64 constants of the kernel (a Python float argument would reach Triton as float32): the threshold and the
    eager path's literals, cached per device (``device_const``: no host->device copy after the first, warm-up call)."""
    from ..device_const import device_const
    from ..geometry.iou import _rel_eps

    return device_const((float(thresh), 1 + 1e-6, 1e-6, _rel_eps(torch.float64), 1e-30, 1e-8), torch.float64, device)


_SMS = {}


def _programs(dev: torch.device) -> int:
    """Persistent programs of the IoU kernel: one per SM on CUDA (a program uses 255 registers x 256 threads: one
    block per SM; sm_90 cubin compiled on the CPU), one on the CPU (the interpreter)."""
    if dev.type != "cuda":
        return 1
    n = _SMS.get(str(dev))
    if n is None:
        n = _SMS[str(dev)] = torch.cuda.get_device_properties(dev).multi_processor_count
    return n


def suppression_bits(boxes: torch.Tensor, valid: torch.Tensor, thresh: float, with_iou: bool = False,
                     rows_per_program: int = 0, loop=None, pairs_per_program: int = 0):
    """boxes (B, K, 7+) sorted by descending score, valid (B, K) bool -> sup (B, K, K) bool, [b, i, j] = i < j, both
    valid, circles overlapping and IoU_bev(i, j) > thresh (``engine.nms.suppression_matrix`` without a pair
    capacity: every candidate pair is evaluated, nothing can overflow). ``with_iou``: also the float64 IoU of each
    candidate pair (-1 elsewhere), for tests.

    Two kernels: the candidate test over (``rows_per_program`` x 32)-pair tiles, which clears the matrix and lists
    the candidate pairs, then the IoU of the listed pairs by persistent programs, ``pairs_per_program`` at a time
    (only candidates are computed: ~4% of the pairs of a real 2000-proposal frame). ``loop``: rank the polygon
    vertices one column at a time (few registers), else as one (P, 32, 32) block (few interpreter operations).
    Defaults: CUDA (1, 32, loop), the CPU (32, 256, block); all give the same matrix. Plus cos / sin of the headings
    and the pair counter's zeroing (torch): 5 kernels."""
    _check(boxes, "suppression_bits")
    if boxes.dim() != 3 or boxes.shape[-1] < 7 or valid.shape != boxes.shape[:2]:
        raise ValueError(f"suppression_bits: boxes (B, K, 7+) and valid (B, K), got {tuple(boxes.shape)} and "
                         f"{tuple(valid.shape)}")
    B, K = boxes.shape[0], boxes.shape[1]
    dev = boxes.device
    cuda = dev.type == "cuda"
    bx = boxes if boxes.stride(-1) == 1 else boxes.contiguous()
    head = bx[..., 6].to(torch.float64)
    cs = torch.cos(head).contiguous()
    sn = torch.sin(head).contiguous()
    sup = torch.empty((B, K, K), dtype=torch.bool, device=dev)
    iou = torch.full((B, K, K), -1.0, dtype=torch.float64, device=dev) if with_iou else cs
    if K == 0 or B == 0:
        return (sup, iou) if with_iou else sup
    loop = cuda if loop is None else bool(loop)
    bi = rows_per_program or (1 if cuda else 32)
    pp = pairs_per_program or (32 if cuda else 256)
    pairs = torch.empty(max(1, B * K * (K - 1) // 2), dtype=torch.int64, device=dev)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    vc, consts = valid.contiguous(), _consts(thresh, dev)
    with launched("nms_candidates"):
        _cand_kernel[(B, triton.cdiv(K, bi), triton.cdiv(K, 32))](bx, vc, consts, sup, pairs, count, K, bx.stride(0),
                                                                 bx.stride(1), BI=bi, num_warps=4,
                                                                 enable_fp_fusion=False)
    nprog = _programs(dev)
    with launched("nms_iou"):
        _iou_kernel[(nprog,)](bx, cs, sn, consts, sup, iou, pairs, count, K, bx.stride(0), bx.stride(1), nprog, P=pp,
                              WRITE_IOU=with_iou, LOOP=loop, num_warps=8 if cuda else 4, enable_fp_fusion=False)
    return (sup, iou) if with_iou else sup


def greedy_walk(sup: torch.Tensor, valid: torch.Tensor, max_keep: int, with_flag: bool = False):
    """``engine.nms.greedy_keep`` in one kernel: sup (B, K, K) bool, valid (B, K) -> (pos (B, T) int64, kept (B, T)
    bool), T = min(max_keep, K); padding steps have pos K - 1 and kept False. ``with_flag``: also a () bool False
    written by the same kernel (``nms_sorted_static``'s overflow flag: nothing overflows here)."""
    _check(sup, "greedy_walk")
    B, K = valid.shape
    T = min(int(max_keep), K)
    pos = torch.empty((B, T), dtype=torch.int64, device=sup.device)
    kept = torch.empty((B, T), dtype=torch.bool, device=sup.device)
    flag = torch.empty((), dtype=torch.bool, device=sup.device)
    if B == 0 or T == 0:
        flag.fill_(False)
        return (pos, kept, flag) if with_flag else (pos, kept)
    kp = max(16, triton.next_power_of_2(K))
    sc, vc = sup.contiguous(), valid.contiguous()
    with launched("nms_walk"):
        _walk_kernel[(B,)](sc, vc, pos, kept, flag, K, T, KP=kp, num_warps=8 if kp >= 2048 else 4)
    return (pos, kept, flag) if with_flag else (pos, kept)
