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

Parts: :mod:`cmfiou_ros.frame_assembly` (pairing, calibration, TF), :mod:`cmfiou_ros.inference_worker` (the worker
thread and its one-frame slot), :mod:`cmfiou_ros.diagnostics` (warnings, statuses); this module holds the lifecycle,
the subscriptions' callbacks (message conversion) and the publishing.

Run: ``python -m cmfiou_ros.detector_node --ros-args --params-file config/detector_node.yaml``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import rclpy
import rclpy.time
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data)

from cmfiou_core.factory import load_factory as _load_factory
from cmfiou_core.types import Detections, Frame
from cmfiou_ros import convert as C
from cmfiou_ros import diagnostics as D
from cmfiou_ros.diagnostics import WarnThrottle
from cmfiou_ros.frame_assembly import Assembled, FrameAssembler, describe
from cmfiou_ros.inference_worker import InferenceWorker
from cmfiou_ros.params import DETECTOR_PARAMS, ParamError, declare

NODE_NAME = "cmfiou_detector"
SHUTDOWN_GRACE_S = 4.0  # on SIGINT/SIGTERM: how long the frame in flight may take to finish (then dropped, counted)


def load_factory(path: str) -> Callable:
    """``'pkg.module:Attr.attr'`` or ``'/path/file.py:Attr.attr'`` -> the callable (``cmfiou_core.factory``)."""
    return _load_factory(path, "pipeline_factory", ParamError)


def filter_detections(det: Detections, threshold: float) -> Detections:
    if threshold <= 0 or len(det) == 0:
        return det
    keep = det.scores >= threshold
    if keep.all():
        return det
    return Detections(det.boxes[keep], det.labels[keep], det.cls_scores[keep], det.iou_scores[keep],
                      det.scores[keep], det.stamp_ns, det.frame_id, det.lidar_only, dict(det.timings_ms),
                      det.class_names, det.score_mode, getattr(det, "note", ""))


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
            if not self.context.ok():  # SIGINT/SIGTERM during start-up (declaring publishes events): no error
                self.param_error = "shut down during start-up"
            else:
                self.param_error = str(e)
                self.get_logger().error(f"invalid parameters: {e}")
        self.unknown_parameters = self._warn_unknown_overrides()
        self.add_on_set_parameters_callback(self._on_set_params)
        self.warn = WarnThrottle(self.get_logger(), self.params.get("warn_throttle", 5.0))
        self._active = False
        self._configured = False
        self._entities: list = []
        self.assembler: Optional[FrameAssembler] = None
        self.worker = InferenceWorker(self.process, lambda: self.params.get("malloc_trim_period", 0))
        self._reset_stats()

    # ------------------------------------------------------------------------------------------ parameters
    def _warn_unknown_overrides(self) -> list:
        """Overrides (``-p name:=v``, params file) of parameters this node does not have are ignored by rclpy without
        a word: warn about each one, with the closest known name."""
        import difflib

        known = {s.name for s in DETECTOR_PARAMS} | {"use_sim_time", "start_type_description_service"}
        unknown = sorted(k for k in getattr(self, "_parameter_overrides", {}) if k not in known
                         and not k.startswith("qos_overrides."))
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.get_logger().warning(f"unknown parameter {k!r} ignored{hint}")
        return unknown

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
        self.lidar_only_frames = 0
        self.camera_frames = 0
        self.last_lidar_only: Optional[bool] = None
        self.last_lidar_only_reason = ""
        self._lidar_only_logged = -1e18
        self._lidar_only_kind = ""
        self.last_image_age_ms = float("nan")
        self.pipeline_errors = 0
        self._pipeline_errors_window = 0
        self.last_pipeline_error = ""
        self.points_dropped_nonfinite = 0
        self.empty_clouds = 0
        self.unpublished_at_shutdown = 0  # inferred while the context went down (Ctrl-C / SIGTERM): not published
        self.empty_outputs = 0  # frames published empty because nothing could be detected (reason in the scores)
        self.last_empty_reason = ""
        self.undetectable_frames = 0  # of those: the pipeline found no point in its range
        self.future_stamped = 0  # inputs rejected for a stamp ahead of the node's clock
        self.intensity_zeroed = 0  # points whose non-finite intensity was set to 0
        self.points_capped = 0  # points thinned away by max_points
        self.oversize_messages = 0  # inputs above the transport limit (they arrived; bigger ones may not)
        self.oversize_outputs = 0  # outputs published above it

    # the worker's and the assembler's counters, under the names the tests and diagnostics always used
    @property
    def frames_dropped(self) -> int:
        return self.worker.dropped

    @property
    def malloc_trims(self) -> int:
        return self.worker.malloc_trims

    @property
    def _processed(self) -> int:
        return self.worker.processed

    @property
    def _slot(self):
        return self.worker.slot

    @property
    def _param_T(self):
        return self.assembler.param_T

    @_param_T.setter
    def _param_T(self, T) -> None:
        self.assembler.param_T = T

    # ------------------------------------------------------------------------------------------ lifecycle
    def load_pipeline(self) -> bool:
        """Load and warm up the pipeline (the long part of configure: seconds to minutes). ``main`` calls it before
        the configure transition, so that a SIGINT/SIGTERM arriving meanwhile ends the process cleanly instead of
        inside a lifecycle transition whose context went down. -> False when loading failed (logged)."""
        p = self.params
        self._load_failed = False
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
                extra = {"engine": p["engine"]} if p["engine"] else {}
                self.pipeline = factory(p["model_config"] or None, checkpoint=p["checkpoint"] or None, device=device,
                                        **extra)
                self.get_logger().info(f"pipeline loaded by {p['pipeline_factory']} in "
                                       f"{time.perf_counter() - t0:.2f} s")
            weights = getattr(self.pipeline, "weights", "")
            if weights.startswith(("random", "demo")):
                self.get_logger().warning(f"weights: {weights}")
            if getattr(self.pipeline, "engine", None):
                self.get_logger().info(f"inference engine: {self.pipeline.engine}")
            if p["warmup"] and hasattr(self.pipeline, "warmup"):
                t0 = time.perf_counter()
                self.pipeline.warmup()
                if self.context.ok():  # after a signal the node's logger cannot reach /rosout any more
                    self.get_logger().info(f"pipeline warm-up {time.perf_counter() - t0:.2f} s")
        except Exception as e:  # noqa: BLE001 - any load error fails the transition with its reason
            self.get_logger().error(f"configure failed: cannot load the pipeline: {type(e).__name__}: {e}")
            self.pipeline = None
            self._load_failed = True
            return False
        return True

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        if self.param_error:
            self.get_logger().error(f"configure failed: {self.param_error}")
            return TransitionCallbackReturn.FAILURE
        p = self.params
        if getattr(self, "_load_failed", False):  # main's load_pipeline failed (logged): no second attempt
            self._load_failed = False
            return TransitionCallbackReturn.FAILURE
        if self.pipeline is None and not self.load_pipeline():
            return TransitionCallbackReturn.FAILURE
        from cmfiou_ros.transport import active_limit

        self.transport = active_limit()
        if self.transport.max_message_bytes is None and p["message_size_warn_mb"] <= 0:
            self.get_logger().warning(f"message size limit unknown ({self.transport.source}): warning above "
                                      f"{self.transport.describe()}")
        self._create_entities()
        self._start_worker()
        self._configured = True
        approx = getattr(self.assembler, "approx", None) if hasattr(self, "assembler") else getattr(self, "approx", None)
        sync = f"{p['sync_policy']} ({approx.impl})" if approx is not None else \
            f"{p['sync_policy']} (cmfiou_ros.sync.LatestImagePolicy)"
        tf = self.tf.impl if self.tf is not None else "off"
        self.get_logger().info(
            f"configured: sync={sync} tf={tf} lidar={self._lidar_topic} image={self._image_topic} "
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
        tf, self.tf = getattr(self, "tf", None), None
        if tf is not None:
            try:
                tf.close()
            except Exception:  # noqa: BLE001
                pass
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
        self.tf = None
        if p["use_tf"]:
            from cmfiou_ros.tf_buffer import make_tf_source

            self.tf = make_tf_source(self, self.warn)  # tf2_ros when installed, else our /tf + /tf_static buffer
            if self.tf is None:
                self.get_logger().warning("use_tf is true but neither tf2_ros nor tf2_msgs is importable: no TF "
                                          "(extrinsic from extrinsic_topic or lidar_to_camera only)")
        self.assembler = FrameAssembler(p, self.warn, self.tf, logger=self.get_logger())
        timers = [self.create_timer(p["diagnostics_period"], self.publish_diagnostics)]
        # the wait timer runs only while a cloud waits for its image (armed by _after_input, cancelled by
        # _poll_policy once nothing waits): no periodic wake-ups of the executor without work
        self._wait_timer = None
        if p["sync_policy"] == "latest_image" and p["image_wait"] > 0:
            self._wait_timer = self.create_timer(p["image_wait"], self._poll_policy)
            self._wait_timer.cancel()
            timers.append(self._wait_timer)
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
            self._check_future(stamp)
            counts: Dict[str, int] = {}
            pts, dropped = C.pointcloud2_to_xyzi(msg, self.params["intensity_scale"], allow_empty=True, counts=counts)
        except Exception as e:  # noqa: BLE001 - every problem with a message is a warning, never a crash
            self.warn(self._lidar_topic, describe(e))
            return
        self._check_size(self._lidar_topic, msg)
        self._check_frame_id(self._lidar_topic, msg.header.frame_id, self.params["lidar_frame"], "lidar_frame",
                             "boxes are published in the cloud's frame")
        if dropped:
            self.points_dropped_nonfinite += dropped
        if counts.get("nonfinite_intensity"):
            n = counts["nonfinite_intensity"]
            self.intensity_zeroed += n
            self.warn(self._lidar_topic, f"{n} point(s) with finite x/y/z have a non-finite intensity: set to 0 "
                                         "(points kept)")
        cap = self.params["max_points"]
        if len(pts) > cap:
            self.points_capped += len(pts) - cap
            self.warn(self._lidar_topic, f"cloud has {len(pts)} points > max_points {cap}: thinned to {cap} "
                                         "(every k-th point)")
            pts = pts[np.linspace(0, len(pts) - 1, cap).astype(np.int64)]
        if len(pts) == 0:
            self.empty_clouds += 1
            self.warn(self._lidar_topic, f"cloud has no valid points ({dropped} non-finite dropped): publishing "
                                         "empty detections")
        self.frames_in += 1
        self._after_input(self.assembler.add_cloud(msg.header, pts, stamp, t_arrival))

    def on_image(self, msg) -> None:
        if not self._active:
            return
        self.rates["image"].tick()
        try:
            stamp = C.stamp_to_ns(msg.header.stamp)
            if stamp <= 0:
                raise C.MessageError("header.stamp is zero (cannot synchronise)")
            self._check_future(stamp)
            rgb = C.image_to_rgb(msg)
        except Exception as e:  # noqa: BLE001
            self.warn(self._image_topic, describe(e))
            return
        self._check_size(self._image_topic, msg)
        self._check_frame_id(self._image_topic, msg.header.frame_id, self.params["camera_frame"], "camera_frame",
                             "the calibration comes from CameraInfo")
        self._after_input(self.assembler.add_image(msg.header, rgb, stamp))

    def on_camera_info(self, msg) -> None:
        if not self._active:
            return
        self.rates["camera_info"].tick()
        try:
            self._check_future(C.stamp_to_ns(msg.header.stamp))
        except C.MessageError as e:
            self.warn(self._info_topic, str(e))
            return
        self._after_input(self.assembler.add_camera_info(msg))

    def on_extrinsic(self, msg) -> None:
        if not self._active:
            return
        try:
            self._check_future(C.stamp_to_ns(msg.header.stamp))
        except C.MessageError as e:
            self.warn(self.params["extrinsic_topic"], str(e))
            return
        self._after_input(self.assembler.add_extrinsic(msg))

    def _size_limit(self):
        from cmfiou_ros.transport import active_limit

        if getattr(self, "transport", None) is None:
            self.transport = active_limit()
        mb = self.params["message_size_warn_mb"]
        return self.transport.warn_bytes(mb), self.transport.describe(mb)

    def _check_size(self, topic: str, msg) -> None:
        """Warn about received messages above the transport limit: this one arrived, but best-effort messages this
        big are lost without a trace whenever a fragment is (docs: cmfiou_ros/transport.py)."""
        limit, what = self._size_limit()
        if len(msg.data) > limit:
            self.oversize_messages += 1
            self.warn(topic, f"message of {len(msg.data) / 2**20:.1f} MiB > {what}: close to the transport limit; "
                             "messages this big are lost by best-effort subscriptions without notice "
                             "(raise the limit: python -m cmfiou_ros.transport --help)")

    def _publish_checked(self, pub, msg, what: str) -> None:
        """Publish ``msg`` serialized once, warning (counted) when it is above the transport limit."""
        from rclpy.serialization import serialize_message

        data = serialize_message(msg)
        limit, desc = self._size_limit()
        if len(data) > limit:
            self.oversize_outputs += 1
            self.warn(pub.topic_name, f"published {what} of {len(data) / 2**20:.1f} MiB > {desc}: subscribers with "
                                      "best-effort QoS may not receive it, without notice")
        pub.publish(data)

    def _check_frame_id(self, topic: str, frame_id: str, expected: str, param: str, what: str) -> None:
        if not frame_id:
            self.warn(topic, f"header.frame_id is empty (set the driver's frame_id; {what})")
        elif expected and frame_id != expected:
            self.warn(topic, f"frame_id {frame_id!r} != {param} {expected!r} ({what})")

    def _check_future(self, stamp: int) -> None:
        """Inputs stamped more than ``future_tolerance`` ahead of the node's clock are rejected (counted). Skipped while
        the clock reads 0 (sim time before the first /clock)."""
        tol = self.params["future_tolerance"]
        if tol <= 0:
            return
        now = self.get_clock().now().nanoseconds
        if now > 0 and stamp - now > tol * 1e9:
            self.future_stamped += 1
            raise C.MessageError(f"header.stamp is {(stamp - now) * 1e-9:.3f} s ahead of the node's clock "
                                 f"(future_tolerance {tol:g} s): rejected")

    def _after_input(self, assembled) -> None:
        for a in assembled:
            self._submit(a)
        t = self._wait_timer
        if t is not None and t.is_canceled() and self.assembler.waiting():
            t.reset()

    def _poll_policy(self) -> None:
        for a in self.assembler.poll(time.monotonic_ns()):
            self._submit(a)
        t = self._wait_timer
        if t is not None and not self.assembler.waiting():
            t.cancel()

    def _log_lidar_only(self, reason: str) -> None:
        """LiDAR-only frames are logged: at once when the reason changes, else once per warn_throttle s."""
        import re

        now = time.monotonic()
        kind = re.sub(r"[-+]?\d[\d.e+-]*", "#", reason)  # "older by 0.1 s" and "by 0.2 s" are one reason
        if kind != self._lidar_only_kind or not self.last_lidar_only or \
                now - self._lidar_only_logged >= self.params["warn_throttle"]:
            self._lidar_only_logged, self._lidar_only_kind = now, kind
            self.warn.logger.warning(f"LiDAR-only frame ({self.lidar_only_frames} so far): {reason}")

    def _submit(self, a: Assembled) -> None:
        """An assembled frame: count camera / LiDAR-only frames and hand it to the worker (newest wins)."""
        if a.frame.image is None:
            self.lidar_only_frames += 1
            self._log_lidar_only(a.reason)  # before the last_* fields change: it compares with the previous frame
            self.last_lidar_only = True
            self.last_lidar_only_reason = a.reason
        else:
            self.camera_frames += 1
            self.last_lidar_only = False
            self.last_image_age_ms = a.image_age_ms
        self.worker.submit((a.frame, a.pairing.lidar[0], a.pairing.lidar[2], a.reason))

    # ------------------------------------------------------------------------------------------ worker
    def _start_worker(self) -> None:
        self.worker.start()

    def _stop_worker(self) -> None:
        self.worker.stop()

    def process(self, frame: Frame, header, t_arrival: float, lidar_only_reason: str = "") -> Detections:
        """Run the pipeline on one frame and publish everything (called by the worker; callable in tests).

        Every frame gets its outputs: when nothing could be detected (no valid point, no point in range, inference
        failed) they are empty and ``DetectionScores.empty_reason`` says why (also warned and counted)."""
        t0 = time.perf_counter()
        empty_reason = ""
        try:
            if len(frame.points) == 0:
                det = Detections.empty(frame.stamp_ns, frame.frame_id, lidar_only=frame.image is None,
                                       score_mode=getattr(self.pipeline, "score_mode", "cls"),
                                       note="the cloud has no valid point")
                empty_reason = det.note
            else:
                det = self.pipeline(frame)
                if len(det) == 0 and getattr(det, "note", ""):
                    empty_reason = det.note
                    self.undetectable_frames += 1
                    self.warn(self._lidar_topic, f"frame stamped {frame.stamp_ns}: {det.note}: publishing empty "
                                                 "detections")
                elif frame.image is not None and det.lidar_only and getattr(det, "note", ""):
                    lidar_only_reason = det.note  # the pipeline could not use the image (e.g. too small)
                    self.warn(self._image_topic, f"frame stamped {frame.stamp_ns}: {det.note}")
            det.lidar_only = bool(det.lidar_only or frame.image is None)
            det = filter_detections(det, self.params["score_threshold"])
        except Exception as e:  # noqa: BLE001 - a failing frame must not stop the node, and still gets its outputs
            self.pipeline_errors += 1
            self._pipeline_errors_window += 1
            self.last_pipeline_error = f"{type(e).__name__}: {e}"
            self.warn("pipeline", f"inference failed on the frame stamped {frame.stamp_ns}: {self.last_pipeline_error}"
                                  ": publishing empty detections")
            empty_reason = f"inference failed: {self.last_pipeline_error}"
            det = Detections.empty(frame.stamp_ns, frame.frame_id, lidar_only=frame.image is None,
                                   score_mode=getattr(self.pipeline, "score_mode", "cls"))
        if empty_reason:
            self.empty_outputs += 1
            self.last_empty_reason = empty_reason
        proc_ms = (time.perf_counter() - t0) * 1e3
        try:
            self.publish_outputs(det, header, t_arrival, proc_ms, lidar_only_reason if det.lidar_only else "",
                                 empty_reason)
        except Exception as e:  # noqa: BLE001 - e.g. context shut down while publishing
            if not self.context.ok():  # Ctrl-C / SIGTERM during inference: counted, reported at exit
                self.unpublished_at_shutdown += 1
            else:
                self.warn("publish", f"{type(e).__name__}: {e}")
            return det
        return det

    def publish_outputs(self, det: Detections, header, t_arrival: float, proc_ms: float, lidar_only_reason: str = "",
                        empty_reason: str = "") -> None:
        n = f"Detection3DArray ({len(det)} detections)"
        self._publish_checked(self.det_pub, C.detections_to_detection3d_array(det, header), n)
        scores = C.detections_to_scores_msg(det, header)
        scores.lidar_only_reason = lidar_only_reason
        scores.empty_reason = empty_reason
        self._publish_checked(self.scores_pub, scores, "DetectionScores")
        # RViz markers cost ~14 ms per frame of 50 boxes in Python (bench/bench_node_cost.py): built only while
        # someone subscribes
        if self.markers_pub is not None and self.markers_pub.get_subscription_count() > 0:
            self._publish_checked(self.markers_pub, C.detections_to_markers(det, header), "MarkerArray")
        now_ns = self.get_clock().now().nanoseconds
        age_ms = (now_ns - C.stamp_to_ns(header.stamp)) * 1e-6
        total_ms = (time.monotonic() - t_arrival) * 1e3
        if self.timings_pub is not None:
            dropped = self.worker.take_dropped()
            self.timings_pub.publish(C.timings_to_msg(det.timings_ms, header, total_ms, age_ms, dropped))
        self.processing_ms.add(proc_ms)
        self.latency_ms.add(age_ms)
        self.frames_out += 1
        self.rates["output"].tick()

    # ------------------------------------------------------------------------------------------ diagnostics
    def diagnostics_statuses(self) -> list:
        return D.detector_statuses(self)

    def publish_diagnostics(self) -> None:
        if not self.context.ok():  # a timer that fired as SIGINT/SIGTERM shut the context down: nothing to report to
            return
        try:
            self.diag_pub.publish(D.array_msg(self.diagnostics_statuses(), self.get_clock().now().to_msg()))
        except Exception as e:  # noqa: BLE001
            if self.context.ok():  # else the same race, between the check and the publish
                self.warn("diagnostics", f"{type(e).__name__}: {e}")


def main(argv=None) -> int:
    from rclpy.executors import SingleThreadedExecutor

    from cmfiou_ros.params import DETECTOR_PARAMS
    from .shutdown import finish, spinning, start_node

    latch = start_node("detector_node", __doc__, DETECTOR_PARAMS, argv)
    if latch is None:  # --help
        return 0
    node = DetectorNode()
    rc = 0
    try:
        with spinning(NODE_NAME):
            stopped = False
            if node.params.get("autostart", True):
                if not node.param_error:
                    node.load_pipeline()  # outside the transition: a signal meanwhile is a clean exit (below)
                if latch.received:  # SIGINT/SIGTERM during the load / warm-up: the context is down, exit cleanly
                    stopped = True
                    rclpy.logging.get_logger(f"{node.get_name()}.shutdown").info(
                        f"{latch.name} during start-up (parameters, pipeline load / warm-up): not configured")
                elif node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                    node.get_logger().fatal("configure failed: exiting")
                    return 2
                else:
                    node.trigger_activate()
            if not stopped:
                # one thread: the callbacks are short (conversion); a MultiThreadedExecutor's wait loop spins while
                # a dispatched callback waits for the GIL held by inference (69% of a core at 10 Hz) and slows the
                # inference thread down
                ex = SingleThreadedExecutor()
                ex.add_node(node)
                ex.spin()
    finally:
        waiting = node._slot is not None  # a frame queued for inference, discarded by the teardown
        abandoned = 0
        worker = getattr(node, "worker", None)
        if latch.received and worker is not None and worker.thread is not None:
            # a signal: the frame in flight gets SHUTDOWN_GRACE_S to finish (launch escalates to SIGTERM after 5 s,
            # run_graph after 10 s, then SIGKILL); a CPU frame can take longer, and a torch op cannot be interrupted
            t = worker.thread
            worker.stop(timeout=SHUTDOWN_GRACE_S)
            abandoned = int(t.is_alive())
        node._teardown()  # joins the inference thread: the in-flight frame finishes (published, or not: counted)
        # a logger of its own: the node's logger would try /rosout through the context that is already down
        logger = rclpy.logging.get_logger(f"{node.get_name()}.shutdown")
        node.destroy_node()
        if latch.received:
            lost = int(waiting) + node.unpublished_at_shutdown + abandoned
            logger.info(f"shutdown ({latch.name}): {node.frames_in} frames in, {node.frames_out} published, "
                        f"{node.frames_dropped + lost} dropped ({lost} at shutdown: "
                        f"{node.unpublished_at_shutdown + abandoned} in flight when the context went down"
                        + (f", {abandoned} still inferring after {SHUTDOWN_GRACE_S:g} s" if abandoned else "")
                        + f", {int(waiting)} queued)")
        if rclpy.ok():
            rclpy.shutdown()
    return finish(latch, rc)  # after a signal: os._exit (no finalization; an abandoned inference thread is fine)


if __name__ == "__main__":
    raise SystemExit(main())
