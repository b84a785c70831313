"""Helpers shared by the ROS-layer tests (in-process node construction, KITTI messages, waiting)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

TEST_DIR = Path(__file__).resolve().parent
# The pipeline the ROS tests run (module:callable), overridable from the environment.
PIPELINE_FACTORY = os.environ.get("CMFIOU_TEST_PIPELINE_FACTORY",
                                  "cmfiou_core.pipeline:Pipeline.from_config")
PIPELINE_CONFIG = os.environ.get("CMFIOU_TEST_PIPELINE_CONFIG", str(TEST_DIR.parent / "config" / "cmfiou_kitti.yaml"))
PIPELINE_CHECKPOINT = os.environ.get("CMFIOU_TEST_PIPELINE_CHECKPOINT", "")

_domain_lock = threading.Lock()
_domain_next = [0]


def fresh_domain() -> int:
    """A ROS_DOMAIN_ID unlikely to collide with other test processes running at the same time (1..101 avoided)."""
    with _domain_lock:
        _domain_next[0] += 1
        return 110 + (os.getpid() * 7 + _domain_next[0]) % 100


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
