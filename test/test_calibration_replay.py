"""Cross-process: the real detector node (subprocess, real rclpy) fed real KITTI frames whose calibration and image
size change from frame to frame, in two passes with the stamps jumping back between them (a bag loop). A recording
pipeline (tiny_pipeline.CalibrationEcho) echoes the calibration each frame was fused with, so the test checks that
every output used its own frame's calibration, that a rejected or wrong-sized CameraInfo gives a LiDAR-only frame
(never another frame's calibration), and that fusion resumes within one frame of the stamp jump."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)
require("rclpy")
require("vision_msgs.msg")
require("cmfiou_ros.msg")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rosutil import DetectorProcess  # noqa: E402

from cmfiou_ros import convert as C  # noqa: E402

S = 1_000_000_000
REJECT, WRONG_SIZE = 4, 9  # frames of each pass whose CameraInfo is zeroed (rejected) / 10 px too wide


@pytest.fixture(scope="module")
def replay(kitti_samples):
    from geometry_msgs.msg import TransformStamped

    from cmfiou_ros.replay_node import KittiSource

    src = KittiSource(str(kitti_samples / "object"))
    frames = []
    for k in range(len(src)):
        idx, pts, rgb, calib = src.load(k)
        frames.append((idx, pts[::4], rgb, calib))  # every 4th point: the echo pipeline needs none of them
    factory = f"{Path(__file__).resolve().parent / 'tiny_pipeline.py'}:CalibrationEcho.from_config"
    dp = DetectorProcess("calib_replay", [f"pipeline_factory:={factory}", "warmup:=false", "use_tf:=false",
                                          "extrinsic_topic:=/t/ext", "diagnostics_period:=0.5"])
    pub = dp.pub
    dp.publisher("ext", TransformStamped, "/t/ext", dp.latched)
    sent = []  # (pass, k, stamp, expected echo or None, kind)
    try:
        assert dp.wait(lambda: dp.node.count_subscribers("/kitti/velo/pointcloud") >= 1 and
                       dp.node.count_subscribers("/t/ext") >= 1 and
                       dp.node.count_publishers("/cmfiou_detector/scores") >= 1, 60), "detector did not come up"
        dp.wait(lambda: False, 1.0)  # discovery of the camera topics
        t0 = time.time_ns() - 300 * S  # stamps in the past of the node's clock (future ones are rejected)
        for pss, base in ((0, t0), (1, t0 - 100 * S)):  # the second pass jumps back 100 s (a bag loop)
            for k, (idx, pts, rgb, calib) in enumerate(frames):
                stamp = base + k * S // 10
                fx = calib.P2[0, 0] * (1.0 + 0.01 * k + 0.2 * pss)  # every frame its own focal length
                cal = calib.__class__(_with_fx(calib, fx), calib.R0_rect, calib.Tr_velo_to_cam, rgb.shape[1],
                                      rgb.shape[0])
                info = C.calibration_to_camera_info(cal, stamp, "cam")
                kind = "fused"
                if k == REJECT:
                    info.p, info.k = [0.0] * 12, [0.0] * 9
                    kind = "rejected"
                elif k == WRONG_SIZE:
                    info.width += 10
                    kind = "wrong_size"
                T = np.eye(4)
                T[:3] = calib.Tr_velo_to_cam
                msgs = {"ext": C.matrix_to_transform_msg(T, stamp, "cam", "velo_link"), "info": info,
                        "image": C.rgb_to_image(rgb, stamp, "cam"), "cloud": C.xyzi_to_pointcloud2(pts, stamp,
                                                                                                "velo_link")}
                # odd frames: the cloud first, its calibration last (the node waits for it)
                order = ("ext", "info", "image", "cloud") if k % 2 == 0 else ("cloud", "image", "info", "ext")
                for name in order:
                    pub[name].publish(msgs[name])
                echo = (np.float32(fx), np.float32(cal.P2[0, 2]), np.float32(T[0, 3]), rgb.shape[1], rgb.shape[0])
                sent.append((pss, k, stamp, echo, kind))
                assert dp.wait(lambda: stamp in dp.dets and stamp in dp.scores, 20), \
                    f"no output for pass {pss} frame {k}"
        dp.wait(lambda: False, 1.0)
    finally:
        out = dp.close()
    return {"sent": sent, "dets": dp.dets, "scores": dp.scores, "log": out}


def _with_fx(calib, fx):
    P2 = calib.P2.copy()
    P2[0, 0] = fx
    return P2


def test_every_output_used_its_own_frames_calibration(replay):
    wrong, fused = [], 0
    for pss, k, stamp, echo, kind in replay["sent"]:
        det, sc = replay["dets"][stamp], replay["scores"][stamp]
        if len(det.detections) == 0:
            assert sc.lidar_only and sc.lidar_only_reason, (pss, k)
            continue
        fused += 1
        d = det.detections[0].bbox
        got = (np.float32(d.center.position.x), np.float32(d.center.position.y), np.float32(d.center.position.z),
               int(round(d.size.x)), int(round(d.size.y)))
        if kind != "fused" or got != echo:
            wrong.append((pss, k, kind, got, echo))
    assert not wrong, wrong
    assert fused >= 2 * (len(replay["sent"]) // 2 - 2) - 1, fused  # all but the two bad ones, at most one more


def test_rejected_and_wrong_sized_camera_info_give_lidar_only_with_the_reason(replay):
    for pss, k, stamp, echo, kind in replay["sent"]:
        sc = replay["scores"][stamp]
        if kind == "rejected":
            assert sc.lidar_only and "was rejected" in sc.lidar_only_reason, sc.lidar_only_reason
        elif kind == "wrong_size":
            assert sc.lidar_only and "camera_info is 1252x375 but the image is 1242x375" in sc.lidar_only_reason
    assert "[/kitti/camera_color_left/camera_info]" in replay["log"]  # both were warned


def test_fusion_resumes_within_one_frame_of_the_stamp_jump(replay):
    second = [s for s in replay["sent"] if s[0] == 1]
    lidar_only = [k for _, k, stamp, _, kind in second if kind == "fused" and replay["scores"][stamp].lidar_only]
    assert set(lidar_only) <= {0}, lidar_only  # at most the first frame after the jump
    assert replay["log"].count("stamp jumped back") == 1, replay["log"][-3000:]
