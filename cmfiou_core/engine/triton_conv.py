"""Fused sparse convolution on CUDA (Triton): for a tile of output rows, loop over the kernel offsets, load the
neighbour rows straight from the feature table (absent taps masked, nothing materialised) and accumulate
``x[rows[:, k]] @ W_k`` in fp32 on the tensor cores, then add the folded-BatchNorm bias and apply ReLU.

The same computation as ``FoldedConv``'s torch path (gather -> one GEMM), which stays the reference and the CPU
implementation; ``test/test_engine_triton.py`` compares the two (on the GPU, and on the CPU under Triton's interpreter:
see :func:`supports`). fp32 inputs use TF32 tensor-core products
when torch's matmul switch allows them (``torch.backends.cuda.matmul.allow_tf32``, set by the pipeline's
``inference.precision``) and IEEE fp32 products otherwise (as spconv's CUDA kernels); bf16 / fp16 inputs use their
native products; accumulation is fp32 in every case.
"""
from __future__ import annotations

import torch

try:  # Triton exists only where a CUDA build of torch is installed
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import problem means: no fused kernel, the torch path is used
    triton = None
    tl = None

AVAILABLE = triton is not None


def supports(t) -> bool:
    """Whether this package's Triton kernels run on ``t``'s device (``t`` a tensor or a device): CUDA with Triton installed, or the CPU when
    Triton's interpreter is active (``TRITON_INTERPRET=1`` before triton is first imported; test/conftest.py sets it
    on hosts without CUDA). The engine itself calls the kernels on CUDA tensors only (``engine.sparse``,
    ``engine.nms``); the CPU runs are for tests."""
    kind = (t.device if isinstance(t, torch.Tensor) else torch.device(t)).type
    return AVAILABLE and (kind == "cuda" or (INTERPRETER and kind == "cpu"))


def launched(name: str):
    """Context manager around one Triton launch: an active ``opcount.OpCounter`` counts it as one kernel (no aten op
    sees it) and not the interpreter's host copies inside."""
    from ..opcount import kernel_launch

    return kernel_launch("triton." + name)


if AVAILABLE:
    @triton.jit
    def _sparse_conv_kernel(x_ptr, rows_ptr, w_ptr, b_ptr, y_ptr, res_ptr, count_ptr, M, n_in,
                            K: tl.constexpr, CIN: tl.constexpr, COUT: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, RELU: tl.constexpr, HAS_RES: tl.constexpr,
                            HAS_COUNT: tl.constexpr, IEEE: tl.constexpr, FLAT: tl.constexpr, WT: tl.constexpr,
                            SPLIT: tl.constexpr):
        # FLAT: one loop over (kernel offset, Cin chunk) pairs, which Triton's software pipeliner can overlap
        # (num_stages); otherwise two nested loops, of which only the inner one (often a single Cin chunk) is
        # pipelined. WT: the weight is given as (Cout, K*Cin), K-major, the operand order TF32 tensor-core
        # products read from shared memory without a transpose. SPLIT (fp32 inputs): each operand as a bf16 pair
        # hi + lo, and a.w = hi.hi + hi.lo + lo.hi on bf16 tensor cores (about 16 mantissa bits, finer than TF32's 10).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok = offs_m < M
        n_ok = offs_n < COUT
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        NC: tl.constexpr = (CIN + BK - 1) // BK
        if FLAT:
            for i in range(K * NC):
                k = i // NC
                offs_c = (i % NC) * BK + tl.arange(0, BK)
                acc = _conv_step(acc, x_ptr, rows_ptr, w_ptr, offs_m, offs_n, offs_c, m_ok, n_ok, k, n_in,
                                 K, CIN, COUT, IEEE, WT, SPLIT)
        else:
            for k in range(K):
                for c0 in range(0, CIN, BK):
                    offs_c = c0 + tl.arange(0, BK)
                    acc = _conv_step(acc, x_ptr, rows_ptr, w_ptr, offs_m, offs_n, offs_c, m_ok, n_ok, k, n_in,
                                     K, CIN, COUT, IEEE, WT, SPLIT)
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
        acc += bias[None, :].to(tl.float32)
        out_off = offs_m[:, None].to(tl.int64) * COUT + offs_n[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + out_off, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        if HAS_COUNT:     # padding rows (>= count) are zero
            acc = tl.where((offs_m < tl.load(count_ptr))[:, None], acc, 0.0)
        tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _conv_step(acc, x_ptr, rows_ptr, w_ptr, offs_m, offs_n, offs_c, m_ok, n_ok, k, n_in,
                   K: tl.constexpr, CIN: tl.constexpr, COUT: tl.constexpr, IEEE: tl.constexpr, WT: tl.constexpr,
                   SPLIT: tl.constexpr):
        """acc += x[rows[:, k]][:, offs_c] @ W_k[offs_c, offs_n] (absent taps and columns past Cin / Cout masked)."""
        r = tl.load(rows_ptr + offs_m.to(tl.int64) * K + k, mask=m_ok, other=n_in)
        present = (r < n_in) & m_ok
        c_ok = offs_c < CIN
        a = tl.load(x_ptr + r[:, None].to(tl.int64) * CIN + offs_c[None, :],
                    mask=present[:, None] & c_ok[None, :], other=0.0)
        if WT:
            w = tl.trans(tl.load(w_ptr + offs_n[:, None] * (K * CIN) + (k * CIN + offs_c[None, :]),
                                 mask=n_ok[:, None] & c_ok[None, :], other=0.0))
        else:
            w = tl.load(w_ptr + (k * CIN + offs_c[:, None]) * COUT + offs_n[None, :],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if SPLIT:
            a_hi = a.to(tl.bfloat16)
            a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
            w32 = w.to(tl.float32)
            w_hi = w32.to(tl.bfloat16)
            w_lo = (w32 - w_hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(a_hi, w_hi, acc)
            acc = tl.dot(a_hi, w_lo, acc)
            acc = tl.dot(a_lo, w_hi, acc)
        elif IEEE:
            acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
        return acc

# triton.jit returns an interpreted kernel when TRITON_INTERPRET=1 was set before triton's import (the choice is made
# there, for triton's own library functions too, so one process is either compiled or interpreted)
INTERPRETER = AVAILABLE and type(_sparse_conv_kernel).__name__ == "InterpretedFunction"


# the tile per input dtype: (BM, BN at most, BK, num_warps, num_stages[, flags]); fp32 covers TF32 and IEEE
# products. flags (default 0): FLAT (one pipelined loop over offset x Cin chunk) | WT (K-major weight) | SPLIT
# (fp32 as bf16 hi + lo pairs, three bf16 products). The
# entry "torch": FoldedConv takes its torch path (gather -> one cuBLAS GEMM) for that dtype instead. The
# bench/bench_sparse_conv.py times candidates on a real frame's convolutions (every call of one frame, replayed)
FLAT, WT, SPLIT = 1, 2, 4
# fp32: the K-major weight (WT) halves the TF32 convolutions of a real frame (H100: 8.35 -> 3.39 ms a frame, and
# below bf16's 3.96; docs/results/sparse_conv_tiles_000000_random_h100.json); bf16: the plain tile was fastest
TILES = {torch.float32: (64, 64, 32, 4, 3, WT), torch.bfloat16: (64, 64, 32, 4, 3), torch.float16: (64, 64, 32, 4, 3)}


def sparse_conv(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                relu: bool = False, residual: torch.Tensor = None, count: torch.Tensor = None,
                tile=None, weight_t: torch.Tensor = None) -> torch.Tensor:
    """y[m] = sum_k x[rows[m, k]] @ weight[k*Cin:(k+1)*Cin] + bias (rows[m, k] >= len(x): absent) [+ residual[m]],
    optional ReLU, then rows m >= count (a device scalar) set to 0. fp32 x: TF32 products if
    ``torch.backends.cuda.matmul.allow_tf32``, IEEE otherwise.

    x (N, Cin), rows (M, K) int64, weight (K*Cin, Cout), bias (Cout,) -> (M, Cout) in x's dtype. ``tile``: a
    (BM, BN, BK, num_warps, num_stages[, flags]) instead of ``TILES[x.dtype]`` (the tile bench). ``weight_t``: the
    weight's (Cout, K*Cin) contiguous copy, read by tiles with the WT flag (else transposed here, per call)."""
    if not supports(x):
        raise RuntimeError(f"sparse_conv: the fused kernel needs Triton and a CUDA tensor (or Triton's interpreter for "
                           f"a CPU tensor), got a {x.device.type} tensor with Triton "
                           f"{'installed' if AVAILABLE else 'missing'}; use FoldedConv's torch path")
    M, K = rows.shape
    cin = x.shape[1]
    cout = weight.shape[1]
    y = torch.empty((M, cout), dtype=x.dtype, device=x.device)
    BM, bn, bk, warps, stages, *flags = TILES[x.dtype] if tile is None else tile
    flags = flags[0] if flags else 0
    BN = bn if cout >= bn else max(16, triton.next_power_of_2(cout))
    BK = min(bk, max(16, triton.next_power_of_2(cin)))
    grid = (triton.cdiv(M, BM), triton.cdiv(cout, BN))
    res = residual.contiguous() if residual is not None else y
    cnt = count.reshape(1) if count is not None else rows
    w = (weight_t if weight_t is not None else weight.t()) if flags & WT else weight
    xc, rc, wc, bc = x.contiguous(), rows.contiguous(), w.to(x.dtype).contiguous(), bias.float().contiguous()
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    with launched("sparse_conv"):
        _sparse_conv_kernel[grid](xc, rc, wc, bc, y, res, cnt, M, x.shape[0], K=K, CIN=cin, COUT=cout, BM=BM,
                                  BN=BN, BK=BK, RELU=relu, HAS_RES=residual is not None, HAS_COUNT=count is not None,
                                  IEEE=ieee,
                                  FLAT=bool(flags & FLAT), WT=bool(flags & WT),
                                  SPLIT=bool(flags & SPLIT) and x.dtype == torch.float32 and not ieee, num_warps=warps,
                                  num_stages=stages)
    return y
