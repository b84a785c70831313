"""Camera/LiDAR synchronisation policies (pure logic, no rclpy needed for the algorithms).

1. :class:`ApproxTimeSync`: the algorithm of the Python ``message_filters.ApproximateTimeSynchronizer`` (ros2/
   message_filters ``__init__.py``): per input a dict ``stamp_ns -> msg`` holding at most ``queue_size`` entries (the
   oldest stamp is evicted, an equal stamp overwrites); on each new message, for every *other* queue keep the stamps
   with ``|dt| <= slop`` sorted by ``|dt|`` (give up if one queue has none), then emit the first combination in
   ``itertools.product`` order whose ``max - min < slop`` (strict), delete the emitted messages and stop.
   :func:`make_approx_sync` returns the real ``message_filters`` synchroniser when that package is importable (a
   real ROS install) and this equivalent otherwise; both expose ``add(index, msg)``.
2. :class:`LatestImagePolicy`: LiDAR-triggered (the Autoware BEVFusion / fusion-collector lesson). Images are kept in
   a small ring buffer; a LiDAR cloud takes the image closest in time whose age ``lidar_stamp - image_stamp`` lies in
   ``[-match_tol, max_age]``. If no image within ``match_tol`` is there yet, the cloud may wait ``wait_s`` (wall
   time) for one (only while the camera looks alive: newest image within ``max(2 * max_age, 1.5 camera periods)`` of the cloud); after that (or at once with ``wait_s = 0``) it goes with the best candidate, or alone: a LiDAR-only
   frame with the reason recorded. A camera that stopped never blocks the LiDAR.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from cmfiou_ros.convert import stamp_to_ns


# ------------------------------------------------------------------------------------------------ approximate time
class ApproxTimeSync:
    """Greedy approximate-time matcher with message_filters' Python semantics (see module doc).

    ``callback(*msgs)`` is called with one message per input, in input order. Stamps come from ``stamp_fn(msg)``
    (default ``msg.header.stamp`` in ns). Thread-safe.
    """

    impl = "cmfiou_ros.sync.ApproxTimeSync (message_filters not importable; same greedy semantics)"

    def __init__(self, n_inputs: int, queue_size: int, slop_s: float, callback: Callable[..., Any],
                 stamp_fn: Optional[Callable[[Any], int]] = None):
        if n_inputs < 2:
            raise ValueError("ApproxTimeSync needs at least two inputs")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not slop_s > 0:
            raise ValueError(f"slop must be > 0 s, got {slop_s}")
        self.queues: List[Dict[int, Any]] = [{} for _ in range(n_inputs)]
        self.queue_size = int(queue_size)
        self.slop_ns = int(round(slop_s * 1e9))
        self.callback = callback
        self.stamp_fn = stamp_fn or (lambda m: stamp_to_ns(m.header.stamp))
        self.lock = threading.Lock()
        self.emitted = 0

    def add(self, index: int, msg: Any) -> bool:
        """Add ``msg`` to input ``index``; returns True when a set was emitted."""
        stamp = int(self.stamp_fn(msg))
        with self.lock:
            my_queue = self.queues[index]
            my_queue[stamp] = msg
            while len(my_queue) > self.queue_size:
                del my_queue[min(my_queue)]
            stamps = []
            for j, q in enumerate(self.queues):
                if j == index:
                    continue
                cands = sorted(((s, abs(s - stamp)) for s in q if abs(s - stamp) <= self.slop_ns),
                               key=lambda x: x[1])
                if not cands:
                    return False
                stamps.append([s for s, _ in cands])
            for combo in itertools.product(*stamps):
                vv = list(combo)
                vv.insert(index, stamp)
                if max(vv) - min(vv) < self.slop_ns and all(t in q for q, t in zip(self.queues, vv)):
                    msgs = [q[t] for q, t in zip(self.queues, vv)]
                    for q, t in zip(self.queues, vv):
                        del q[t]
                    break
            else:
                return False
        self.emitted += 1
        self.callback(*msgs)
        return True

    def queue_sizes(self) -> List[int]:
        with self.lock:
            return [len(q) for q in self.queues]


class _RealApproxSync:
    """Adapter: real message_filters.ApproximateTimeSynchronizer fed through SimpleFilter inputs."""

    impl = "message_filters.ApproximateTimeSynchronizer"

    def __init__(self, mf, n_inputs, queue_size, slop_s, callback):
        self.inputs = [mf.SimpleFilter() for _ in range(n_inputs)]
        self.sync = mf.ApproximateTimeSynchronizer(self.inputs, queue_size, slop_s)
        self.sync.registerCallback(callback)
        self.emitted = 0

    def add(self, index: int, msg) -> bool:
        self.inputs[index].signalMessage(msg)
        return False  # unknown: the callback reports emissions

    def queue_sizes(self) -> List[int]:
        return [len(q) for q in getattr(self.sync, "queues", [])]


def real_message_filters():
    """The ``message_filters`` module when importable (real ROS 2), else None."""
    try:
        import message_filters  # noqa: F401

        return message_filters if hasattr(message_filters, "ApproximateTimeSynchronizer") else None
    except ImportError:
        return None


def make_approx_sync(n_inputs: int, queue_size: int, slop_s: float, callback, prefer_real: bool = True):
    mf = real_message_filters() if prefer_real else None
    if mf is not None:
        return _RealApproxSync(mf, n_inputs, queue_size, slop_s, callback)
    return ApproxTimeSync(n_inputs, queue_size, slop_s, callback)


# ------------------------------------------------------------------------------------------------ LiDAR-triggered
@dataclass
class Pairing:
    """A LiDAR cloud and the image chosen for it (``image`` None = LiDAR-only; ``reason`` says why)."""

    lidar: Any
    lidar_stamp_ns: int
    image: Any = None
    image_stamp_ns: Optional[int] = None
    reason: str = ""  # "" when an image was paired

    @property
    def image_age_s(self) -> Optional[float]:
        return None if self.image_stamp_ns is None else (self.lidar_stamp_ns - self.image_stamp_ns) * 1e-9


class LatestImagePolicy:
    """LiDAR-triggered pairing with the newest suitable image (see module doc). Thread-safe.

    ``add_image(stamp_ns, img, now_ns)`` and ``add_lidar(stamp_ns, cloud, now_ns)`` return the pairings that became
    ready; ``poll(now_ns)`` returns those whose wait expired. ``now_ns`` is a monotonic wall clock (the wait is about
    message arrival, not message stamps). At most one cloud waits; a newer cloud resolves the older one at once.
    """

    def __init__(self, max_age_s: float, match_tol_s: float = 0.02, wait_s: float = 0.0, buffer: int = 4):
        if max_age_s < 0 or match_tol_s < 0 or wait_s < 0:
            raise ValueError("max_age_s, match_tol_s and wait_s must be >= 0")
        if buffer < 1:
            raise ValueError("buffer must be >= 1")
        self.max_age_ns = int(round(max_age_s * 1e9))
        self.tol_ns = int(round(match_tol_s * 1e9))
        self.wait_ns = int(round(wait_s * 1e9))
        self.buffer = int(buffer)
        self.images: List[tuple] = []  # (stamp_ns, img), the ``buffer`` most recently received, in arrival order
        self.pending: Optional[tuple] = None  # (stamp_ns, cloud, deadline_ns)
        self._periods: List[int] = []  # recent image stamp differences
        self.lock = threading.Lock()

    # -- internals (lock held)
    def _best(self, stamp: int):
        best = None
        for s, img in self.images:
            age = stamp - s
            if -self.tol_ns <= age <= self.max_age_ns and (best is None or abs(age) < abs(stamp - best[0])):
                best = (s, img)
        return best

    def _resolve(self, stamp: int, cloud, final: bool) -> Optional[Pairing]:
        best = self._best(stamp)
        if best is not None and (abs(stamp - best[0]) <= self.tol_ns or final):
            return Pairing(cloud, stamp, best[1], best[0])
        if not final:
            return None
        if not self.images:
            reason = "no image received"
        else:
            newest = self._newest()
            age = (stamp - newest) * 1e-9
            reason = (f"newest image is {age:.3f} s older than the cloud (max_image_age {self.max_age_ns * 1e-9:.3f} s)"
                      if age > 0 else f"newest image is {-age:.3f} s newer than the cloud")
        return Pairing(cloud, stamp, None, None, reason)

    def _newest(self) -> int:
        return max(s for s, _ in self.images)

    # -- API
    def _camera_period_ns(self) -> float:
        d = sorted(self._periods)
        return float(d[len(d) // 2]) if d else 0.0

    def add_image(self, stamp_ns: int, img, now_ns: int = 0) -> List[Pairing]:
        out = []
        with self.lock:
            if self.images and stamp_ns > self.images[-1][0]:
                self._periods.append(int(stamp_ns) - self.images[-1][0])
                del self._periods[:-5]
            # kept by arrival, not by stamp: an image stamped lower than the buffered ones (a bag loop, a late
            # message) is still used by its cloud
            self.images = [(s, m) for s, m in self.images if s != stamp_ns]
            self.images.append((int(stamp_ns), img))
            del self.images[: max(0, len(self.images) - self.buffer)]
            if self.pending is not None:
                p = self._resolve(self.pending[0], self.pending[1], final=False)
                if p is not None:
                    out.append(p)
                    self.pending = None
        return out

    def add_lidar(self, stamp_ns: int, cloud, now_ns: int = 0) -> List[Pairing]:
        out = []
        with self.lock:
            if self.pending is not None:
                out.append(self._resolve(self.pending[0], self.pending[1], final=True))
                self.pending = None
            # wait only while the camera looks alive: its newest image is within 2 * max_age (or 1.5 camera periods,
            # for slow/lock-stepped streams) of this cloud
            alive_ns = max(2 * self.max_age_ns, int(1.5 * self._camera_period_ns())) + self.tol_ns
            alive = bool(self.images) and int(stamp_ns) - self._newest() <= alive_ns
            p = self._resolve(int(stamp_ns), cloud, final=self.wait_ns == 0 or not alive)
            if p is None:
                self.pending = (int(stamp_ns), cloud, int(now_ns) + self.wait_ns)
            else:
                out.append(p)
        return out

    def poll(self, now_ns: int) -> List[Pairing]:
        with self.lock:
            if self.pending is not None and now_ns >= self.pending[2]:
                p = self._resolve(self.pending[0], self.pending[1], final=True)
                self.pending = None
                return [p]
        return []

    def newest_image_stamp(self) -> Optional[int]:
        with self.lock:
            return self._newest() if self.images else None

    def queue_sizes(self) -> List[int]:
        with self.lock:
            return [len(self.images), int(self.pending is not None)]
