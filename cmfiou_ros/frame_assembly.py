"""Frame assembly of the detector node: pairing (sync policy), calibration (CameraInfo + extrinsic, TF) and the
:class:`cmfiou_core.types.Frame` handed to the inference worker. No publishers or subscriptions here: the node's
callbacks convert and validate messages, then call ``add_*``; whatever became ready comes back as
:class:`~cmfiou_ros.sync.Pairing` objects, and :meth:`FrameAssembler.build` turns one into a Frame (LiDAR-only, with
the reason, when the camera part is missing or unusable).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from cmfiou_core.calib import CalibrationError
from cmfiou_core.types import Frame
from cmfiou_ros import convert as C
from cmfiou_ros.sync import LatestImagePolicy, Pairing, make_approx_sync, nearest_by_stamp


def describe(e: Exception) -> str:
    """Warning text of a message problem: our own errors as they are, anything else with its type."""
    return str(e) if isinstance(e, (C.MessageError, CalibrationError)) else f"{type(e).__name__}: {e}"


class _Stamped:
    """What the approximate synchroniser sees: a header (for the stamp) and our converted payload."""

    __slots__ = ("header", "payload")

    def __init__(self, header, payload):
        self.header, self.payload = header, payload


class FrameAssembler:
    """Pairs clouds with images and finds each frame's calibration. Called from the node's callbacks.

    ``warn(topic, problem)`` reports (and counts) problems; ``tf_lookup(target, source)`` returns a
    TransformStamped or raises (None: no TF).
    """

    def __init__(self, params: Dict[str, Any], warn: Callable[[str, str], None],
                 tf_lookup: Optional[Callable[[str, str], Any]] = None):
        p = self.params = params
        self.warn = warn
        self.tf_lookup = tf_lookup
        self.lidar_topic, self.image_topic, self.info_topic = p["lidar_topic"], p["image_topic"], \
            p["camera_info_topic"]
        self.extrinsic_topic = p["extrinsic_topic"]
        self.camera_infos: deque = deque(maxlen=16)  # (stamp_ns, CameraInfo)
        self.extrinsics: deque = deque(maxlen=16)  # (stamp_ns, 4x4)
        self.calib_cache: Dict[tuple, Any] = {}
        self.param_T = C.extrinsic_matrix(p["lidar_to_camera"]) if p["lidar_to_camera"] else None
        self.current_lidar_frame = ""
        if p["sync_policy"] == "latest_image":
            self.policy = LatestImagePolicy(p["max_image_age"], match_tol_s=p["slop"], wait_s=p["image_wait"])
            self.approx = None
        else:
            self.policy = None
            self.approx = make_approx_sync(2, p["queue_size"], p["slop"], self._on_approx_pair)
        self._approx_out: List[Pairing] = []
        self.last_image_stamp: Optional[int] = None
        self.lidar_arrival: Dict[int, float] = {}
        self.unmatched_clouds = 0  # approx policy: clouds the synchroniser never paired

    # ------------------------------------------------------------------------------------------ inputs
    def add_cloud(self, header, pts: np.ndarray, stamp: int, t_arrival: float) -> List[Pairing]:
        lidar = (header, pts, t_arrival)
        if self.policy is not None:
            return self.policy.add_lidar(stamp, lidar, time.monotonic_ns())
        newest = self.last_image_stamp
        if newest is None or stamp - newest > int(self.params["max_image_age"] * 1e9):
            reason = "no image received" if newest is None else \
                f"newest image is {(stamp - newest) * 1e-9:.3f} s older than the cloud (camera stopped?)"
            return [Pairing(lidar, stamp, None, None, reason)]
        self.lidar_arrival[stamp] = t_arrival
        while len(self.lidar_arrival) > 4 * self.params["queue_size"]:  # evicted by the synchroniser too
            del self.lidar_arrival[min(self.lidar_arrival)]
            self.unmatched_clouds += 1
        return self._approx_add(0, _Stamped(header, lidar))

    def add_image(self, header, rgb: np.ndarray, stamp: int) -> List[Pairing]:
        self.last_image_stamp = stamp if self.last_image_stamp is None else max(stamp, self.last_image_stamp)
        img = (header, rgb)
        if self.policy is not None:
            return self.policy.add_image(stamp, img, time.monotonic_ns())
        return self._approx_add(1, _Stamped(header, img))

    def add_camera_info(self, msg) -> None:
        try:
            C.camera_info_to_calibration(msg, np.eye(4))  # structural validation (extrinsic checked at use)
        except Exception as e:  # noqa: BLE001
            self.warn(self.info_topic, describe(e))
            return
        self.camera_infos.append((C.stamp_to_ns(msg.header.stamp), msg))

    def add_extrinsic(self, msg) -> None:
        try:
            T = C.transform_msg_to_matrix(msg)
        except Exception as e:  # noqa: BLE001
            self.warn(self.extrinsic_topic, describe(e))
            return
        self.extrinsics.append((C.stamp_to_ns(msg.header.stamp), T))

    def poll(self, now_ns: int) -> List[Pairing]:
        """Pairings whose image wait expired (latest_image policy)."""
        return self.policy.poll(now_ns) if self.policy is not None else []

    def waiting(self) -> bool:
        """A cloud waits for its image (``poll`` will resolve it)."""
        return self.policy is not None and self.policy.queue_sizes()[1] > 0

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
        return self.policy.queue_sizes() if self.policy is not None else self.approx.queue_sizes()

    # ------------------------------------------------------------------------------------------ calibration
    def extrinsic_for(self, stamp: int, info) -> Optional[np.ndarray]:
        """Priority: extrinsic_topic message with this exact stamp (per-frame calibration, KITTI object replay) >
        TF (camera_frame <- lidar frame) > newest extrinsic_topic message > the lidar_to_camera parameter."""
        entries = list(self.extrinsics)
        for s, T in entries:
            if s == stamp:
                return T
        if self.tf_lookup is not None:
            try:
                target = self.params["camera_frame"] or info.header.frame_id
                lidar_frame = self.params["lidar_frame"] or self.current_lidar_frame
                return C.transform_msg_to_matrix(self.tf_lookup(target, lidar_frame))
            except Exception:  # noqa: BLE001 - not (yet) in TF: fall back
                pass
        T = nearest_by_stamp(entries, stamp)
        return T if T is not None else self.param_T

    def build(self, pairing: Pairing) -> Tuple[Frame, str, float]:
        """Pairing -> (Frame, reason it is LiDAR-only or '', image age in ms or NaN). Camera problems make a
        LiDAR-only frame (the reason is returned and warned)."""
        header, pts, _ = pairing.lidar
        self.current_lidar_frame = header.frame_id
        stamp = pairing.lidar_stamp_ns
        reason = pairing.reason
        image = calib = None
        age_ms = float("nan")
        if pairing.image is not None:
            img_header, rgb = pairing.image
            img_stamp = pairing.image_stamp_ns
            info = nearest_by_stamp(list(self.camera_infos), img_stamp)
            T = None if info is None else self.extrinsic_for(img_stamp, info)
            if info is None:
                reason = "no valid camera_info received"
            elif T is None:
                reason = "no LiDAR->camera extrinsic (no TF, no extrinsic_topic message, lidar_to_camera empty)"
            else:
                key = (id(info), T.tobytes())
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
                        problem = (f"camera_info is {calib.image_width}x{calib.image_height} but the image is "
                                   f"{rgb.shape[1]}x{rgb.shape[0]}")
                        self.warn(self.info_topic, problem)
                        reason, calib = problem, None
                    else:
                        image = rgb
                        age_ms = (stamp - img_stamp) * 1e-6
        frame = Frame(pts, image, calib if image is not None else None, stamp, header.frame_id)
        if image is None:
            reason = reason or "camera unavailable"
        return frame, ("" if image is not None else reason), age_ms
