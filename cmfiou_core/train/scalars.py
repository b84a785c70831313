"""Scalar logging: TensorBoard when the ``tensorboard`` package is importable, and always a ``metrics.jsonl`` file
(one JSON object per logged step, so runs on hosts without TensorBoard can still be plotted/parsed)."""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Mapping, Optional

__all__ = ["ScalarLogger"]


class ScalarLogger:
    def __init__(self, out_dir: Optional[Path], enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled and out_dir is not None
        self.tb = None
        self._jsonl = None
        if not self.enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(log_dir=str(out_dir / "tb"))
            except Exception as e:  # noqa: BLE001 - optional dependency
                warnings.warn(f"TensorBoard unavailable ({e}); scalars go to metrics.jsonl only")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in scalars.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            clean[k] = v if math.isfinite(v) else str(v)
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}) + "\n")

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
