"""Small diagnostics helpers (the diagnostic_updater ideas without the dependency): windowed rates, latency
percentiles, counters, DiagnosticStatus construction, the throttled per-topic warnings and the detector node's
statuses. Pure Python except ``to_msg``/``array_msg``."""
from __future__ import annotations

import collections
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from cmfiou_core import memory

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


class WarnThrottle:
    """Counts every problem per topic; logs at most once per ``period`` s per topic (with the suppressed count)."""

    def __init__(self, logger, period: float):
        self.logger, self.period = logger, period
        self.count: Dict[str, int] = {}
        self.last_problem: Dict[str, str] = {}
        self._last_log: Dict[str, float] = {}
        self._suppressed: Dict[str, int] = {}
        self.window_count = 0  # since the last diagnostics message
        self.lock = threading.Lock()

    def __call__(self, topic: str, problem: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.count[topic] = self.count.get(topic, 0) + 1
            self.last_problem[topic] = problem
            self.window_count += 1
            if now - self._last_log.get(topic, -1e18) < self.period:
                self._suppressed[topic] = self._suppressed.get(topic, 0) + 1
                return
            n = self._suppressed.pop(topic, 0)
            self._last_log[topic] = now
        more = f" ({n} similar warnings suppressed)" if n else ""
        self.logger.warning(f"[{topic}] {problem}{more}")

    @property
    def total(self) -> int:
        return sum(self.count.values())


def detector_statuses(node) -> List[Status]:
    """The detector node's three statuses (inputs, sync, inference) from its counters."""
    p, name = node.params, node.get_name()
    now = time.monotonic()
    inputs = Status(f"{name}: inputs", name)
    for key, topic in (("lidar", node._lidar_topic), ("image", node._image_topic),
                       ("camera_info", node._info_topic)):
        r = node.rates[key]
        inputs.add(f"{key}_topic", topic)
        inputs.add(f"{key}_rate_hz", r.rate(now))
        age = r.age(now)
        inputs.add(f"{key}_last_msg_age_s", float("nan") if age is None else age)
        inputs.add(f"{key}_malformed", node.warn.count.get(topic, 0))
        if topic in node.warn.last_problem:
            inputs.add(f"{key}_last_problem", node.warn.last_problem[topic])
    inputs.add("nonfinite_points_dropped", node.points_dropped_nonfinite)
    inputs.add("nonfinite_intensity_zeroed", node.intensity_zeroed)
    inputs.add("points_capped", node.points_capped)
    inputs.add("empty_clouds", node.empty_clouds)
    inputs.add("future_stamped_rejected", node.future_stamped)
    inputs.add("oversize_messages", node.oversize_messages)
    inputs.add("oversize_outputs", node.oversize_outputs)
    lim = getattr(node, "transport", None)
    if lim is not None:
        inputs.add("message_size_limit", lim.describe(p["message_size_warn_mb"]))
    inputs.add("unknown_parameters", ", ".join(node.unknown_parameters))
    if node.unknown_parameters:
        inputs.raise_level(WARN, f"unknown parameter(s) ignored: {', '.join(node.unknown_parameters)}")
    la = node.rates["lidar"].age(now)
    if la is None or la > 3.0:
        inputs.raise_level(WARN, "no LiDAR input" if la is None else f"no LiDAR input for {la:.1f} s")
    with node.warn.lock:
        bad, node.warn.window_count = node.warn.window_count, 0
    if bad:
        inputs.raise_level(WARN, f"{bad} malformed/unusable messages in the last period")
    inputs.add("malformed_in_period", bad)

    sync = Status(f"{name}: sync", name)
    sync.add("policy", p["sync_policy"])
    sync.add("frames_with_camera", node.camera_frames)
    sync.add("lidar_only_frames", node.lidar_only_frames)
    sync.add("lidar_only", node.last_lidar_only)
    sync.add("lidar_only_reason", node.last_lidar_only_reason if node.last_lidar_only else "")
    sync.add("image_age_ms", node.last_image_age_ms)
    fa = node.assembler
    q = fa.queue_sizes()
    sync.add("sync_queue_sizes", q)
    sync.add("time_jumps", fa.time_jumps)
    sync.add("last_time_jump", fa.last_time_jump)
    sync.add("tf", fa.tf.impl if fa.tf is not None else "off")
    sync.add("tf_unavailable_frames", fa.tf_unavailable)
    sync.add("last_tf_problem", fa.last_tf_problem)
    if node.last_lidar_only:
        sync.raise_level(WARN, f"LiDAR-only detections: {node.last_lidar_only_reason}")
    if fa.approx is not None:
        try:
            waiting = [t for t in list(fa.lidar_arrival.values()) if now - t > 1.0]
        except RuntimeError:  # mutated by a callback thread meanwhile: next period
            waiting = []
        sync.add("unmatched_clouds", fa.unmatched_clouds)
        sync.add("clouds_waiting_over_1s", len(waiting))
        if waiting:
            sync.raise_level(WARN, f"{len(waiting)} cloud(s) unmatched for > 1 s by the approx synchroniser "
                                   "(image stamps outside slop?)")

    inf = Status(f"{name}: inference", name)
    inf.add("pipeline_loaded", node.pipeline is not None)
    weights = getattr(node.pipeline, "weights", "") if node.pipeline is not None else ""
    inf.add("weights", weights)
    inf.add("engine", getattr(node.pipeline, "engine", "") if node.pipeline is not None else "")
    if weights.startswith(("random", "demo")):
        inf.raise_level(WARN, f"weights: {weights}")
    inf.add("active", node._active)
    inf.add("frames_in", node.frames_in)
    inf.add("frames_out", node.frames_out)
    inf.add("frames_dropped", node.worker.dropped)
    inf.add("output_rate_hz", node.rates["output"].rate(now))
    inf.add("processing_ms_p50", node.processing_ms.pct(50))
    inf.add("processing_ms_p95", node.processing_ms.pct(95))
    inf.add("latency_ms_p50", node.latency_ms.pct(50))
    inf.add("latency_ms_p95", node.latency_ms.pct(95))
    inf.add("empty_outputs", node.empty_outputs)
    inf.add("last_empty_reason", node.last_empty_reason)
    inf.add("pipeline_errors", node.pipeline_errors)
    inf.add("last_pipeline_error", node.last_pipeline_error)
    inf.add("rss_mb", memory.rss_mb())
    inf.add("malloc_trims", node.worker.malloc_trims)
    inf.add("malloc_trim_ms_p50", node.worker.trim_ms.pct(50))
    if node.pipeline is None:
        inf.raise_level(ERROR, "pipeline not loaded")
    if node._pipeline_errors_window:
        inf.raise_level(ERROR, f"{node._pipeline_errors_window} inference errors in the last period")
        node._pipeline_errors_window = 0
    p95 = node.processing_ms.pct(95)
    if p95 == p95 and p95 > p["max_processing_ms"]:
        inf.raise_level(WARN, f"processing p95 {p95:.0f} ms > max_processing_ms {p['max_processing_ms']:.0f}")
    return [inputs, sync, inf]
