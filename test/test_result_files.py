"""KITTI result files: angles inside [-pi, pi] (devkit format), and one line per box whichever path carried it
(``Detections`` arrays directly, or a vision_msgs Detection3DArray as in node mode)."""
import math

import numpy as np
import pytest

from cmfiou_core.calib import Calibration
from cmfiou_core.eval.kitti_io import lidar_boxes_to_result_text, parse_kitti_text, wrap_angle
from kitti_format import check_result_text

P2 = np.array([[721.5377, 0, 609.5593, 44.85728], [0, 721.5377, 172.854, 0.2163791], [0, 0, 1, 0.002745884]])
R0 = np.array([[0.9999239, 0.00983776, -0.007445048], [-0.009869795, 0.9999421, -0.004278459],
               [0.007402527, 0.004351614, 0.9999631]])
TR = np.array([[7.533745e-03, -9.999714e-01, -6.166020e-04, -4.069766e-03],
               [1.480249e-02, 7.280733e-04, -9.998902e-01, -7.631618e-02],
               [9.998621e-01, 7.523790e-03, 1.480755e-02, -2.717806e-01]])  # KITTI 000008's calibration
CALIB = Calibration(P2, R0, TR, 1242, 375)


def _boxes(headings):
    n = len(headings)
    rng = np.random.default_rng(3)
    xyz = np.c_[rng.uniform(8, 40, n), rng.uniform(-6, 6, n), rng.uniform(-1.2, -0.6, n)]
    return np.c_[xyz, np.tile([3.9, 1.6, 1.5], (n, 1)), headings].astype(np.float32)


HEADINGS = [-8.2436, -7.0, -math.pi - 1e-3, -math.pi, -3.14159, -1.0, 0.0, 1.5, math.pi / 2, 3.14158, math.pi,
            math.pi + 1e-3, 4.0, 7.7, 12.5, -12.5]


def test_angles_wrapped_into_kitti_range():
    boxes = _boxes(HEADINGS)
    text = lidar_boxes_to_result_text(boxes, np.ones(len(boxes)), np.full(len(boxes), 0.5), CALIB, (375, 1242))
    assert check_result_text(text, 1242, 375) == len(boxes)
    res = parse_kitti_text(text, "r", is_result=True)
    # rotation_y = -heading - pi/2 (OpenPCDet), the same angle mod 2 pi (4-decimal rounding; at most 1e-4 moved in)
    want = -np.asarray(boxes[:, 6], np.float64) - np.pi / 2
    d = np.abs(wrap_angle(res["rotation_y"] - want))
    assert d.max() < 2e-4, d
    # wrapping changes nothing else: the unwrapped heading gives the same boxes
    ref = lidar_boxes_to_result_text(np.c_[boxes[:, :6], wrap_angle(boxes[:, 6]) + 2 * np.pi], np.ones(len(boxes)),
                                     np.full(len(boxes), 0.5), CALIB, (375, 1242))
    r2 = parse_kitti_text(ref, "r2", is_result=True)
    for k in ("bbox", "location", "dimensions"):
        np.testing.assert_allclose(res[k], r2[k], atol=2e-4)


def test_detection3d_array_path_gives_the_same_lines():
    """Node mode reads boxes back from Detection3DArray (float64, yaw via a quaternion): same text, digit for digit."""
    pytest.importorskip("vision_msgs.msg")
    from cmfiou_core.types import Detections
    from cmfiou_ros.bag_eval import detection_array_to_arrays
    from cmfiou_ros.convert import detections_to_detection3d_array

    rng = np.random.default_rng(5)
    h = np.r_[np.asarray(HEADINGS), rng.uniform(-9, 9, 300)]
    boxes = _boxes(h)
    boxes[:, :3] += rng.normal(0, 0.01, (len(h), 3)).astype(np.float32)
    labels = rng.integers(1, 4, len(h))
    scores = rng.uniform(0, 1, len(h)).astype(np.float32)
    det = Detections(boxes, labels, scores, scores, scores)
    b, lb, s = detection_array_to_arrays(detections_to_detection3d_array(det))
    direct = lidar_boxes_to_result_text(det.boxes, det.labels, det.scores, CALIB, (375, 1242))
    via_msg = lidar_boxes_to_result_text(b, lb, s, CALIB, (375, 1242))
    assert direct == via_msg
    check_result_text(direct, 1242, 375)
