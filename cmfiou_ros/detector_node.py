"""CMF-IOU detector node (rclpy lifecycle node).

Subscribes PointCloud2 + Image + CameraInfo (sensor-data QoS), pairs camera and LiDAR (``sync_policy``:
``latest_image`` = LiDAR-triggered with ``max_image_age``, or ``approx`` = message_filters ApproximateTime on
cloud+image), builds a :class:`cmfiou_core.types.Frame` and runs the Pipeline on a worker thread (latest frame wins,
dropped frames counted). Publishes per frame, all with the input LiDAR header: vision_msgs/Detection3DArray,
cmfiou_ros/DetectionScores (index-aligned), visualization_msgs/MarkerArray, cmfiou_ros/FrameTimings; and
diagnostic_msgs/DiagnosticArray on /diagnostics every ``diagnostics_period`` s.

Lifecycle: configure = validate parameters, load + warm up the pipeline, create publishers/subscriptions;
activate = start processing; deactivate = stop processing (messages ignored); cleanup = release everything.
``autostart`` (default true) runs configure + activate at start-up; without it drive the node through the
lifecycle services (``ros2 lifecycle set /cmfiou_detector configure``).

Malformed input never kills the node: each bad message is counted and produces a warning (throttled per topic)
naming the topic and the problem; the next valid frame is processed normally.

Run: ``python -m cmfiou_ros.detector_node --ros-args --params-file config/detector_node.yaml``.
"""
from __future__ import annotations

import importlib
import importlib.util
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

import rclpy
import rclpy.time
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)

from cmfiou_core import memory
from cmfiou_core.calib import CalibrationError
from cmfiou_core.types import Detections, Frame
from cmfiou_ros import convert as C
from cmfiou_ros import diagnostics as D
from cmfiou_ros.params import DETECTOR_PARAMS, ParamError, declare
from cmfiou_ros.sync import LatestImagePolicy, Pairing, make_approx_sync, nearest_by_stamp

NODE_NAME = "cmfiou_detector"


def load_factory(path: str) -> Callable:
    """``'pkg.module:Attr.attr'`` or ``'/path/file.py:Attr.attr'`` -> the callable."""
    mod_name, _, attr = path.partition(":")
    if not attr:
        raise ParamError(f"pipeline_factory {path!r}: expected 'module:attr'")
    if mod_name.endswith(".py"):
        p = Path(mod_name)
        if not p.is_file():
            raise ParamError(f"pipeline_factory: file {p} not found")
        spec = importlib.util.spec_from_file_location(f"_cmfiou_factory_{p.stem}", p)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ParamError(f"pipeline_factory {path!r} is not callable")
    return obj


def filter_detections(det: Detections, threshold: float) -> Detections:
    if threshold <= 0 or len(det) == 0:
        return det
    keep = det.scores >= threshold
    if keep.all():
        return det
    out = Detections(det.boxes[keep], det.labels[keep], det.cls_scores[keep], det.iou_scores[keep], det.scores[keep],
                     det.stamp_ns, det.frame_id, det.lidar_only, dict(det.timings_ms), det.class_names)
    if hasattr(det, "score_mode"):
        out.score_mode = det.score_mode
    return out


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


class DetectorNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, *, pipeline: Any = None, **kwargs):
        """``pipeline``: an already built pipeline object (in-process tests); otherwise ``pipeline_factory`` is used."""
        super().__init__(node_name, **kwargs)
        self._injected_pipeline = pipeline
        self.pipeline = None
        self.params: Dict[str, Any] = {}
        self.param_error: Optional[str] = None
        try:
            self.params = declare(self, DETECTOR_PARAMS)
        except (ParamError, Exception) as e:  # keep the node inspectable; configure fails with the reason
            self.param_error = str(e)
            self.get_logger().error(f"invalid parameters: {e}")
        self.add_on_set_parameters_callback(self._on_set_params)
        self.warn = WarnThrottle(self.get_logger(), self.params.get("warn_throttle", 5.0))
        self._active = False
        self._configured = False
        self._entities: list = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._slot: Optional[tuple] = None
        self._stop = True
        self._worker: Optional[threading.Thread] = None
        self._current_lidar_frame = ""
        self._reset_stats()

    # ------------------------------------------------------------------------------------------ parameters
    def _on_set_params(self, params):
        from rcl_interfaces.msg import SetParametersResult

        from cmfiou_ros.params import validate

        new = dict(self.params)
        for p in params:
            new[p.name] = p.value
        try:
            checked = validate(DETECTOR_PARAMS, {k: v for k, v in new.items() if k in {s.name for s in DETECTOR_PARAMS}})
        except ParamError as e:
            return SetParametersResult(successful=False, reason=str(e))
        if self.params:
            self.params.update({p.name: checked[p.name] for p in params if p.name in checked})
            self.warn.period = self.params["warn_throttle"]
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------------------ statistics
    def _reset_stats(self) -> None:
        self.rates = {k: D.RateMeter(5.0) for k in ("lidar", "image", "camera_info", "output")}
        self.latency_ms = D.Stats()  # publish time - LiDAR stamp
        self.processing_ms = D.Stats()  # pipeline call
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self._dropped_since_timing = 0
        self.lidar_only_frames = 0
        self.camera_frames = 0
        self.last_lidar_only: Optional[bool] = None
        self.last_lidar_only_reason = ""
        self.last_image_age_ms = float("nan")
        self.pipeline_errors = 0
        self._pipeline_errors_window = 0
        self.last_pipeline_error = ""
        self.points_dropped_nonfinite = 0
        self.empty_clouds = 0
        self.unmatched_clouds = 0  # approx policy: clouds the synchroniser never paired
        self._processed = 0  # frames the worker has run (published or failed)
        self.malloc_trims = 0
        self.trim_ms = D.Stats()

    # ------------------------------------------------------------------------------------------ lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        if self.param_error:
            self.get_logger().error(f"configure failed: {self.param_error}")
            return TransitionCallbackReturn.FAILURE
        p = self.params
        try:
            if self._injected_pipeline is not None:
                self.pipeline = self._injected_pipeline
            else:
                factory = load_factory(p["pipeline_factory"])
                device = p["device"]
                if device == "auto":
                    import torch

                    device = "cuda" if torch.cuda.is_available() else "cpu"
                t0 = time.perf_counter()
                self.pipeline = factory(p["model_config"] or None, checkpoint=p["checkpoint"] or None, device=device)
                self.get_logger().info(f"pipeline loaded by {p['pipeline_factory']} in "
                                       f"{time.perf_counter() - t0:.2f} s")
            if p["warmup"] and hasattr(self.pipeline, "warmup"):
                t0 = time.perf_counter()
                self.pipeline.warmup()
                self.get_logger().info(f"pipeline warm-up {time.perf_counter() - t0:.2f} s")
        except Exception as e:  # noqa: BLE001 - any load error fails the transition with its reason
            self.get_logger().error(f"configure failed: cannot load the pipeline: {type(e).__name__}: {e}")
            self.pipeline = None
            return TransitionCallbackReturn.FAILURE
        self._create_entities()
        self._start_worker()
        self._configured = True
        self.get_logger().info(
            f"configured: sync={p['sync_policy']} lidar={self._lidar_topic} image={self._image_topic} "
            f"camera_info={self._info_topic} -> {self.det_pub.topic_name}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self._active = True
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._active = False
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        self._active = False
        self._stop_worker()
        for e in self._entities:
            try:
                if hasattr(e, "cancel"):
                    e.cancel()
                    self.destroy_timer(e)
                elif hasattr(e, "publish"):
                    self.destroy_publisher(e)
                else:
                    self.destroy_subscription(e)
            except Exception:  # noqa: BLE001
                pass
        self._entities = []
        self.pipeline = None
        self._configured = False

    # ------------------------------------------------------------------------------------------ set-up
    def _create_entities(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TransformStamped
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from visualization_msgs.msg import MarkerArray
        from vision_msgs.msg import Detection3DArray

        from cmfiou_ros.msg import DetectionScores, FrameTimings

        p = self.params
        self._lidar_topic, self._image_topic, self._info_topic = p["lidar_topic"], p["image_topic"], \
            p["camera_info_topic"]
        sensor_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p["queue_size"],
                                reliability=qos_profile_sensor_data.reliability,
                                durability=qos_profile_sensor_data.durability)
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.det_pub = self.create_publisher(Detection3DArray, p["detections_topic"], out_qos)
        self.scores_pub = self.create_publisher(DetectionScores, p["scores_topic"], out_qos)
        self.markers_pub = self.create_publisher(MarkerArray, p["markers_topic"], out_qos) if p["markers_topic"] \
            else None
        self.timings_pub = self.create_publisher(FrameTimings, p["timings_topic"], out_qos) if p["timings_topic"] \
            else None
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", out_qos)
        # camera subscriptions first: when a frame's messages are ready together, rclpy's executor serves entities in
        # creation order, so the image is stored before the cloud that triggers the frame
        subs = [
            self.create_subscription(CameraInfo, self._info_topic, self.on_camera_info, sensor_qos),
            self.create_subscription(Image, self._image_topic, self.on_image, sensor_qos),
            self.create_subscription(PointCloud2, self._lidar_topic, self.on_cloud, sensor_qos),
        ]
        if p["extrinsic_topic"]:
            subs.append(self.create_subscription(TransformStamped, p["extrinsic_topic"], self.on_extrinsic, latched))
        self._camera_infos: deque = deque(maxlen=16)  # (stamp_ns, CameraInfo)
        self._extrinsics: deque = deque(maxlen=16)  # (stamp_ns, 4x4)
        self._calib_cache: Dict[tuple, Any] = {}
        self._param_T = C.extrinsic_matrix(p["lidar_to_camera"]) if p["lidar_to_camera"] else None
        self._tf_buffer = None
        if p["use_tf"]:
            try:
                import tf2_ros

                self._tf_buffer = tf2_ros.Buffer()
                self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
            except ImportError:
                self._tf_buffer = None
        if p["sync_policy"] == "latest_image":
            self.policy = LatestImagePolicy(p["max_image_age"], match_tol_s=p["slop"], wait_s=p["image_wait"])
            self.approx = None
        else:
            self.policy = None
            self.approx = make_approx_sync(2, p["queue_size"], p["slop"], self._on_approx_pair)
        self._last_image_stamp: Optional[int] = None
        self._lidar_arrival: Dict[int, float] = {}
        timers = [self.create_timer(p["diagnostics_period"], self.publish_diagnostics)]
        if self.policy is not None and p["image_wait"] > 0:
            timers.append(self.create_timer(min(0.01, p["image_wait"] / 2), self._poll_policy))
        self._entities = [self.det_pub, self.scores_pub, self.diag_pub] + \
            [x for x in (self.markers_pub, self.timings_pub) if x is not None] + subs + timers

    # ------------------------------------------------------------------------------------------ callbacks
    def on_cloud(self, msg) -> None:
        if not self._active:
            return
        t_arrival = time.monotonic()
        self.rates["lidar"].tick(t_arrival)
        try:
            stamp = C.stamp_to_ns(msg.header.stamp)
            if stamp <= 0:
                raise C.MessageError("header.stamp is zero (driver does not stamp: cannot synchronise)")
            pts, dropped = C.pointcloud2_to_xyzi(msg, self.params["intensity_scale"], allow_empty=True)
        except Exception as e:  # noqa: BLE001 - every problem with a message is a warning, never a crash
            self.warn(self._lidar_topic, self._describe(e))
            return
        if self.params["lidar_frame"] and msg.header.frame_id != self.params["lidar_frame"]:
            self.warn(self._lidar_topic, f"frame_id {msg.header.frame_id!r} != lidar_frame "
                                         f"{self.params['lidar_frame']!r} (boxes are published in the cloud's frame)")
        if dropped:
            self.points_dropped_nonfinite += dropped
        if len(pts) == 0:
            self.empty_clouds += 1
            self.warn(self._lidar_topic, f"cloud has no valid points ({dropped} non-finite dropped): publishing "
                                         "empty detections")
        self.frames_in += 1
        lidar = (msg.header, pts, t_arrival)
        if self.policy is not None:
            now = time.monotonic_ns()
            for pairing in self.policy.add_lidar(stamp, lidar, now):
                self._submit(pairing)
        else:
            newest = self._last_image_stamp
            if newest is None or stamp - newest > int(self.params["max_image_age"] * 1e9):
                reason = "no image received" if newest is None else \
                    f"newest image is {(stamp - newest) * 1e-9:.3f} s older than the cloud (camera stopped?)"
                self._submit(Pairing(lidar, stamp, None, None, reason))
            else:
                self._lidar_arrival[stamp] = t_arrival
                while len(self._lidar_arrival) > 4 * self.params["queue_size"]:  # evicted by the synchroniser too
                    del self._lidar_arrival[min(self._lidar_arrival)]
                    self.unmatched_clouds += 1
                self.approx.add(0, _Stamped(msg.header, lidar))

    def on_image(self, msg) -> None:
        if not self._active:
            return
        self.rates["image"].tick()
        try:
            stamp = C.stamp_to_ns(msg.header.stamp)
            if stamp <= 0:
                raise C.MessageError("header.stamp is zero (cannot synchronise)")
            rgb = C.image_to_rgb(msg)
        except Exception as e:  # noqa: BLE001
            self.warn(self._image_topic, self._describe(e))
            return
        self._last_image_stamp = stamp if self._last_image_stamp is None else max(stamp, self._last_image_stamp)
        img = (msg.header, rgb)
        if self.policy is not None:
            for pairing in self.policy.add_image(stamp, img, time.monotonic_ns()):
                self._submit(pairing)
        else:
            self.approx.add(1, _Stamped(msg.header, img))

    def on_camera_info(self, msg) -> None:
        if not self._active:
            return
        self.rates["camera_info"].tick()
        try:
            C.camera_info_to_calibration(msg, np.eye(4))  # structural validation (extrinsic checked at use)
        except Exception as e:  # noqa: BLE001
            self.warn(self._info_topic, self._describe(e))
            return
        self._camera_infos.append((C.stamp_to_ns(msg.header.stamp), msg))

    def on_extrinsic(self, msg) -> None:
        topic = self.params["extrinsic_topic"]
        try:
            T = C.transform_msg_to_matrix(msg)
        except Exception as e:  # noqa: BLE001
            self.warn(topic, self._describe(e))
            return
        self._extrinsics.append((C.stamp_to_ns(msg.header.stamp), T))

    def _on_approx_pair(self, lidar_s, image_s) -> None:
        lidar, image = lidar_s.payload, image_s.payload
        stamp = C.stamp_to_ns(lidar[0].stamp)
        self._lidar_arrival.pop(stamp, None)
        self._submit(Pairing(lidar, stamp, image, C.stamp_to_ns(image[0].stamp)))
        # clouds left unmatched (older than this one) are gone from the synchroniser's point of view
        for s in [s for s in self._lidar_arrival if s < stamp]:
            del self._lidar_arrival[s]
            self.unmatched_clouds += 1

    def _poll_policy(self) -> None:
        if self.policy is None:
            return
        for pairing in self.policy.poll(time.monotonic_ns()):
            self._submit(pairing)

    @staticmethod
    def _describe(e: Exception) -> str:
        return str(e) if isinstance(e, (C.MessageError, CalibrationError)) else f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------------------------------ frame assembly
    def _extrinsic_for(self, stamp: int, info) -> Optional[np.ndarray]:
        """Priority: extrinsic_topic message with this exact stamp (per-frame calibration, KITTI object replay) >
        TF (camera_frame <- lidar frame) > newest extrinsic_topic message > the lidar_to_camera parameter."""
        entries = list(self._extrinsics)
        for s, T in entries:
            if s == stamp:
                return T
        if self._tf_buffer is not None:
            try:
                target = self.params["camera_frame"] or info.header.frame_id
                lidar_frame = self.params["lidar_frame"] or self._current_lidar_frame
                tf = self._tf_buffer.lookup_transform(target, lidar_frame, rclpy.time.Time())
                return C.transform_msg_to_matrix(tf)
            except Exception:  # noqa: BLE001 - not (yet) in TF: fall back
                pass
        T = nearest_by_stamp(entries, stamp)
        return T if T is not None else self._param_T

    def build_frame(self, pairing: Pairing) -> Frame:
        """Pairing -> Frame; camera problems make a LiDAR-only frame (the reason is recorded and warned)."""
        header, pts, _ = pairing.lidar
        self._current_lidar_frame = header.frame_id
        stamp = pairing.lidar_stamp_ns
        reason = pairing.reason
        image = calib = None
        if pairing.image is not None:
            img_header, rgb = pairing.image
            img_stamp = pairing.image_stamp_ns
            info = nearest_by_stamp(list(self._camera_infos), img_stamp)
            T = None if info is None else self._extrinsic_for(img_stamp, info)
            if info is None:
                reason = "no valid camera_info received"
            elif T is None:
                reason = "no LiDAR->camera extrinsic (no TF, no extrinsic_topic message, lidar_to_camera empty)"
            else:
                key = (id(info), T.tobytes())
                calib = self._calib_cache.get(key)
                if calib is None:
                    try:
                        calib = C.camera_info_to_calibration(info, T)
                    except Exception as e:  # noqa: BLE001
                        self.warn(self._info_topic, self._describe(e))
                        reason = f"camera_info unusable: {self._describe(e)}"
                    else:
                        if len(self._calib_cache) > 32:
                            self._calib_cache.clear()
                        self._calib_cache[key] = calib
                if calib is not None:
                    if (calib.image_width, calib.image_height) != (rgb.shape[1], rgb.shape[0]):
                        problem = (f"camera_info is {calib.image_width}x{calib.image_height} but the image is "
                                   f"{rgb.shape[1]}x{rgb.shape[0]}")
                        self.warn(self._info_topic, problem)
                        reason, calib = problem, None
                    else:
                        image = rgb
                        self.last_image_age_ms = (stamp - img_stamp) * 1e-6
        frame = Frame(pts, image, calib if image is not None else None, stamp, header.frame_id)
        lidar_only = image is None
        self.last_lidar_only = lidar_only
        if lidar_only:
            self.lidar_only_frames += 1
            self.last_lidar_only_reason = reason or "camera unavailable"
        else:
            self.camera_frames += 1
        return frame

    def _submit(self, pairing: Pairing) -> None:
        try:
            frame = self.build_frame(pairing)
        except Exception as e:  # noqa: BLE001
            self.warn(self._lidar_topic, f"cannot build a frame: {self._describe(e)}")
            return
        with self._cond:
            if self._slot is not None:
                self.frames_dropped += 1
                self._dropped_since_timing += 1
            self._slot = (frame, pairing.lidar[0], pairing.lidar[2])
            self._cond.notify()

    # ------------------------------------------------------------------------------------------ worker
    def _start_worker(self) -> None:
        self._stop = False
        self._worker = threading.Thread(target=self._work_loop, name="cmfiou_inference", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        with self._cond:
            self._stop = True
            self._slot = None
            self._cond.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30)
        self._worker = None

    def _work_loop(self) -> None:
        while True:
            with self._cond:
                while self._slot is None and not self._stop:
                    self._cond.wait(0.5)
                if self._stop:
                    return
                job, self._slot = self._slot, None
            self.process(*job)
            self._processed += 1
            self._maybe_trim()

    def _maybe_trim(self) -> None:
        """Return the C heap's free pages to the OS every ``malloc_trim_period`` processed frames (worker thread)."""
        n = self.params.get("malloc_trim_period", 0)
        if n <= 0 or self._processed % n:
            return
        t0 = time.perf_counter()
        memory.malloc_trim()
        self.trim_ms.add((time.perf_counter() - t0) * 1e3)
        self.malloc_trims += 1

    def process(self, frame: Frame, header, t_arrival: float) -> Optional[Detections]:
        """Run the pipeline on one frame and publish everything (called by the worker; callable in tests)."""
        t0 = time.perf_counter()
        try:
            if len(frame.points) == 0:
                det = Detections.empty(frame.stamp_ns, frame.frame_id, lidar_only=frame.image is None)
            else:
                det = self.pipeline(frame)
            det.lidar_only = bool(det.lidar_only or frame.image is None)
            det = filter_detections(det, self.params["score_threshold"])
        except Exception as e:  # noqa: BLE001 - a failing frame must not stop the node
            self.pipeline_errors += 1
            self._pipeline_errors_window += 1
            self.last_pipeline_error = f"{type(e).__name__}: {e}"
            self.warn("pipeline", f"inference failed on the frame stamped {frame.stamp_ns}: {self.last_pipeline_error}")
            return None
        proc_ms = (time.perf_counter() - t0) * 1e3
        try:
            self.publish_outputs(det, header, t_arrival, proc_ms)
        except Exception as e:  # noqa: BLE001 - e.g. context shut down while publishing
            self.warn("publish", f"{type(e).__name__}: {e}")
            return det
        return det

    def publish_outputs(self, det: Detections, header, t_arrival: float, proc_ms: float) -> None:
        self.det_pub.publish(C.detections_to_detection3d_array(det, header))
        self.scores_pub.publish(C.detections_to_scores_msg(det, header))
        if self.markers_pub is not None:
            self.markers_pub.publish(C.detections_to_markers(det, header))
        now_ns = self.get_clock().now().nanoseconds
        age_ms = (now_ns - C.stamp_to_ns(header.stamp)) * 1e-6
        total_ms = (time.monotonic() - t_arrival) * 1e3
        if self.timings_pub is not None:
            with self._cond:
                dropped, self._dropped_since_timing = self._dropped_since_timing, 0
            self.timings_pub.publish(C.timings_to_msg(det.timings_ms, header, total_ms, age_ms, dropped))
        self.processing_ms.add(proc_ms)
        self.latency_ms.add(age_ms)
        self.frames_out += 1
        self.rates["output"].tick()

    # ------------------------------------------------------------------------------------------ diagnostics
    def diagnostics_statuses(self) -> list:
        p, name = self.params, self.get_name()
        now = time.monotonic()
        inputs = D.Status(f"{name}: inputs", name)
        for key, topic in (("lidar", self._lidar_topic), ("image", self._image_topic),
                           ("camera_info", self._info_topic)):
            r = self.rates[key]
            inputs.add(f"{key}_topic", topic)
            inputs.add(f"{key}_rate_hz", r.rate(now))
            age = r.age(now)
            inputs.add(f"{key}_last_msg_age_s", float("nan") if age is None else age)
            inputs.add(f"{key}_malformed", self.warn.count.get(topic, 0))
            if topic in self.warn.last_problem:
                inputs.add(f"{key}_last_problem", self.warn.last_problem[topic])
        inputs.add("nonfinite_points_dropped", self.points_dropped_nonfinite)
        inputs.add("empty_clouds", self.empty_clouds)
        la = self.rates["lidar"].age(now)
        if la is None or la > 3.0:
            inputs.raise_level(D.WARN, "no LiDAR input" if la is None else f"no LiDAR input for {la:.1f} s")
        with self.warn.lock:
            bad, self.warn.window_count = self.warn.window_count, 0
        if bad:
            inputs.raise_level(D.WARN, f"{bad} malformed/unusable messages in the last period")
        inputs.add("malformed_in_period", bad)

        sync = D.Status(f"{name}: sync", name)
        sync.add("policy", p["sync_policy"])
        sync.add("frames_with_camera", self.camera_frames)
        sync.add("lidar_only_frames", self.lidar_only_frames)
        sync.add("lidar_only", self.last_lidar_only)
        sync.add("lidar_only_reason", self.last_lidar_only_reason if self.last_lidar_only else "")
        sync.add("image_age_ms", self.last_image_age_ms)
        q = self.policy.queue_sizes() if self.policy is not None else self.approx.queue_sizes()
        sync.add("sync_queue_sizes", q)
        if self.last_lidar_only:
            sync.raise_level(D.WARN, f"LiDAR-only detections: {self.last_lidar_only_reason}")
        if self.approx is not None:
            try:
                waiting = [t for t in list(self._lidar_arrival.values()) if now - t > 1.0]
            except RuntimeError:  # mutated by a callback thread meanwhile: next period
                waiting = []
            sync.add("unmatched_clouds", self.unmatched_clouds)
            sync.add("clouds_waiting_over_1s", len(waiting))
            if waiting:
                sync.raise_level(D.WARN, f"{len(waiting)} cloud(s) unmatched for > 1 s by the approx synchroniser "
                                         "(image stamps outside slop?)")

        inf = D.Status(f"{name}: inference", name)
        inf.add("pipeline_loaded", self.pipeline is not None)
        inf.add("active", self._active)
        inf.add("frames_in", self.frames_in)
        inf.add("frames_out", self.frames_out)
        inf.add("frames_dropped", self.frames_dropped)
        inf.add("output_rate_hz", self.rates["output"].rate(now))
        inf.add("processing_ms_p50", self.processing_ms.pct(50))
        inf.add("processing_ms_p95", self.processing_ms.pct(95))
        inf.add("latency_ms_p50", self.latency_ms.pct(50))
        inf.add("latency_ms_p95", self.latency_ms.pct(95))
        inf.add("pipeline_errors", self.pipeline_errors)
        inf.add("last_pipeline_error", self.last_pipeline_error)
        inf.add("rss_mb", memory.rss_mb())
        inf.add("malloc_trims", self.malloc_trims)
        inf.add("malloc_trim_ms_p50", self.trim_ms.pct(50))
        if self.pipeline is None:
            inf.raise_level(D.ERROR, "pipeline not loaded")
        if self._pipeline_errors_window:
            inf.raise_level(D.ERROR, f"{self._pipeline_errors_window} inference errors in the last period")
            self._pipeline_errors_window = 0
        p95 = self.processing_ms.pct(95)
        if p95 == p95 and p95 > p["max_processing_ms"]:
            inf.raise_level(D.WARN, f"processing p95 {p95:.0f} ms > max_processing_ms {p['max_processing_ms']:.0f}")
        return [inputs, sync, inf]

    def publish_diagnostics(self) -> None:
        try:
            self.diag_pub.publish(D.array_msg(self.diagnostics_statuses(), self.get_clock().now().to_msg()))
        except Exception as e:  # noqa: BLE001
            self.warn("diagnostics", f"{type(e).__name__}: {e}")


class _Stamped:
    """What the approximate synchroniser sees: a header (for the stamp) and our converted payload."""

    __slots__ = ("header", "payload")

    def __init__(self, header, payload):
        self.header, self.payload = header, payload


def main(argv=None) -> int:
    from rclpy.executors import MultiThreadedExecutor

    from .shutdown import spinning

    rclpy.init(args=argv)
    node = DetectorNode()
    rc = 0
    try:
        with spinning(NODE_NAME):
            if node.params.get("autostart", True):
                if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                    node.get_logger().fatal("configure failed: exiting")
                    return 2
                node.trigger_activate()
            ex = MultiThreadedExecutor(num_threads=2)
            ex.add_node(node)
            ex.spin()
    finally:
        node._teardown()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
