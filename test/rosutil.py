"""Helpers shared by the ROS-layer tests: importing ROS modules (:func:`require`), child ROS processes
(:func:`child_ros_env`, :func:`run_children`), a detector node in a child process with a client node here
(:class:`DetectorProcess`), in-process node construction, KITTI messages, waiting."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest

TEST_DIR = Path(__file__).resolve().parent
REPO = TEST_DIR.parent
FASTDDS_PROFILE = REPO / "config" / "fastdds_shm.xml"


def require(module: str):
    """Import a ROS module a test needs. Missing: the test (or, at module level, the file) is skipped -- unless
    ``CMFIOU_REQUIRE_ROS`` is set (``scripts/test.sh`` sets it once ``setup.sh`` has installed ROS), where a missing
    module is a failure, never a silent skip."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(f"{module} is not importable ({exc})")


def missing(what: str) -> None:
    """Something ``scripts/setup.sh`` installs is missing: skip (the file, at module level) -- or fail under
    ``CMFIOU_REQUIRE_ROS``."""
    if os.environ.get("CMFIOU_REQUIRE_ROS"):
        pytest.fail(f"{what} but CMFIOU_REQUIRE_ROS is set: run scripts/setup.sh and . .venv/cmfiou.env",
                    pytrace=False)
    pytest.skip(f"{what}; run scripts/setup.sh and . .venv/cmfiou.env", allow_module_level=True)
# The pipeline the ROS tests run (module:callable), overridable from the environment.
PIPELINE_FACTORY = os.environ.get("CMFIOU_TEST_PIPELINE_FACTORY",
                                  "cmfiou_core.pipeline:Pipeline.from_config")
PIPELINE_CONFIG = os.environ.get("CMFIOU_TEST_PIPELINE_CONFIG", str(REPO / "config" / "cmfiou_kitti.yaml"))
PIPELINE_CHECKPOINT = os.environ.get("CMFIOU_TEST_PIPELINE_CHECKPOINT", "")

_domain_lock = threading.Lock()
_domain_next = [0]


def fresh_domain() -> int:
    """A ROS_DOMAIN_ID unlikely to collide with other test processes running at the same time (1..101 avoided)."""
    with _domain_lock:
        _domain_next[0] += 1
        return 110 + (os.getpid() * 7 + _domain_next[0]) % 100


def child_ros_env(domain_id: int = None) -> dict:
    """Environment for a child ROS process: a private domain, the project's Fast DDS SHM profile, localhost
    discovery, the repository importable, unbuffered output."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(fresh_domain() if domain_id is None else domain_id)
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(FASTDDS_PROFILE)
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Python source for the children of :func:`run_children`: a child script starts with CHILD_EXCHANGE, defines
# ``TOPICS`` = {key: (message type, topic)} and calls ``publish_once`` or ``receive``.
CHILD_EXCHANGE = r'''
import json, sys, time
import rclpy
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                 durability=DurabilityPolicy.TRANSIENT_LOCAL)


def publish_once(node_name, msgs):
    """Publish each of ``msgs`` ({key: message}) once on TOPICS[key] when every publisher has matched a subscriber
    (discovery is bimodal, ~0.1 s or ~3 s), then stay until the receivers have left (they exit once they have
    everything), so TRANSIENT_LOCAL can serve late joiners. -> seconds until the match."""
    rclpy.init()
    node = rclpy.create_node(node_name)
    pubs = {k: node.create_publisher(t, name, QOS) for k, (t, name) in TOPICS.items()}
    t0 = time.monotonic()
    while any(p.get_subscription_count() == 0 for p in pubs.values()):
        if time.monotonic() - t0 > 30.0:
            raise SystemExit("no subscriber matched within 30 s")
        rclpy.spin_once(node, timeout_sec=0.02)
    discovery_s = time.monotonic() - t0
    for key, msg in msgs.items():
        pubs[key].publish(msg)
    t1 = time.monotonic()
    while any(p.get_subscription_count() > 0 for p in pubs.values()) and time.monotonic() - t1 < 60.0:
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.shutdown()
    return discovery_s


def receive(node_name, inspect=lambda node: None):
    """The first message on every TOPICS entry, within 60 s (else SystemExit naming what came).
    -> (messages by key, seconds until the last one, ``inspect(node)`` evaluated before the node goes)."""
    got = {}
    rclpy.init()
    node = rclpy.create_node(node_name)
    def keep(key):  # one-argument callback (rclpy passes MessageInfo to two-argument callables)
        return lambda msg: got.setdefault(key, msg)
    subs = [node.create_subscription(t, name, keep(k), QOS) for k, (t, name) in TOPICS.items()]
    t0 = time.monotonic()
    while len(got) < len(TOPICS) and time.monotonic() - t0 < 60.0:
        rclpy.spin_once(node, timeout_sec=0.05)
    elapsed = time.monotonic() - t0
    extra = inspect(node)
    node.destroy_node()
    rclpy.shutdown()
    if len(got) < len(TOPICS):
        raise SystemExit(f"received only {sorted(got)} within 60 s")
    return got, elapsed, extra
'''


def run_children(scripts: Dict[str, str], args: Sequence[str], timeout: float = 90.0) -> Dict[str, dict]:
    """Start one ``python -c script args`` child per entry (in order, one shared private domain), wait for all;
    return the JSON each printed on its last ``{``-line. A child that times out, exits non-zero or prints no result
    fails the test with its output."""
    env = child_ros_env()
    procs = {name: subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, script in scripts.items()}
    results = {}
    try:
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"{name} timed out after {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
            if proc.returncode != 0:
                pytest.fail(f"{name} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}")
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            assert lines, f"{name} printed no result\nstdout:\n{out}\nstderr:\n{err}"
            results[name] = json.loads(lines[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


class DetectorProcess:
    """The real detector node in a child process (``python -m cmfiou_ros.detector_node --ros-args -p ...``, on a
    private domain, output captured) and a client node of this process on the same domain: its executor, reliable
    publishers on the detector's input topics (:meth:`publisher`), and the detections and scores the detector
    published, each by header stamp (ns). :meth:`close` stops both and returns the child's output."""

    CAMERA_TOPICS = {"info": "/kitti/camera_color_left/camera_info", "image": "/kitti/camera_color_left/image_raw",
                     "cloud": "/kitti/velo/pointcloud"}

    def __init__(self, client_name: str, params: Sequence[str]):
        rclpy = importlib.import_module("rclpy")
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from vision_msgs.msg import Detection3DArray

        from cmfiou_ros import convert as C
        from cmfiou_ros.msg import DetectionScores
        from cmfiou_ros.run_graph import child_env

        self._rclpy = rclpy
        domain = fresh_domain()
        self.proc = subprocess.Popen([sys.executable, "-m", "cmfiou_ros.detector_node", "--ros-args",
                                      *[a for p in params for a in ("-p", p)]],
                                     env=child_env({"ROS_DOMAIN_ID": str(domain)}), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain)
        self.node = rclpy.create_node(client_name, context=self.ctx)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.node)
        self.reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.latched = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                                  durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub = {}
        for key, typ in (("info", CameraInfo), ("image", Image), ("cloud", PointCloud2)):
            self.publisher(key, typ, self.CAMERA_TOPICS[key])
        self.dets, self.scores = {}, {}
        self.node.create_subscription(Detection3DArray, "/cmfiou_detector/detections",
                                      lambda m: self.dets.__setitem__(C.stamp_to_ns(m.header.stamp), m),
                                      self.reliable)
        self.node.create_subscription(DetectionScores, "/cmfiou_detector/scores",
                                      lambda m: self.scores.__setitem__(C.stamp_to_ns(m.header.stamp), m),
                                      self.reliable)
        self.log = None

    def publisher(self, key: str, typ, topic: str, qos=None):
        """A publisher of this client, kept as ``self.pub[key]`` (reliable, depth 10, unless ``qos`` is given)."""
        self.pub[key] = self.node.create_publisher(typ, topic, self.reliable if qos is None else qos)
        return self.pub[key]

    def spin(self, timeout: float) -> None:
        self.ex.spin_once(timeout_sec=timeout)

    def wait(self, pred, timeout: float) -> bool:
        """:func:`wait_until` spinning this client (``wait(lambda: False, t)`` spins for t seconds)."""
        return wait_until(pred, timeout, spin=self.spin)

    def output(self, stamp: int, timeout: float = 20.0):
        """Wait until both the detections and the scores of ``stamp`` arrived (fails the test otherwise)."""
        assert self.wait(lambda: stamp in self.dets and stamp in self.scores, timeout), f"no output for {stamp}"
        return stamp

    def close(self) -> str:
        """Stop the child (SIGTERM; SIGKILL after 20 s) and the client; -> the child's output."""
        self.proc.terminate()
        try:
            self.log = self.proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.log = self.proc.communicate()[0]
        self.ex.shutdown()
        self.node.destroy_node()
        self._rclpy.shutdown(context=self.ctx)
        return self.log


def wait_until(pred, timeout: float, step: float = 0.02, spin=None) -> bool:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if spin is not None:
            spin(step)
        if pred():
            return True
        if spin is None:
            time.sleep(step)
    return pred()


def kitti_frame_msgs(kitti_samples, k: int, stamp_ns: int):
    """(cloud, image, camera_info, T 4x4, index) ROS messages of object frame k, all stamped ``stamp_ns``."""
    from cmfiou_ros import convert as C
    from cmfiou_ros.replay_node import KittiSource

    src = KittiSource(str(kitti_samples / "object"))
    idx, pts, rgb, calib = src.load(k % len(src))
    T = np.eye(4)
    T[:3] = calib.Tr_velo_to_cam
    return (C.xyzi_to_pointcloud2(pts, stamp_ns, "velo_link"), C.rgb_to_image(rgb, stamp_ns, "cam"),
            C.calibration_to_camera_info(calib, stamp_ns, "cam"), T, idx)


def make_detector(ctx, pipeline=None, **params):
    """An in-process DetectorNode (configured + active) with a given pipeline object and parameter overrides."""
    from rclpy.parameter import Parameter

    from cmfiou_ros.detector_node import DetectorNode

    overrides = [Parameter(k, value=v) for k, v in params.items()]
    node = DetectorNode(pipeline=pipeline, context=ctx, parameter_overrides=overrides)
    return node
