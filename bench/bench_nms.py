#!/usr/bin/env python3
"""Latency of the static rotated NMS at the proposal layer's size (K = 2000 boxes -> 50 kept, threshold 0.75,
random boxes in a 70 m square): ``engine.nms.nms_sorted_static`` with the Triton kernels (``mode='triton'``) and
with the torch matrix walk (``mode='matrix'``, pair capacity 2^18), eager and as a replayed CUDA graph, and whether
both keep the same boxes. Prints only (no results JSON).

    python bench/bench_nms.py            # CUDA: K = 2000
    python bench/bench_nms.py 500        # another K
    TRITON_INTERPRET=1 python bench/bench_nms.py 64   # the CPU (Triton's interpreter): the selection check only
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from cmfiou_core.engine import nms as N  # noqa: E402
dev = "cuda" if torch.cuda.is_available() else "cpu"
K = int(sys.argv[1]) if len(sys.argv) > 1 else (2000 if dev == "cuda" else 64)
g = torch.Generator().manual_seed(0)
b = torch.rand(1, K, 7, generator=g)
b[..., :2] *= 70.0
b[..., 3:6] = b[..., 3:6] * 4 + 0.3
b[..., 6] = b[..., 6] * 6.3 - 3.15
b = b.to(dev)
v = torch.ones(1, K, dtype=torch.bool, device=dev)
N.TRITON_ON_CPU = dev == "cpu"
res = {}
for mode in ("triton", "matrix"):
    f = lambda: N.nms_sorted_static(b, v, 0.75, 50, 1 << 18, mode)
    out = f()
    res[mode] = out
    if dev != "cuda":
        continue
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        f()
    e1.record()
    torch.cuda.synchronize()
    eager = e0.elapsed_time(e1) / 20
    gr = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(gr):
        f()
    gr.replay()
    torch.cuda.synchronize()
    e0.record()
    for _ in range(50):
        gr.replay()
    e1.record()
    torch.cuda.synchronize()
    print(f"{mode:7s} K={K}: eager {eager:.3f} ms/call, graph replay {e0.elapsed_time(e1) / 50:.3f} ms/call")
print("same selection:", all(torch.equal(a, c) for a, c in zip(res["triton"][:2], res["matrix"][:2])),
      "kept", int(res["triton"][1].sum()))
