"""Find where exploding / non-finite gradients start: per-module forward and backward magnitudes.

``GradProbe(model)`` hooks every leaf module (and spconv modules, whose output is a ``SparseConvTensor``): in the
forward it keeps ``max |output|`` and registers a tensor hook that keeps ``max |d loss / d output|`` in the backward.
The values stay on the device (no host sync) until :meth:`dump` is called for a suspicious step; the record lists
the modules in forward order. Reading it: gradients flow from the end of the list to its start, so the module
*nearest the end* whose output gradient is already huge (or non-finite) is next to the operation that produced it —
usually the loss term consuming that module's output. Debug tool: it costs two small kernels per module and step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn


def _tensor_of(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    feats = getattr(out, "features", None)  # spconv SparseConvTensor
    if isinstance(feats, torch.Tensor):
        return feats
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class GradProbe:
    def __init__(self, model: nn.Module, threshold: float, out_file: Path, max_reports: int = 10):
        self.threshold = float(threshold)
        self.out_file = Path(out_file)
        self.max_reports = max_reports
        self.reports = 0
        self._order: List[str] = []
        self._fwd: Dict[str, torch.Tensor] = {}
        self._bwd: Dict[str, torch.Tensor] = {}
        self._handles = []
        for name, mod in model.named_modules():
            leaf = not any(True for _ in mod.children())
            if name and (leaf or type(mod).__module__.startswith("spconv")):
                self._handles.append(mod.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(_mod, _inp, out):
            t = _tensor_of(out)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return
            if name not in self._fwd:
                self._order.append(name)
            self._fwd[name] = t.detach().abs().amax().float()
            if t.requires_grad:
                def on_grad(g, _n=name):
                    self._bwd[_n] = g.detach().abs().amax().float()
                t.register_hook(on_grad)
        return hook

    def start_step(self) -> None:
        self._fwd.clear()
        self._bwd.clear()
        self._order.clear()

    def check(self, it: int, grad_norm: float, losses: Dict[str, float]) -> bool:
        """After backward: write a record when ``grad_norm`` is above the threshold or non-finite."""
        if self.reports >= self.max_reports or (math.isfinite(grad_norm) and grad_norm <= self.threshold):
            return False
        self.reports += 1
        names = list(self._order)
        fwd = torch.stack([self._fwd[n] for n in names]).tolist() if names else []
        bwd = [float(self._bwd[n]) if n in self._bwd else None for n in names]
        rows = [{"module": n, "fwd_max": f, "grad_max": b} for n, f, b in zip(names, fwd, bwd)]
        rec = {"it": it, "grad_norm": grad_norm, "losses": losses, "modules": rows}
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return True

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
