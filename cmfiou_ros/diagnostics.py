"""Small diagnostics helpers (the diagnostic_updater ideas without the dependency): windowed rates, latency
percentiles, counters, and DiagnosticStatus construction. Pure Python except ``to_msg``/``status_msg``."""
from __future__ import annotations

import collections
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

OK, WARN, ERROR, STALE = 0, 1, 2, 3
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}


class RateMeter:
    """Events per second over a sliding window of wall time."""

    def __init__(self, window_s: float = 5.0):
        self.window = float(window_s)
        self.t: collections.deque = collections.deque()
        self.total = 0
        self.last: Optional[float] = None
        self.lock = threading.Lock()

    def tick(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            self.t.append(now)
            self.total += 1
            self.last = now
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self.t and now - self.t[0] > self.window:
            self.t.popleft()

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self.lock:
            self._trim(now)
            if len(self.t) < 2:
                return 0.0
            return (len(self.t) - 1) / max(self.t[-1] - self.t[0], 1e-6)

    def age(self, now: Optional[float] = None) -> Optional[float]:
        now = time.monotonic() if now is None else now
        return None if self.last is None else now - self.last


class Stats:
    """Last-N samples with percentiles."""

    def __init__(self, n: int = 200):
        self.v: collections.deque = collections.deque(maxlen=n)
        self.lock = threading.Lock()

    def add(self, x: float) -> None:
        with self.lock:
            self.v.append(float(x))

    def pct(self, q: float) -> float:
        with self.lock:
            return float(np.percentile(np.fromiter(self.v, float), q)) if self.v else float("nan")

    def max(self) -> float:
        with self.lock:
            return max(self.v) if self.v else float("nan")

    def __len__(self) -> int:
        return len(self.v)


class Status:
    """A DiagnosticStatus under construction: level only goes up; key/values in insertion order."""

    def __init__(self, name: str, hardware_id: str = ""):
        self.name, self.hardware_id = name, hardware_id
        self.level, self.messages = OK, []
        self.values: List[Tuple[str, str]] = []

    def raise_level(self, level: int, message: str) -> None:
        if level > self.level:
            self.level = level
        if level > OK:
            self.messages.append(message)

    def add(self, key: str, value) -> None:
        if isinstance(value, float):
            value = f"{value:.3f}" if value == value else "nan"
        self.values.append((key, str(value)))

    @property
    def message(self) -> str:
        return "; ".join(self.messages) if self.messages else "OK"

    def to_msg(self):
        from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

        return DiagnosticStatus(level=bytes([self.level]), name=self.name, message=self.message,
                                hardware_id=self.hardware_id,
                                values=[KeyValue(key=k, value=v) for k, v in self.values])


def array_msg(statuses: List[Status], stamp_msg):
    from diagnostic_msgs.msg import DiagnosticArray

    a = DiagnosticArray()
    a.header.stamp = stamp_msg
    a.status = [s.to_msg() for s in statuses]
    return a


def values_dict(status_msg) -> Dict[str, str]:
    return {kv.key: kv.value for kv in status_msg.values}
