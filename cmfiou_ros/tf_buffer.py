"""TF for the detector's LiDAR->camera extrinsic: tf2_ros where it is installed, otherwise a buffer of our own.

:func:`make_tf_source` returns a :class:`TfSource` over ``tf2_ros.Buffer`` + ``tf2_ros.TransformListener`` whenever
``tf2_ros`` imports (a real ROS installation: always the first choice). PyPI has no tf2 packages, so in the pip world
it falls back to :class:`TfBuffer` + :class:`TfListener`, fed by the same topics (/tf, /tf_static: tf2_msgs/TFMessage;
scripts/setup.sh builds a field-identical tf2_msgs when no real one exists) with tf2_ros' QoS. The fallback implements
tf2's semantics for what the node asks, written from tf2's behaviour (not its code):

- Each child frame has one cache. /tf entries are kept while they are less than ``cache_time`` (10 s, tf2's default)
  behind the newest entry of that frame; an arrival older than that is ignored (tf2's TF_OLD_DATA). A /tf_static
  entry holds at every time; a newer one replaces it. A frame becomes static or dynamic with its latest message.
- A lookup at time t takes the entry stamped t, or interpolates between the two entries around t (translation
  linearly, rotation by slerp; if the two name different parents, the older one is used). t outside the cached span
  is an extrapolation error, and so is any t other than its stamp when a frame has one entry only.
- Time 0 means the latest time common to the chain: the smallest of the newest stamps of its dynamic links (0 when
  all are static; every dynamic cache then answers with its newest entry).
- ``lookup(target, source, t)`` returns the transform that maps points of ``source`` into ``target``
  (header.frame_id = target, child_frame_id = source): both frames walk up their parents to a common ancestor.
  target == source is the identity even for frames TF never saw; otherwise an empty, '/'-prefixed or unknown frame
  is a :class:`TfLookupError`, frames in different trees a :class:`TfConnectivityError`, a loop a TfLookupError.
- Transforms are rejected as tf2 rejects them: frame_id == child_frame_id, an empty id, NaN, a quaternion whose
  squared norm is off 1 by 0.01 or more (others are normalised). A leading '/' of an id is stripped.
- A jump of the node's clock back by more than 1 s (sim time restarted) clears the dynamic caches, as tf2_ros.Buffer
  does; static entries stay.

Not implemented (the node does not use them): waiting with a timeout, lookups between two times through a fixed
frame, velocities, the tf2_frames service.
"""
from __future__ import annotations

import bisect
import math
import re
import threading
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

DEFAULT_CACHE_S = 10.0
MAX_DEPTH = 1000  # a longer chain is a loop
QUAT_NORM_TOLERANCE = 0.01  # |x^2+y^2+z^2+w^2 - 1| must be below this


class TfError(Exception):
    """A lookup that cannot be answered."""


class TfLookupError(TfError):
    """A frame does not exist (or an invalid id, or a loop)."""


class TfConnectivityError(TfError):
    """Both frames exist but are in different trees."""


class TfExtrapolationError(TfError):
    """The time is outside what the caches of the chain hold."""


# ---------------------------------------------------------------------------------------------- quaternions (x y z w)
def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw,
                     aw * bw - ax * bx - ay * by - az * bz])


def _qconj(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def _qrot(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate vector v by unit quaternion q (q v q*)."""
    return _qmul(_qmul(q, np.array([v[0], v[1], v[2], 0.0])), _qconj(q))[:3]


def _slerp(a: np.ndarray, b: np.ndarray, u: float) -> np.ndarray:
    """Spherical interpolation a -> b (u in [0, 1]) along the shorter arc."""
    d = float(np.dot(a, b))
    if d < 0.0:
        b, d = -b, -d
    d = min(d, 1.0)
    theta = math.acos(d)
    if theta == 0.0:
        return a.copy()
    s = math.sin(theta)
    return (math.sin((1.0 - u) * theta) * a + math.sin(u * theta) * b) / s


def _secs(ns: int) -> str:
    """A stamp in seconds, exact (no float rounding)."""
    return f"{int(ns) // 1_000_000_000}.{int(ns) % 1_000_000_000:09d}"


class _Entry:
    __slots__ = ("stamp", "parent", "t", "q")

    def __init__(self, stamp: int, parent: str, t: np.ndarray, q: np.ndarray):
        self.stamp, self.parent, self.t, self.q = stamp, parent, t, q

    def same(self, o: "_Entry") -> bool:
        return self.stamp == o.stamp and self.parent == o.parent and np.array_equal(self.t, o.t) and \
            np.array_equal(self.q, o.q)


class _Cache:
    """The entries of one child frame, oldest first (equal stamps in arrival order)."""

    def __init__(self, static: bool, cache_ns: int):
        self.static, self.cache_ns = static, cache_ns
        self.items: List[_Entry] = []
        self.stamps: List[int] = []

    def insert(self, e: _Entry) -> bool:
        if self.static:
            self.items, self.stamps = [e], [e.stamp]
            return True
        if self.items:
            newest = self.stamps[-1]
            k = bisect.bisect_left(self.stamps, newest - self.cache_ns)  # drop entries older than the window
            del self.items[:k], self.stamps[:k]
            if e.stamp < newest - self.cache_ns:
                return False
        i = bisect.bisect_right(self.stamps, e.stamp)
        j = bisect.bisect_left(self.stamps, e.stamp)
        if any(self.items[k].same(e) for k in range(j, i)):
            return True  # an exact repeat
        self.items.insert(i, e)
        self.stamps.insert(i, e.stamp)
        return True

    def clear(self) -> None:
        if not self.static:
            self.items, self.stamps = [], []

    def latest(self) -> Tuple[int, Optional[str]]:
        """(newest stamp, its parent); stamp 0 for a static frame; parent None when empty."""
        if not self.items:
            return 0, None
        return (0 if self.static else self.stamps[-1]), self.items[-1].parent

    def get(self, t: int, child: str) -> _Entry:
        if self.static:
            return self.items[0]
        if not self.items:
            raise TfExtrapolationError(f"no data for frame {child!r} (cleared or never received)")
        if t == 0:
            return self.items[-1]
        if len(self.items) == 1:
            if self.stamps[0] == t:
                return self.items[0]
            raise TfExtrapolationError(f"frame {child!r}: lookup at {_secs(t)} s would need extrapolation, only "
                                       f"{_secs(self.stamps[0])} s is in the buffer")
        if t == self.stamps[-1]:
            return self.items[-1]
        if t == self.stamps[0]:
            return self.items[0]
        if t > self.stamps[-1]:
            raise TfExtrapolationError(f"frame {child!r}: lookup at {_secs(t)} s would need extrapolation into the "
                                       f"future, the latest data is at {_secs(self.stamps[-1])} s")
        if t < self.stamps[0]:
            raise TfExtrapolationError(f"frame {child!r}: lookup at {_secs(t)} s would need extrapolation into the "
                                       f"past, the earliest data is at {_secs(self.stamps[0])} s")
        i = bisect.bisect_right(self.stamps, t) - 1
        old, new = self.items[i], self.items[i + 1]
        if old.parent != new.parent:
            return old
        u = (t - old.stamp) / (new.stamp - old.stamp)
        return _Entry(old.stamp, old.parent, old.t + u * (new.t - old.t), _slerp(old.q, new.q, u))


class TfBuffer:
    """Transforms by child frame (see the module doc for the semantics)."""

    def __init__(self, cache_time_s: float = DEFAULT_CACHE_S):
        self.cache_ns = int(round(cache_time_s * 1e9))
        self.caches: Dict[str, _Cache] = {}
        self.known: set = set()  # every frame named as a parent or child of an accepted transform
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ input
    def set_transform(self, msg, static: bool = False) -> str:
        """Store a geometry_msgs/TransformStamped. Returns '' or why it was ignored."""
        parent = msg.header.frame_id.lstrip("/") if msg.header.frame_id.startswith("/") else msg.header.frame_id
        child = msg.child_frame_id.lstrip("/") if msg.child_frame_id.startswith("/") else msg.child_frame_id
        tr, ro = msg.transform.translation, msg.transform.rotation
        t = np.array([tr.x, tr.y, tr.z], np.float64)
        q = np.array([ro.x, ro.y, ro.z, ro.w], np.float64)
        if not child:
            return "child_frame_id is empty"
        if not parent:
            return f"frame_id is empty (child {child!r})"
        if child == parent:
            return f"frame_id and child_frame_id are both {child!r}"
        if np.isnan(t).any() or np.isnan(q).any():
            return f"NaN in the transform {parent!r} -> {child!r}"
        n2 = float(np.dot(q, q))
        if not abs(n2 - 1.0) < QUAT_NORM_TOLERANCE:
            return f"quaternion of {parent!r} -> {child!r} is not normalised (|q|^2 = {n2:.6g})"
        q = q / math.sqrt(n2)
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        with self.lock:
            self.known.update((parent, child))
            c = self.caches.get(child)
            if c is None or c.static != static:
                c = self.caches[child] = _Cache(static, self.cache_ns)
            if not c.insert(_Entry(stamp, parent, t, q)):
                return (f"transform {parent!r} -> {child!r} stamped {_secs(stamp)} s is older than the "
                        f"{self.cache_ns * 1e-9:g} s cache: ignored")
        return ""

    def clear(self) -> None:
        """Forget the dynamic transforms (static ones stay)."""
        with self.lock:
            for c in self.caches.values():
                c.clear()

    def frames(self) -> List[str]:
        with self.lock:
            return sorted(self.known)

    # ------------------------------------------------------------------------------------------ queries
    def _check(self, frame: str, what: str) -> None:
        if not frame:
            raise TfLookupError(f"{what} frame id is empty")
        if frame.startswith("/"):
            raise TfLookupError(f"{what} frame id {frame!r} starts with '/'")
        if frame not in self.known:
            raise TfLookupError(f"{what} frame {frame!r} does not exist in TF")

    def _links(self, frame: str):
        """(child, cache) up the parents of ``frame`` at their newest entries (for the latest common time)."""
        depth = 0
        while True:
            c = self.caches.get(frame)
            if c is None:
                return
            stamp, parent = c.latest()
            if parent is None:
                return
            yield frame, stamp, parent
            frame = parent
            depth += 1
            if depth > MAX_DEPTH:
                raise TfLookupError("the TF tree contains a loop")

    def latest_common_time(self, target: str, source: str) -> int:
        if target == source:
            c = self.caches.get(source)
            return c.latest()[0] if c is not None else 0
        up: List[Tuple[int, str]] = []
        common = None
        for _, stamp, parent in self._links(source):
            if stamp:
                common = stamp if common is None else min(common, stamp)
            up.append((stamp, parent))
            if parent == target:
                return common or 0
        parents = [p for _, p in up]
        common, meet = None, None
        for _, stamp, parent in self._links(target):
            if stamp:
                common = stamp if common is None else min(common, stamp)
            if parent in parents:
                meet = parent
                break
            if parent == source:
                return common or 0
        if meet is None:
            raise TfConnectivityError(f"frames {source!r} and {target!r} are not connected in TF (two unconnected "
                                      "trees)")
        for stamp, parent in up:
            if stamp:
                common = stamp if common is None else min(common, stamp)
            if parent == meet:
                break
        return common or 0

    def lookup(self, target: str, source: str, stamp_ns: int = 0):
        """-> geometry_msgs/TransformStamped mapping ``source`` points into ``target`` at ``stamp_ns`` (0 = latest)."""
        with self.lock:
            if target == source:
                t = stamp_ns or self.latest_common_time(target, source)
                return _to_msg(target, source, t, np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0]))
            self._check(target, "target")
            self._check(source, "source")
            t = stamp_ns if stamp_ns else self.latest_common_time(target, source)
            # source up to the root (or to the first link without data at t), accumulating source -> top
            s_t, s_q = np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0])
            frame, top, depth, failed = source, source, 0, None
            while True:
                if frame == target:  # target is an ancestor of source
                    return _to_msg(target, source, t, s_t, s_q)
                c = self.caches.get(frame)
                if c is None:
                    top = frame
                    break
                try:
                    e = c.get(t, frame)
                except TfExtrapolationError as err:
                    top, failed = frame, err
                    break
                s_t, s_q = _qrot(e.q, s_t) + e.t, _qmul(e.q, s_q)
                frame = top = e.parent
                depth += 1
                if depth > MAX_DEPTH:
                    raise TfLookupError("the TF tree contains a loop")
            # target up to that top, accumulating target -> top
            g_t, g_q = np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0])
            frame, depth = target, 0
            while frame != top:
                if frame == source:  # source is an ancestor of target
                    break
                c = self.caches.get(frame)
                if c is None:
                    break
                e = c.get(t, frame)  # an extrapolation error here is the answer
                g_t, g_q = _qrot(e.q, g_t) + e.t, _qmul(e.q, g_q)
                frame = e.parent
                depth += 1
                if depth > MAX_DEPTH:
                    raise TfLookupError("the TF tree contains a loop")
            if frame == source and frame != top:
                s_t, s_q = np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0])
            elif frame != top:
                if failed is not None:
                    raise failed
                raise TfConnectivityError(f"frames {source!r} and {target!r} are not connected in TF (two "
                                          "unconnected trees)")
            inv_q = _qconj(g_q)
            inv_t = _qrot(inv_q, -g_t)
            return _to_msg(target, source, t, _qrot(inv_q, s_t) + inv_t, _qmul(inv_q, s_q))

    def can_transform(self, target: str, source: str, stamp_ns: int = 0) -> bool:
        try:
            self.lookup(target, source, stamp_ns)
        except TfError:
            return False
        return True


def _to_msg(target: str, source: str, stamp: int, t: np.ndarray, q: np.ndarray):
    from geometry_msgs.msg import TransformStamped

    m = TransformStamped()
    m.header.frame_id, m.child_frame_id = target, source
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(int(stamp), 1_000_000_000)
    tr, ro = m.transform.translation, m.transform.rotation
    tr.x, tr.y, tr.z = (float(v) for v in t)
    ro.x, ro.y, ro.z, ro.w = (float(v) for v in q)
    return m


# ---------------------------------------------------------------------------------------------- ROS side
def tf_qos():
    """(dynamic, static) QoS of tf2_ros.TransformListener: depth 100, reliable, volatile / transient local."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile

    return (QoSProfile(depth=100, durability=DurabilityPolicy.VOLATILE, history=HistoryPolicy.KEEP_LAST),
            QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST))


class TfListener:
    """Feeds a :class:`TfBuffer` from /tf and /tf_static; ``warn(topic, problem)`` gets each ignored transform."""

    def __init__(self, buffer: TfBuffer, node, warn: Optional[Callable[[str, str], None]] = None,
                 tf_topic: str = "/tf", tf_static_topic: str = "/tf_static"):
        from rclpy.clock import JumpThreshold
        from rclpy.duration import Duration
        from tf2_msgs.msg import TFMessage

        self.buffer, self.node, self.warn = buffer, node, warn
        self.ignored = 0
        qos, static_qos = tf_qos()
        self.subs = [node.create_subscription(TFMessage, tf_topic, lambda m: self._on(m, False, tf_topic), qos),
                     node.create_subscription(TFMessage, tf_static_topic,
                                              lambda m: self._on(m, True, tf_static_topic), static_qos)]
        self._jump = node.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(seconds=-1), on_clock_change=True),
            post_callback=lambda _jump: buffer.clear())

    def _on(self, msg, static: bool, topic: str) -> None:
        for tf in msg.transforms:
            why = self.buffer.set_transform(tf, static)
            if why:
                self.ignored += 1
                if self.warn is not None:
                    self.warn(topic, f"transform ignored: {why}")

    def close(self) -> None:
        for s in self.subs:
            try:
                self.node.destroy_subscription(s)
            except Exception:  # noqa: BLE001
                pass
        self.subs = []
        if self._jump is not None:
            try:
                self._jump.unregister()
            except Exception:  # noqa: BLE001
                pass
            self._jump = None


class TfSource:
    """What the frame assembly asks of TF, the same for tf2_ros and the fallback.

    ``lookup(target, source, stamp_ns)`` -> TransformStamped (source points into target) or raises;
    ``can_transform(target, source)`` at the latest time; ``frames()`` the frames TF knows ([] = no TF data yet)."""

    def __init__(self, impl: str, lookup, can_transform, frames, close):
        self.impl = impl
        self.lookup, self.can_transform, self.frames, self.close = lookup, can_transform, frames, close


_FRAME_LINE = re.compile(r"Frame (\S+) exists with parent (\S+)\.")


def _tf2_frames(buffer) -> List[str]:
    get = getattr(buffer, "_getFrameStrings", None)
    if get is not None:
        return sorted(get())
    names = set()
    for child, parent in _FRAME_LINE.findall(buffer.all_frames_as_string()):
        names.update((child, parent))
    return sorted(names)


def make_tf_source(node, warn: Optional[Callable[[str, str], None]] = None, prefer_tf2_ros: bool = True) \
        -> Optional[TfSource]:
    """tf2_ros when importable (``prefer_tf2_ros``), else the fallback when tf2_msgs is; None when neither is."""
    import rclpy.time

    if prefer_tf2_ros:
        try:
            import tf2_ros
        except ImportError:
            tf2_ros = None
        if tf2_ros is not None:
            buf = tf2_ros.Buffer(node=node)
            listener = tf2_ros.TransformListener(buf, node)
            return TfSource(
                "tf2_ros",
                lambda target, source, stamp_ns: buf.lookup_transform(target, source,
                                                                      rclpy.time.Time(nanoseconds=stamp_ns)),
                lambda target, source: buf.can_transform(target, source, rclpy.time.Time()),
                lambda: _tf2_frames(buf), listener.unregister)
    try:
        import tf2_msgs.msg  # noqa: F401
    except ImportError:
        return None
    buf = TfBuffer()
    listener = TfListener(buf, node, warn)
    src = TfSource("cmfiou_ros.tf_buffer", buf.lookup, lambda target, source: buf.can_transform(target, source),
                   buf.frames, listener.close)
    src.buffer, src.listener = buf, listener
    return src
