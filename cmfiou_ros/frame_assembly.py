"""Frame assembly of the detector node: pairing (sync policy), calibration (CameraInfo + extrinsic, TF), stamp checks
and the :class:`cmfiou_core.types.Frame` handed to the inference worker. No publishers or subscriptions here: the
node's callbacks convert messages and call ``add_*``; whatever became ready comes back as :class:`Assembled` frames
(LiDAR-only, with the reason, when the camera part is missing or unusable).

Calibration rules (every frame gets its own or none):

- CameraInfo and extrinsic_topic messages are kept by stamp (content-keyed, never by object identity), valid and
  rejected ones alike. A frame takes the one nearest its image stamp within ``calibration_tolerance``; if that one
  was rejected, the frame is LiDAR-only (never fused with an older one instead).
- A source is *per-frame* once one of its messages was stamped like a frame's image (a camera driver's CameraInfo,
  the KITTI replay's extrinsic) or once its content changed: then every frame needs its own. A cloud whose image's
  calibration has not arrived yet waits for it up to ``image_wait`` (like a missing image; also while nothing was
  received yet), then runs LiDAR-only and says why. A source that never matched a frame and never changed (latched
  once, stamped at start-up) is *static*: its newest message serves every frame.
- The CameraInfo size must equal the image size.
- Extrinsic sources, first that has one: extrinsic_topic (once it delivered anything it is the only source), TF at
  the image stamp (camera frame <- LiDAR frame; once TF knows any frame, a cloud or camera frame_id it cannot connect
  is warned naming the frames and counted, and the frame falls back to the parameter or runs LiDAR-only), the
  ``lidar_to_camera`` parameter.

Stamps: a LiDAR or image stamp more than ``time_jump_threshold`` behind the newest one seen (a bag loop, a sim-time
reset) resets the sync state once, with one warning; buffered messages stamped after the new time are dropped.
Inputs stamped more than ``future_tolerance`` ahead of the node's clock are rejected (the node counts them).
"""
from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from cmfiou_core.calib import CalibrationError
from cmfiou_core.types import Frame
from cmfiou_ros import convert as C
from cmfiou_ros.sync import LatestImagePolicy, Pairing, make_approx_sync


def describe(e: Exception) -> str:
    """Warning text of a message problem: our own errors as they are, anything else with its type."""
    return str(e) if isinstance(e, (C.MessageError, CalibrationError)) else f"{type(e).__name__}: {e}"


class _Stamped:
    """What the approximate synchroniser sees: a header (for the stamp) and our converted payload."""

    __slots__ = ("header", "payload")

    def __init__(self, header, payload):
        self.header, self.payload = header, payload


@dataclass
class Assembled:
    """A frame ready for inference: ``reason`` says why it is LiDAR-only ('' when the camera is used)."""

    frame: Frame
    reason: str
    image_age_ms: float
    pairing: Pairing


def camera_info_key(msg) -> bytes:
    """Content key of a CameraInfo (size, K, R, P): equal calibrations have equal keys."""
    h = hashlib.sha1()
    h.update(np.asarray([int(msg.width), int(msg.height)], np.int64).tobytes())
    for arr in (msg.k, msg.r, msg.p):
        h.update(np.asarray(arr, np.float64).tobytes())
    return h.digest()


class StampedCalibrations:
    """Calibration messages of one source: (stamp, content key, value, rejection reason) in arrival order."""

    def __init__(self, name: str, maxlen: int = 32):
        self.name = name
        self.entries: deque = deque(maxlen=maxlen)
        self._first_key: Optional[bytes] = None
        self.changing = False  # content has changed at least once: each frame needs its own
        self.matched = False  # a message was stamped like a frame's image: each frame needs its own

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, stamp: int, key: Optional[bytes], value: Any, error: str = "") -> None:
        if not error:
            if self._first_key is None:
                self._first_key = key
            elif key != self._first_key:
                self.changing = True
        self.entries.append((int(stamp), key, value, error))

    def drop_after(self, stamp: int) -> None:
        """Forget entries stamped after ``stamp`` (time jumped back); a static source keeps its newest entry."""
        keep = [e for e in self.entries if e[0] <= stamp]
        if not self.changing and self.entries and not keep:
            keep = [self.entries[-1]]
        self.entries.clear()
        self.entries.extend(keep)

    def lookup(self, stamp: int, tol_ns: int) -> Tuple[Any, Optional[bytes], str, bool]:
        """-> (value, key, reason, may_still_arrive). ``value`` None: none usable (``reason`` says why)."""
        if not self.entries:
            return None, None, f"no {self.name} received", True
        best = None
        for e in self.entries:  # nearest stamp; on a tie the later arrival
            if best is None or abs(e[0] - stamp) <= abs(best[0] - stamp):
                best = e
        dt = (best[0] - stamp) * 1e-9
        if abs(best[0] - stamp) <= tol_ns:
            self.matched = True
            if best[3]:
                return None, None, f"the {self.name} of this frame (stamp {best[0]}) was rejected: {best[3]}", False
            return best[2], best[1], "", False
        if not self.changing and not self.matched:
            newest = self.entries[-1]
            if newest[3]:
                return None, None, f"the newest {self.name} (stamp {newest[0]}) was rejected: {newest[3]}", False
            return newest[2], newest[1], "", False
        why = "changes" if self.changing else "is stamped per frame"
        return None, None, (f"no {self.name} within {tol_ns * 1e-9:.3f} s of the image stamp (nearest is {dt:+.3f} s "
                            f"away; the {self.name} {why}, so each frame needs its own)"), True


class FrameAssembler:
    """Pairs clouds with images and finds each frame's calibration. Called from the node's callbacks.

    ``warn(topic, problem)`` reports (and counts) problems; ``tf`` is a :class:`cmfiou_ros.tf_buffer.TfSource` (None:
    no TF): ``lookup(target, source, stamp_ns)`` -> TransformStamped or raises, ``can_transform(target, source)`` at
    the latest time, ``frames()`` the frames TF knows.
    """

    def __init__(self, params: Dict[str, Any], warn: Callable[[str, str], None], tf: Any = None, logger=None):
        p = self.params = params
        self.warn = warn
        self.logger = logger
        self.tf = tf
        self.tf_unavailable = 0  # frames whose extrinsic TF could not give (warned, counted)
        self.last_tf_problem = ""
        self.lidar_topic, self.image_topic, self.info_topic = p["lidar_topic"], p["image_topic"], \
            p["camera_info_topic"]
        self.extrinsic_topic = p["extrinsic_topic"]
        self.camera_infos = StampedCalibrations("camera_info")
        self.extrinsics = StampedCalibrations("extrinsic_topic message")
        self.calib_cache: Dict[tuple, Any] = {}
        self.param_T = C.extrinsic_matrix(p["lidar_to_camera"]) if p["lidar_to_camera"] else None
        self.current_lidar_frame = ""
        self.tol_ns = int(round(p.get("calibration_tolerance", 0.02) * 1e9))
        self.wait_ns = int(round(p["image_wait"] * 1e9))
        self.jump_ns = int(round(p.get("time_jump_threshold", 1.0) * 1e9))
        self._new_sync()
        self.last_image_stamp: Optional[int] = None
        self.lidar_arrival: Dict[int, float] = {}
        self.unmatched_clouds = 0  # approx policy: clouds the synchroniser never paired
        self.pending: Optional[Tuple[Pairing, int]] = None  # a pairing waiting for its calibration, deadline
        self.newest_stamp: Optional[int] = None  # newest LiDAR/image stamp seen (time-jump detection)
        self.time_jumps = 0
        self.last_time_jump = ""

    def _new_sync(self) -> None:
        p = self.params
        if p["sync_policy"] == "latest_image":
            self.policy = LatestImagePolicy(p["max_image_age"], match_tol_s=p["slop"], wait_s=p["image_wait"])
            self.approx = None
        else:
            self.policy = None
            self.approx = make_approx_sync(2, p["queue_size"], p["slop"], self._on_approx_pair)
        self._approx_out: List[Pairing] = []

    # ------------------------------------------------------------------------------------------ time jumps
    def _check_jump(self, stamp: int, topic: str) -> List[Assembled]:
        """A stamp far behind the newest one: reset the sync state (one warning per jump). Returns the frame of a
        cloud that was waiting (resolved as it is, before the reset)."""
        out: List[Assembled] = []
        if self.newest_stamp is None or stamp >= self.newest_stamp - self.jump_ns:
            self.newest_stamp = stamp if self.newest_stamp is None else max(stamp, self.newest_stamp)
            return out
        back = (self.newest_stamp - stamp) * 1e-9
        out.extend(self._flush())
        self.time_jumps += 1
        self.last_time_jump = f"[{topic}] stamp jumped back {back:.3f} s: sync state reset"
        if self.logger is not None:
            self.logger.warning(f"{self.last_time_jump} (bag loop or sim-time reset?)")
        self.newest_stamp = stamp
        self._new_sync()
        self.last_image_stamp = None
        self.lidar_arrival.clear()
        self.camera_infos.drop_after(stamp + self.tol_ns)
        self.extrinsics.drop_after(stamp + self.tol_ns)
        return out

    def _flush(self) -> List[Assembled]:
        """Resolve whatever waits (a cloud for its image or calibration) as it is."""
        out = []
        if self.policy is not None:
            out.extend(self._assemble(self.policy.poll(2**62), 0, final=True))
        if self.pending is not None:
            pairing, _ = self.pending
            self.pending = None
            out.append(self.build(pairing, final=True))
        return out

    # ------------------------------------------------------------------------------------------ inputs
    def add_cloud(self, header, pts: np.ndarray, stamp: int, t_arrival: float) -> List[Assembled]:
        out = self._check_jump(stamp, self.lidar_topic)
        lidar = (header, pts, t_arrival)
        now = time.monotonic_ns()
        if self.policy is not None:
            return out + self._assemble(self.policy.add_lidar(stamp, lidar, now), now)
        newest = self.last_image_stamp
        if newest is None or stamp - newest > int(self.params["max_image_age"] * 1e9):
            reason = "no image received" if newest is None else \
                f"newest image is {(stamp - newest) * 1e-9:.3f} s older than the cloud (camera stopped?)"
            return out + self._assemble([Pairing(lidar, stamp, None, None, reason)], now)
        self.lidar_arrival[stamp] = t_arrival
        while len(self.lidar_arrival) > 4 * self.params["queue_size"]:  # evicted by the synchroniser too
            del self.lidar_arrival[min(self.lidar_arrival)]
            self.unmatched_clouds += 1
        return out + self._assemble(self._approx_add(0, _Stamped(header, lidar)), now)

    def add_image(self, header, rgb: np.ndarray, stamp: int) -> List[Assembled]:
        out = self._check_jump(stamp, self.image_topic)
        self.last_image_stamp = stamp if self.last_image_stamp is None else max(stamp, self.last_image_stamp)
        img = (header, rgb)
        now = time.monotonic_ns()
        if self.policy is not None:
            return out + self._assemble(self.policy.add_image(stamp, img, now), now)
        return out + self._assemble(self._approx_add(1, _Stamped(header, img)), now)

    def add_camera_info(self, msg) -> List[Assembled]:
        stamp = C.stamp_to_ns(msg.header.stamp)
        try:
            C.camera_info_to_calibration(msg, np.eye(4))  # structural validation (extrinsic checked at use)
        except Exception as e:  # noqa: BLE001
            self.warn(self.info_topic, describe(e))
            self.camera_infos.add(stamp, None, None, describe(e))
        else:
            self.camera_infos.add(stamp, camera_info_key(msg), msg)
        return self._retry_pending()

    def add_extrinsic(self, msg) -> List[Assembled]:
        stamp = C.stamp_to_ns(msg.header.stamp)
        try:
            T = C.transform_msg_to_matrix(msg)
            if not np.isfinite(T).all():
                raise C.MessageError("extrinsic transform contains NaN or inf")
        except Exception as e:  # noqa: BLE001
            self.warn(self.extrinsic_topic, describe(e))
            self.extrinsics.add(stamp, None, None, describe(e))
        else:
            self.extrinsics.add(stamp, T.tobytes(), T)
        return self._retry_pending()

    def poll(self, now_ns: int) -> List[Assembled]:
        """Frames whose wait (for the image or the calibration) expired."""
        out = self._assemble(self.policy.poll(now_ns), now_ns) if self.policy is not None else []
        if self.pending is not None and now_ns >= self.pending[1]:
            pairing, _ = self.pending
            self.pending = None
            out.append(self.build(pairing, final=True))
        return out

    def waiting(self) -> bool:
        """A cloud waits for its image or its calibration (``poll`` will resolve it)."""
        return self.pending is not None or (self.policy is not None and self.policy.queue_sizes()[1] > 0)

    def _retry_pending(self) -> List[Assembled]:
        if self.pending is None:
            return []
        pairing, deadline = self.pending
        a = self.build(pairing, final=False)
        if a is None:
            return []
        self.pending = None
        return [a]

    def _assemble(self, pairings: List[Pairing], now_ns: int, final: bool = False) -> List[Assembled]:
        out = []
        for pairing in pairings:
            if self.pending is not None:  # a newer cloud resolves the one waiting for its calibration
                old, _ = self.pending
                self.pending = None
                out.append(self.build(old, final=True))
            a = self.build(pairing, final=final or self.wait_ns == 0)
            if a is None:
                self.pending = (pairing, now_ns + self.wait_ns)
            else:
                out.append(a)
        return out

    def _approx_add(self, index: int, item) -> List[Pairing]:
        self.approx.add(index, item)
        out, self._approx_out = self._approx_out, []
        return out

    def _on_approx_pair(self, lidar_s, image_s) -> None:
        lidar, image = lidar_s.payload, image_s.payload
        stamp = C.stamp_to_ns(lidar[0].stamp)
        self.lidar_arrival.pop(stamp, None)
        self._approx_out.append(Pairing(lidar, stamp, image, C.stamp_to_ns(image[0].stamp)))
        # clouds left unmatched (older than this one) are gone from the synchroniser's point of view
        for s in [s for s in self.lidar_arrival if s < stamp]:
            del self.lidar_arrival[s]
            self.unmatched_clouds += 1

    def queue_sizes(self) -> List[int]:
        q = self.policy.queue_sizes() if self.policy is not None else self.approx.queue_sizes()
        return list(q) + [int(self.pending is not None)]

    # ------------------------------------------------------------------------------------------ calibration
    def extrinsic_for(self, stamp: int, info) -> Tuple[Optional[np.ndarray], str, bool, Optional[Tuple[str, str]]]:
        """-> (4x4 or None, reason, may still arrive, TF problem to warn about as (topic, text) or None) for an image
        stamp (sources: module doc). TF is asked once it knows any frame (before that it is not in use here): a
        cloud or camera frame it cannot connect is a problem named in the warning, and the frame falls back to
        ``lidar_to_camera`` or runs LiDAR-only."""
        if len(self.extrinsics):
            T, _, reason, later = self.extrinsics.lookup(stamp, self.tol_ns)
            return T, reason, later, None
        later = bool(self.extrinsic_topic)  # configured, nothing received yet: it may still come
        problem = None
        if self.tf is not None:
            target = self.params["camera_frame"] or info.header.frame_id
            source = self.params["lidar_frame"] or self.current_lidar_frame
            try:
                frames = self.tf.frames()
            except Exception:  # noqa: BLE001
                frames = []
            if frames:
                if not source:
                    problem = (self.lidar_topic, "the cloud's header.frame_id is empty: no TF lookup possible")
                elif not target:
                    problem = (self.info_topic, "the camera_info's header.frame_id is empty (and camera_frame is "
                                                "not set): no TF lookup possible")
                elif not self.tf.can_transform(target, source):
                    unknown = [f for f in (source, target) if f not in frames]
                    what = (f"frame {unknown[0]!r} is not in TF" if len(unknown) == 1 else
                            f"frames {source!r} and {target!r} are not in TF" if unknown else
                            "the two frames are in unconnected TF trees")
                    topic = self.info_topic if unknown == [target] else self.lidar_topic
                    shown = ", ".join(frames[:12]) + (", ..." if len(frames) > 12 else "")
                    problem = (topic, f"no TF path from LiDAR frame {source!r} to camera frame {target!r}: {what} "
                                      f"(TF knows {shown})")
                else:
                    try:
                        T = C.transform_msg_to_matrix(self.tf.lookup(target, source, stamp))
                    except Exception as e:  # noqa: BLE001 - e.g. extrapolation: no TF at the image stamp
                        text = f"TF {target} <- {source} at the image stamp {stamp}: {type(e).__name__}: {e}"
                        return None, text, False, (self.lidar_topic, text)
                    return T, "", False, None
        if self.param_T is not None:
            if problem is not None:
                problem = (problem[0], problem[1] + "; using the lidar_to_camera parameter")
            return self.param_T, "", False, problem
        if problem is not None:
            return None, problem[1], later, (problem[0], problem[1] + "; the frame runs LiDAR-only")
        return None, "no LiDAR->camera extrinsic (no TF, no extrinsic_topic message, lidar_to_camera empty)", \
            later, None

    def build(self, pairing: Pairing, final: bool = True) -> Optional[Assembled]:
        """Pairing -> Assembled. Camera problems make a LiDAR-only frame (the reason is returned; problems of a
        message are warned). ``final=False``: None while the frame's calibration may still arrive."""
        header, pts, _ = pairing.lidar
        self.current_lidar_frame = header.frame_id
        stamp = pairing.lidar_stamp_ns
        reason = pairing.reason
        image = calib = None
        age_ms = float("nan")
        if pairing.image is not None:
            img_header, rgb = pairing.image
            img_stamp = pairing.image_stamp_ns
            info, info_key, reason, later = self.camera_infos.lookup(img_stamp, self.tol_ns)
            T = tf_problem = None
            if info is not None:
                T, reason, later, tf_problem = self.extrinsic_for(img_stamp, info)
            if (info is None or T is None) and later and not final:
                return None
            if tf_problem is not None:  # warned and counted once per frame, when the frame is built
                self.tf_unavailable += 1
                self.last_tf_problem = tf_problem[1]
                self.warn(*tf_problem)
            if info is not None and T is not None:
                key = (info_key, T.tobytes())
                calib = self.calib_cache.get(key)
                if calib is None:
                    try:
                        calib = C.camera_info_to_calibration(info, T)
                    except Exception as e:  # noqa: BLE001
                        self.warn(self.info_topic, describe(e))
                        reason = f"camera_info unusable: {describe(e)}"
                    else:
                        if len(self.calib_cache) > 32:
                            self.calib_cache.clear()
                        self.calib_cache[key] = calib
                if calib is not None:
                    if (calib.image_width, calib.image_height) != (rgb.shape[1], rgb.shape[0]):
                        reason = (f"camera_info is {calib.image_width}x{calib.image_height} but the image is "
                                  f"{rgb.shape[1]}x{rgb.shape[0]}")
                        self.warn(self.info_topic, reason)
                        calib = None
                    else:
                        image = rgb
                        age_ms = (stamp - img_stamp) * 1e-6
        frame = Frame(pts, image, calib if image is not None else None, stamp, header.frame_id)
        if image is None:
            reason = reason or "camera unavailable"
        return Assembled(frame, "" if image is not None else reason, age_ms, pairing)
