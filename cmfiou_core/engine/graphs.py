"""CUDA-graph capture shared by the engine's replayed parts (backbone, frame graph, static front)."""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch


def capture(fn: Callable[[], Any], warmup: int = 2) -> Tuple["torch.cuda.CUDAGraph", Any]:
    """Run ``fn`` ``warmup`` times on a side stream (allocator, cuBLAS / Triton set-up outside the capture), then
    capture one call into a CUDA graph. -> (graph, fn's outputs: the graph's static output tensors). ``fn`` must read
    its inputs from tensors that stay alive (the caller's static input buffers)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
