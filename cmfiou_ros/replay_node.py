"""KITTI replay node: publishes a KITTI object folder, a KITTI raw drive, or generated scenes (object layout) as
PointCloud2 (x, y, z, intensity float32) + Image rgb8 + CameraInfo + the LiDAR->camera extrinsic, at ``rate`` Hz.

- One stamp per frame for all messages of that frame (wall ROS time, or sim time ``t0 + k / rate`` with
  ``publish_clock``, which also publishes /clock). Publish order per frame: extrinsic, camera_info, image, cloud.
- The extrinsic (camera-optical <- LiDAR, i.e. ``Tr_velo_to_cam``; KITTI object calibration differs per frame) goes
  out as a latched geometry_msgs/TransformStamped on ``extrinsic_topic`` and, when tf2_msgs is importable, on
  /tf_static. CameraInfo carries P = P2, R = R0_rect, so ``Calibration.from_camera_info`` reproduces the KITTI
  calibration exactly.
- ``wait_for_subscribers``: the cloud topic must have that many subscribers (and image, camera_info and extrinsic
  topics at least one each) before playback starts (discovery can take ~3 s); after ``wait_timeout`` it starts anyway. ``frame_map_topic`` (latched std_msgs/String JSON) maps sequence number <-> dataset index <-> stamp so
  outputs can be mapped back for evaluation; ``"done": true`` after the last frame.
- ``lockstep_topic``: publish the next frame only once the detector's output for the previous one arrived (or after
  ``lockstep_timeout``), so evaluation/tests lose no frame whatever the detector's speed; ``rate`` stays the maximum.
- ``output_topic`` (default: ``lockstep_topic``): the detector's Detection3DArray output is followed. A published frame
  whose output never comes (the detector was busy and kept a newer frame, or it failed) is counted as dropped, logged
  with ``print_frames`` (one line per output or drop) and reported in the frame map and the final log line. With
  ``exit_on_end`` the node exits only after the last frame's output arrived (at most ``lockstep_timeout`` s): the
  detector has drained, so ending the graph then loses nothing.

Run: ``python -m cmfiou_ros.replay_node --ros-args --params-file config/replay_node.yaml -p data_dir:=...``.
"""
from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from cmfiou_core.calib import Calibration
from cmfiou_ros import convert as C
from cmfiou_ros.params import REPLAY_PARAMS, ParamError, declare

NODE_NAME = "kitti_replay"
FRAME_MAP_MAX = 5000


@dataclass
class FrameFiles:
    index: str
    velodyne: Path
    image: Optional[Path]
    calib: Optional[Path]  # object layout: per-frame calib file; raw: None (shared calibration)


class KittiSource:
    """Frame listing + loading for the object layout (<root>/<split>/{velodyne,image_2,calib}) and the raw layout
    (<date>/{calib_cam_to_cam,calib_velo_to_cam}.txt + <drive>_sync/{velodyne_points,image_02}/data)."""

    def __init__(self, data_dir: str, dataset: str = "auto", split: str = "training", drive: str = "",
                 frames: Optional[List[str]] = None, max_frames: int = 0):
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir {root} is not a directory")
        self.root = root
        self.shared_calib: Optional[Calibration] = None
        if dataset == "auto":
            dataset = "raw" if (list(root.glob("*_sync")) or root.name.endswith("_sync")) else "object"
        self.dataset = dataset
        if dataset == "object":
            base = root / split if (root / split / "velodyne").is_dir() else root
            if not (base / "velodyne").is_dir():
                raise FileNotFoundError(f"no velodyne/ folder under {root} or {root / split}")
            ids = sorted(p.stem for p in (base / "velodyne").glob("*.bin"))
            files = {i: FrameFiles(i, base / "velodyne" / f"{i}.bin", base / "image_2" / f"{i}.png",
                                   base / "calib" / f"{i}.txt") for i in ids}
        else:
            if root.name.endswith("_sync"):
                drive_dir, date_dir = root, root.parent
            else:
                drives = sorted(root.glob(f"{drive}" if drive else "*_sync"))
                if not drives:
                    raise FileNotFoundError(f"no *_sync drive folder in {root}")
                drive_dir, date_dir = drives[0], root
            self.shared_calib = Calibration.from_kitti_raw_dir(date_dir)
            vdir, idir = drive_dir / "velodyne_points" / "data", drive_dir / "image_02" / "data"
            ids = sorted(p.stem for p in vdir.glob("*.bin"))
            files = {i: FrameFiles(i, vdir / f"{i}.bin", idir / f"{i}.png", None) for i in ids}
        if frames:
            missing = [f for f in frames if f not in files]
            if missing:
                raise FileNotFoundError(f"frames not found in {root}: {', '.join(missing[:5])}")
            ids = list(frames)
        if max_frames > 0:
            ids = ids[:max_frames]
        if not ids:
            raise FileNotFoundError(f"no frames found in {root}")
        self.frames = [files[i] for i in ids]

    def __len__(self) -> int:
        return len(self.frames)

    def load(self, k: int):
        """-> (index, points (N,4) float32, rgb (H,W,3) uint8 or None, Calibration or None)."""
        from PIL import Image as PILImage

        f = self.frames[k]
        pts = np.fromfile(f.velodyne, dtype=np.float32)
        if pts.size % 4:
            raise ValueError(f"{f.velodyne}: size is not a multiple of 4 float32")
        pts = pts.reshape(-1, 4)
        rgb = None
        if f.image is not None and f.image.is_file():
            with PILImage.open(f.image) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        calib = self.shared_calib
        if f.calib is not None and f.calib.is_file():
            calib = Calibration.from_kitti_object_file(f.calib)
        if rgb is not None and calib is not None:
            calib = calib.with_image_size(rgb.shape[1], rgb.shape[0])
        return f.index, pts, rgb, calib


class ReplayNode(Node):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.p = declare(self, REPLAY_PARAMS)
        self.add_on_set_parameters_callback(self._on_set_params)  # publish_image / stop_camera_after at run time
        p = self.p
        if not p["data_dir"]:
            raise ParamError("data_dir is required")
        self.source = KittiSource(p["data_dir"], p["dataset"], p["split"], p["drive"], p["frames"], p["max_frames"])
        from geometry_msgs.msg import TransformStamped
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from std_msgs.msg import String

        rel = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.cloud_pub = self.create_publisher(PointCloud2, p["lidar_topic"], rel)
        self.image_pub = self.create_publisher(Image, p["image_topic"], rel)
        self.info_pub = self.create_publisher(CameraInfo, p["camera_info_topic"], rel)
        self.ext_pub = self.create_publisher(TransformStamped, p["extrinsic_topic"], latched) \
            if p["extrinsic_topic"] else None
        self.map_pub = self.create_publisher(String, p["frame_map_topic"], latched)
        self.tf_pub = None
        try:
            from tf2_msgs.msg import TFMessage

            self.tf_pub = self.create_publisher(TFMessage, "/tf_static", latched)
        except ImportError:
            pass
        self.clock_pub = None
        if p["publish_clock"]:
            from rosgraph_msgs.msg import Clock

            self.clock_pub = self.create_publisher(Clock, "/clock", QoSProfile(depth=10))
        self._awaiting: Optional[int] = None  # lockstep: stamp whose output we wait for
        self._await_t0 = 0.0
        self.lockstep_timeouts = 0
        self.oversize_published = 0  # clouds/images above the transport limit (best-effort subscribers lose them)
        from cmfiou_ros.transport import active_limit

        self.transport = active_limit()
        self._last_tf = None
        self._follow = p["output_topic"] or p["lockstep_topic"]
        self._pending: "OrderedDict[int, tuple]" = OrderedDict()  # stamp -> (seq, index, t_publish): awaiting output
        self.outputs = 0
        self.dropped = 0  # published frames that got no output
        self._drain_until: Optional[float] = None
        if self._follow:
            from vision_msgs.msg import Detection3DArray

            self.create_subscription(Detection3DArray, self._follow, self._on_output,
                                     QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.period_ns = int(round(1e9 / p["rate"]))
        self.seq = 0
        self.cursor = 0
        self.done = False
        self.frame_map: List[list] = []
        self._cache = {}
        self._cacheable = len(self.source) <= 200
        self._started = False
        self._wait_t0 = time.monotonic()
        self._sim_t0_ns = time.time_ns()
        self.timer = self.create_timer(1.0 / p["rate"], self._tick)
        self.get_logger().info(f"replaying {len(self.source)} {self.source.dataset} frames from "
                               f"{self.source.root} at {p['rate']} Hz")

    def _on_set_params(self, params):
        from rcl_interfaces.msg import SetParametersResult

        from cmfiou_ros.params import validate

        new = dict(self.p)
        new.update({q.name: q.value for q in params if q.name in new})
        try:
            checked = validate(REPLAY_PARAMS, new)
        except ParamError as e:
            return SetParametersResult(successful=False, reason=str(e))
        self.p.update({q.name: checked[q.name] for q in params if q.name in checked})
        return SetParametersResult(successful=True)

    def _ready(self) -> bool:
        if self._started:
            return True
        n = self.p["wait_for_subscribers"]
        waited = time.monotonic() - self._wait_t0
        need_cam = n > 0 and self.p["publish_image"]  # camera topics matched too, else frame 0 is LiDAR-only
        cam_pubs = [self.image_pub, self.info_pub] + ([self.ext_pub] if self.ext_pub is not None else [])
        ok = self.cloud_pub.get_subscription_count() >= n and (
            not need_cam or all(pub.get_subscription_count() >= 1 for pub in cam_pubs))
        if not ok and not getattr(self, "_gave_up_waiting", False):
            if waited < self.p["wait_timeout"]:
                return False
            self._gave_up_waiting = True
            self.get_logger().warning(f"only {self.cloud_pub.get_subscription_count()} subscriber(s) after "
                                      f"{waited:.1f} s: starting anyway")
        if self.p["start_delay"] > 0:
            if not hasattr(self, "_delay_t0"):
                self._delay_t0 = time.monotonic()
            if time.monotonic() - self._delay_t0 < self.p["start_delay"]:
                return False
        self._started = True
        self._sim_t0_ns = time.time_ns()
        return True

    def _load(self, k: int):
        if k in self._cache:
            return self._cache[k]
        index, pts, rgb, calib = self.source.load(k)
        cloud = C.xyzi_to_pointcloud2(pts, 0, self.p["lidar_frame"])
        img = info = None
        if rgb is not None:
            img = C.rgb_to_image(rgb, 0, self.p["camera_frame"])
            if calib is not None:
                info = C.calibration_to_camera_info(calib, 0, self.p["camera_frame"])
        T = None
        if calib is not None:
            T = np.eye(4)
            T[:3] = calib.Tr_velo_to_cam
        item = (index, cloud, img, info, T)
        if self._cacheable:
            self._cache[k] = item
        return item

    def _on_output(self, msg) -> None:
        stamp = C.stamp_to_ns(msg.header.stamp)
        if self._awaiting is not None and stamp == self._awaiting:
            self._awaiting = None
        if stamp not in self._pending:
            return  # not ours (another publisher) or already counted
        # the detector works in order: a frame published before this one that got no output was dropped
        for s in [s for s in self._pending if s < stamp]:
            self._count_drop(s, "dropped by the detector (no output: it kept a newer frame)")
        seq, index, t_pub = self._pending.pop(stamp)
        self.outputs += 1
        if self.p["print_frames"]:
            self.get_logger().info(f"frame {seq + 1} ({index}): {self._describe_output(msg)}; output "
                                   f"{time.monotonic() - t_pub:.2f} s after publish")

    def _count_drop(self, stamp: int, why: str) -> None:
        seq, index, _ = self._pending.pop(stamp)
        self.dropped += 1
        if self.p["print_frames"]:
            self.get_logger().warning(f"frame {seq + 1} ({index}): {why}")

    @staticmethod
    def _describe_output(msg) -> str:
        dets = list(msg.detections)
        if not dets:
            return "0 detections"
        items = []
        for d in dets[:4]:
            h = d.results[0].hypothesis if len(d.results) else None
            c = d.bbox.center.position
            name, score = (h.class_id, h.score) if h is not None else ("?", float("nan"))
            items.append(f"{name} {score:.2f} @ {math.hypot(c.x, c.y):.1f} m")
        more = f", +{len(dets) - 4} more" if len(dets) > 4 else ""
        return f"{len(dets)} detection{'s' if len(dets) != 1 else ''}: " + ", ".join(items) + more

    def _tick(self) -> None:
        if self.done or not self._ready():
            return
        p = self.p
        if self._awaiting is not None:  # lockstep: the detector has not answered the previous frame yet
            if time.monotonic() - self._await_t0 < p["lockstep_timeout"]:
                return
            self.lockstep_timeouts += 1
            self.get_logger().warning(f"lockstep: no output for stamp {self._awaiting} after "
                                      f"{p['lockstep_timeout']} s: moving on")
            self._awaiting = None
        if self.cursor >= len(self.source):
            if not p["loop"]:
                self._finish()
                return
            self.cursor = 0
        try:
            index, cloud, img, info, T = self._load(self.cursor)
        except Exception as e:  # noqa: BLE001 - a broken file is skipped with a warning
            self.get_logger().warning(f"frame {self.source.frames[self.cursor].index}: {type(e).__name__}: {e}")
            self.cursor += 1
            return
        if self.clock_pub is not None:
            from rosgraph_msgs.msg import Clock

            stamp_ns = self._sim_t0_ns + self.seq * self.period_ns
            self.clock_pub.publish(Clock(clock=C.ns_to_stamp(stamp_ns)))
        else:
            stamp_ns = self.get_clock().now().nanoseconds
        stamp = C.ns_to_stamp(stamp_ns)
        camera_on = p["publish_image"] and (p["stop_camera_after"] < 0 or self.seq < p["stop_camera_after"])
        if T is not None:
            tf = C.matrix_to_transform_msg(T, stamp_ns, p["camera_frame"], p["lidar_frame"])
            if self.ext_pub is not None:
                self.ext_pub.publish(tf)
            if self.tf_pub is not None and (self._last_tf is None or not np.array_equal(self._last_tf, T)):
                from tf2_msgs.msg import TFMessage

                self.tf_pub.publish(TFMessage(transforms=[tf]))  # latched; re-sent when the calibration changes
                self._last_tf = T
        if camera_on and img is not None:
            if info is not None:
                info.header.stamp = stamp
                self.info_pub.publish(info)
            img.header.stamp = stamp
            self._check_size(self.image_pub, img)
            self.image_pub.publish(img)
        cloud.header.stamp = stamp
        if p["lockstep_topic"]:
            self._awaiting, self._await_t0 = stamp_ns, time.monotonic()
        if self._follow:
            self._pending[stamp_ns] = (self.seq, index, time.monotonic())
            while len(self._pending) > FRAME_MAP_MAX:  # nobody answers (loop without a detector): bounded
                self._count_drop(next(iter(self._pending)), "no output")
        self._check_size(self.cloud_pub, cloud)
        self.cloud_pub.publish(cloud)
        self.frame_map.append([self.seq, index, stamp_ns, bool(camera_on and img is not None)])
        del self.frame_map[: max(0, len(self.frame_map) - FRAME_MAP_MAX)]
        self.seq += 1
        self.cursor += 1
        self._publish_map()

    def _publish_map(self) -> None:
        from std_msgs.msg import String

        doc = {"source": str(self.source.root), "dataset": self.source.dataset, "rate": self.p["rate"],
               "n_frames": len(self.source), "published": self.seq, "done": self.done,
               "lockstep_timeouts": self.lockstep_timeouts, "outputs": self.outputs, "dropped": self.dropped,
               "columns": ["seq", "index", "stamp_ns", "camera"], "frames": self.frame_map}
        self.map_pub.publish(String(data=json.dumps(doc)))

    def _check_size(self, pub, msg) -> None:
        """A message above the transport limit is lost by best-effort subscribers (the detector's sensor QoS)
        without notice on their side: say so here (counted; logged at most every 5 s)."""
        limit = self.transport.warn_bytes()
        if len(msg.data) > limit:
            self.oversize_published += 1
            self.get_logger().warning(
                f"[{pub.topic_name}] message of {len(msg.data) / 2**20:.1f} MiB > {self.transport.describe()}: "
                f"best-effort subscribers will likely not receive it ({self.oversize_published} so far; raise the "
                "limit: python -m cmfiou_ros.transport --help)", throttle_duration_sec=5.0)

    def _finish(self) -> None:
        self.done = True
        self._publish_map()
        if not self.p["exit_on_end"]:
            self.get_logger().info(f"replay finished: {self._counts()}")
        else:  # exit once the detector has answered the last frame (drained), at most lockstep_timeout from now
            self._drain_until = time.monotonic() + self.p["lockstep_timeout"]

    def _counts(self) -> str:
        s = f"{self.seq} frames published"
        if self._follow:
            s += f", {self.outputs} outputs, {self.dropped} dropped (no output)"
        return s

    def should_exit(self) -> bool:
        """exit_on_end: True 1 s (the latched frame map reaching late subscribers) after the last output arrived."""
        if self._drain_until is not None and getattr(self, "_exit_at", None) is None:
            if self._pending and time.monotonic() < self._drain_until:
                return False
            for s in list(self._pending):
                self._count_drop(s, f"no output within lockstep_timeout {self.p['lockstep_timeout']} s of the end")
            self._publish_map()
            self.get_logger().info(f"replay finished: {self._counts()}")
            self._exit_at = time.monotonic() + 1.0
        return getattr(self, "_exit_at", None) is not None and time.monotonic() >= self._exit_at


def main(argv=None) -> int:
    from rclpy.executors import SingleThreadedExecutor

    from .shutdown import finish, spinning, start_node

    latch = start_node("kitti_replay_node", __doc__, REPLAY_PARAMS, argv)
    if latch is None:  # --help
        return 0
    try:
        node = ReplayNode()
    except (ParamError, FileNotFoundError, ValueError) as e:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(e))
        rclpy.shutdown()
        return 2
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    try:
        with spinning(NODE_NAME):
            while rclpy.ok() and not node.should_exit():
                ex.spin_once(timeout_sec=0.05)
    finally:
        ex.shutdown()
        # a logger of its own: the node's logger would try /rosout through the context that is already down
        logger = rclpy.logging.get_logger(f"{node.get_name()}.shutdown")
        node.destroy_node()
        if latch.received:
            logger.info(f"shutdown ({latch.name}): {node._counts()}")
        if rclpy.ok():
            rclpy.shutdown()
    return finish(latch, 0)  # after a signal: os._exit (a second signal during finalization would kill us)


if __name__ == "__main__":
    raise SystemExit(main())
