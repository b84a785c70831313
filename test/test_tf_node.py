"""Cross-process: the real detector node (subprocess, real rclpy, use_tf on, no extrinsic_topic, no lidar_to_camera)
takes each frame's LiDAR->camera extrinsic from TF published by another process on /tf_static and /tf
(tf2_msgs/TFMessage). A recording pipeline (tiny_pipeline.ExtrinsicEcho) echoes the extrinsic each frame was fused
with; the expected one is composed independently (scipy rotations, 4x4 matrices, scipy Slerp for /tf between two
stamps). A cloud or camera frame_id TF cannot connect, and an image stamp TF has no data for, give a warning naming
the frame, a count in /diagnostics, and a published LiDAR-only output for that frame with the reason.

Uses tf2_ros where installed (the node's first choice), else the node's own buffer (cmfiou_ros.tf_buffer)."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)
require("rclpy")
require("vision_msgs.msg")
require("cmfiou_ros.msg")
require("tf2_msgs.msg")
from scipy.spatial.transform import Rotation, Slerp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rosutil import DetectorProcess  # noqa: E402
from test_tf_buffer import LINKS, chain, tf_msg  # noqa: E402

from cmfiou_core.calib import Calibration  # noqa: E402
from cmfiou_ros import convert as C  # noqa: E402

S = 1_000_000_000
W, H = 64, 48
LIDAR_TOPIC, INFO_TOPIC = "/kitti/velo/pointcloud", "/kitti/camera_color_left/camera_info"
R0, R1 = Rotation.from_euler("xyz", [0.05, -0.1, 0.2]), Rotation.from_euler("xyz", [-0.1, 0.15, 0.9])
P0, P1 = np.array([1.0, 0.2, 1.6]), np.array([1.4, -0.3, 1.9])


def echoed(det) -> np.ndarray:
    """The 3x4 extrinsic ExtrinsicEcho put into the detections' centres."""
    assert len(det.detections) == 4, len(det.detections)
    cols = [[d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.center.position.z] for d in det.detections]
    return np.asarray(cols, np.float64).T


@pytest.fixture(scope="module")
def run():
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from tf2_msgs.msg import TFMessage

    factory = f"{Path(__file__).resolve().parent / 'tiny_pipeline.py'}:ExtrinsicEcho.from_config"
    dp = DetectorProcess("tf_publisher", [f"pipeline_factory:={factory}", "warmup:=false", "use_tf:=true",
                                          "warn_throttle:=0.0", "diagnostics_period:=0.3"])
    static_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pub = dp.pub
    dp.publisher("tf_static", TFMessage, "/tf_static", static_qos)
    dp.publisher("tf", TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    dets, scores, diag = dp.dets, dp.scores, {}

    def on_diag(m):
        for s in m.status:
            if s.name.endswith(": sync"):
                diag.clear()
                diag.update({kv.key: kv.value for kv in s.values})
    dp.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, dp.reliable)
    pts = np.random.default_rng(0).uniform([2, -5, -1, 0], [30, 5, 1, 1], (64, 4)).astype(np.float32)
    rgb = np.full((H, W, 3), 90, np.uint8)
    calib = Calibration(np.array([[50.0, 0, W / 2, 0], [0, 50.0, H / 2, 0], [0, 0, 1, 0]]), np.eye(3),
                        np.eye(4)[:3], W, H)
    t0 = time.time_ns() - 300 * S  # in the past of the node's clock
    state = {"stamp": t0}

    def frame(lidar_frame="velo_link", camera_frame="cam_optical", stamp=None):
        if stamp is None:
            state["stamp"] += S // 10
            stamp = state["stamp"]
        pub["info"].publish(C.calibration_to_camera_info(calib, stamp, camera_frame))
        pub["image"].publish(C.rgb_to_image(rgb, stamp, camera_frame))
        pub["cloud"].publish(C.xyzi_to_pointcloud2(pts, stamp, lidar_frame))
        return dp.output(stamp)

    def until_fused(**kw):
        """Frames until one is fused (TF still on its way for the first ones): -> its stamp."""
        for _ in range(20):
            s = frame(**kw)
            if not scores[s].lidar_only:
                return s
            dp.wait(lambda: False, 0.3)
        raise AssertionError(f"never fused: {scores[s].lidar_only_reason}")

    out = {"dets": dets, "scores": scores}
    try:
        assert dp.wait(lambda: dp.node.count_subscribers(LIDAR_TOPIC) >= 1 and
                       dp.node.count_subscribers("/tf_static") >= 1 and dp.node.count_subscribers("/tf") >= 1 and
                       dp.node.count_publishers("/cmfiou_detector/scores") >= 1, 60), "detector did not come up"
        stamp5 = 5 * S
        pub["tf_static"].publish(TFMessage(transforms=[tf_msg(parent, child, stamp5, xyz, q)
                                                       for child, (parent, xyz, q) in LINKS.items()]))
        dp.wait(lambda: False, 1.0)  # discovery of the camera topics
        out["static"] = until_fused()
        out["unknown_lidar"] = frame(lidar_frame="velo_typo")
        out["unknown_camera"] = frame(camera_frame="cam_nowhere")
        ta, tb = state["stamp"] + S, state["stamp"] + 2 * S
        pub["tf"].publish(TFMessage(transforms=[tf_msg("base_link", "velo_dyn", ta, P0, R0.as_quat()),
                                                tf_msg("base_link", "velo_dyn", tb, P1, R1.as_quat())]))
        out["dynamic"] = None
        for k in range(20):  # frames a quarter of the way between the two /tf stamps (+ k ns)
            s = frame(lidar_frame="velo_dyn", stamp=ta + S // 4 + k)
            if not scores[s].lidar_only:
                out["dynamic"] = s
                break
            dp.wait(lambda: False, 0.3)
        out["extrapolated"] = frame(lidar_frame="velo_dyn", stamp=tb + 5 * S)
        dp.wait(lambda: int(diag.get("tf_unavailable_frames", 0)) >= 3, 5)
        out["diag"] = dict(diag)
    finally:
        out["log"] = dp.close()
    return out


def test_extrinsic_from_static_tf_chain(run):
    want = (np.linalg.inv(chain("cam_optical")) @ chain("velo_link"))[:3]
    np.testing.assert_allclose(echoed(run["dets"][run["static"]]), want, atol=2e-6)  # float32 detections
    assert "tf=" in run["log"] and "tf=off" not in run["log"]


def test_extrinsic_from_dynamic_tf_is_interpolated_at_the_image_stamp(run):
    assert run["dynamic"] is not None, "no dynamic-TF frame was fused"
    u = 0.25  # the frame's stamp is ta + 1/4 s (+ a few ns)
    det = run["dets"][run["dynamic"]]
    link = np.eye(4)
    link[:3, :3] = Slerp([0.0, 1.0], Rotation.concatenate([R0, R1]))([u]).as_matrix()[0]
    link[:3, 3] = P0 + u * (P1 - P0)
    want = (np.linalg.inv(chain("cam_optical")) @ link)[:3]
    np.testing.assert_allclose(echoed(det), want, atol=1e-5)


@pytest.mark.parametrize("case,frame,topic", [("unknown_lidar", "velo_typo", LIDAR_TOPIC),
                                              ("unknown_camera", "cam_nowhere", INFO_TOPIC)])
def test_frame_id_without_tf_path_is_warned_counted_and_published_lidar_only(run, case, frame, topic):
    stamp = run[case]
    sc = run["scores"][stamp]
    assert len(run["dets"][stamp].detections) == 0 and sc.lidar_only
    assert f"{frame!r} is not in TF" in sc.lidar_only_reason, sc.lidar_only_reason
    assert f"[{topic}] no TF path from LiDAR frame" in run["log"] and f"frame {frame!r} is not in TF" in run["log"]
    assert "the frame runs LiDAR-only" in run["log"]


def test_image_stamp_outside_the_tf_data_runs_lidar_only_with_the_reason(run):
    sc = run["scores"][run["extrapolated"]]
    assert sc.lidar_only and "velo_dyn" in sc.lidar_only_reason and "xtrapolation" in sc.lidar_only_reason, \
        sc.lidar_only_reason


def test_tf_problems_are_counted_in_diagnostics(run):
    d = run["diag"]
    assert int(d["tf_unavailable_frames"]) >= 3, d  # the two unknown frames + the extrapolated one
    assert d["tf"] in ("tf2_ros", "cmfiou_ros.tf_buffer")
