"""Per-stage timing shared by the depth stage and the pipeline: CUDA events on the GPU (recording adds no host
sync; :meth:`StageTimer.result` synchronises once), ``perf_counter`` on the CPU."""
from __future__ import annotations

import time
from typing import Dict, List

import torch


class StageTimer:
    """``mark(name)`` closes the stage ``name`` (time since the previous mark); repeated names accumulate.
    ``result()`` -> {stage: ms, ..., "total": first to last mark}."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.marks: List = []

    def mark(self, name: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def _ms(self, a, b) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1e3

    def result(self) -> Dict[str, float]:
        if not self.enabled or len(self.marks) < 2:
            return {}
        if self.cuda:
            self.marks[-1][1].synchronize()
        out: Dict[str, float] = {}
        for (_, a), (n, b) in zip(self.marks[:-1], self.marks[1:]):
            out[n] = out.get(n, 0.0) + self._ms(a, b)
        out["total"] = self._ms(self.marks[0][1], self.marks[-1][1])
        return out
