"""Converters: PointCloud2 / Image / CameraInfo / Detections <-> numpy & cmfiou_core types (no ROS graph needed)."""
import importlib.util
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)
require("sensor_msgs.msg")
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField  # noqa: E402

from cmfiou_core.calib import Calibration  # noqa: E402
from cmfiou_core.types import Detections  # noqa: E402
from cmfiou_ros import convert as C  # noqa: E402

FMT = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 8: "d"}
SIZE = {k: struct.calcsize(v) for k, v in FMT.items()}


def cloud_from_struct(fields, point_step, rows, bigendian=False, row_pad=0, height=1):
    """Reference encoder: struct.pack per point (independent of the numpy dtype code under test)."""
    e = ">" if bigendian else "<"
    n = len(rows)
    width = n // height
    data = bytearray()
    for r in range(height):
        for pt in rows[r * width:(r + 1) * width]:
            buf = bytearray(point_step)
            for (name, off, dt), v in zip(fields, pt):
                struct.pack_into(e + FMT[dt], buf, off, v)
            data += buf
        data += bytes(row_pad)
    m = PointCloud2()
    m.height, m.width = height, width
    m.fields = [PointField(name=n_, offset=o, datatype=d, count=1) for n_, o, d in fields]
    m.is_bigendian = bigendian
    m.point_step = point_step
    m.row_step = point_step * width + row_pad
    m.data = bytes(data)
    m.is_dense = True
    return m


def _val(dt, draw):
    if dt in (7, 8):
        return draw(st.floats(-1e3, 1e3, allow_nan=False, width=32 if dt == 7 else 64))
    lo, hi = {1: (-128, 127), 2: (0, 255), 3: (-2**15, 2**15 - 1), 4: (0, 2**16 - 1), 5: (-2**31, 2**31 - 1),
              6: (0, 2**32 - 1)}[dt]
    return draw(st.integers(lo, hi))


@st.composite
def layouts(draw):
    names = ["x", "y", "z"] + draw(st.lists(st.sampled_from(["intensity", "ring", "t", "rgb"]), unique=True,
                                            max_size=3))
    draw(st.randoms()).shuffle(names)
    fields, off = [], 0
    for n in names:
        dt = draw(st.integers(1, 8))
        off += draw(st.integers(0, 3))  # padding before the field
        fields.append((n, off, dt))
        off += SIZE[dt]
    point_step = off + draw(st.integers(0, 8))
    height = draw(st.sampled_from([1, 2, 3]))
    width = draw(st.integers(0, 6))
    rows = [[_val(dt, draw) for (_, _, dt) in fields] for _ in range(width * height)]
    return fields, point_step, rows, draw(st.booleans()), draw(st.sampled_from([0, 0, 5])), height


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_pointcloud2_any_layout_matches_reference(layout):
    fields, ps, rows, be, pad, height = layout
    msg = cloud_from_struct(fields, ps, rows, be, pad, height)
    arr = C.pointcloud2_to_structured(msg)
    assert arr.shape == (len(rows),)
    for j, (name, _, dt) in enumerate(fields):
        got = arr[name]
        ref = np.array([r[j] for r in rows], dtype=np.float64)
        if dt == 7:
            ref = ref.astype(np.float32).astype(np.float64)
        np.testing.assert_array_equal(got.astype(np.float64), ref)
    if not rows:
        with pytest.raises(C.MessageError, match="empty"):
            C.pointcloud2_to_xyzi(msg)
        pts, dropped = C.pointcloud2_to_xyzi(msg, allow_empty=True)
        assert pts.shape == (0, 4) and dropped == 0
        return
    pts, dropped = C.pointcloud2_to_xyzi(msg)
    ref = np.array([[r[[f[0] for f in fields].index(c)] for c in "xyz"] for r in rows], np.float32)
    finite = np.isfinite(ref).all(axis=1)
    assert dropped == int((~finite).sum())
    np.testing.assert_array_equal(pts[:, :3], ref[finite])


def test_xyzi_roundtrip_zero_copy_and_fast():
    pts = np.random.default_rng(0).normal(size=(120_000, 4)).astype(np.float32)
    msg = C.xyzi_to_pointcloud2(pts, 1_234_567_890_123, "velo")
    assert (msg.point_step, msg.row_step, msg.height, msg.width) == (16, 16 * 120_000, 1, 120_000)
    assert C.stamp_to_ns(msg.header.stamp) == 1_234_567_890_123 and msg.header.frame_id == "velo"
    arr = C.pointcloud2_to_structured(msg)
    assert not arr.flags.owndata  # a view over msg.data
    out, dropped = C.pointcloud2_to_xyzi(msg)
    np.testing.assert_array_equal(out, pts)
    assert dropped == 0


def test_nan_inf_rows_dropped_and_counted():
    pts = np.arange(40, dtype=np.float32).reshape(10, 4)
    pts[2, 0] = np.nan
    pts[5, 2] = np.inf
    pts[7, 3] = np.nan  # intensity NaN: the point is kept with intensity 0 (counted apart)
    pts[8, 3] = np.inf
    pts[5, 3] = np.nan  # a row dropped for its z is not counted as an intensity fix
    msg = C.xyzi_to_pointcloud2(pts)
    assert msg.is_dense is False
    counts = {}
    out, dropped = C.pointcloud2_to_xyzi(msg, counts=counts)
    assert dropped == 2 and out.shape == (8, 4) and counts == {"nonfinite_intensity": 2}
    keep = [0, 1, 3, 4, 6, 7, 8, 9]
    ref = pts[keep].copy()
    ref[[5, 6], 3] = 0.0  # rows 7 and 8 of the input
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(C.MessageError, match="non-finite"):
        C.pointcloud2_to_xyzi(msg, skip_nans=False)


def test_intensity_scaling_uint8_auto():
    fields = [("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("intensity", 12, 2)]
    msg = cloud_from_struct(fields, 16, [[1.0, 2.0, 3.0, 255], [0, 0, 0, 51]])
    out, _ = C.pointcloud2_to_xyzi(msg)
    np.testing.assert_allclose(out[:, 3], [1.0, 0.2], rtol=1e-6)
    out, _ = C.pointcloud2_to_xyzi(msg, intensity_scale=2.0)
    np.testing.assert_allclose(out[:, 3], [510.0, 102.0])


def test_organized_cloud_with_row_padding():
    fields = [("x", 0, 7), ("y", 4, 7), ("z", 8, 7)]
    rows = [[float(i), float(i) * 2, -float(i)] for i in range(12)]
    msg = cloud_from_struct(fields, 12, rows, row_pad=7, height=3)
    out, _ = C.pointcloud2_to_xyzi(msg)
    np.testing.assert_array_equal(out[:, 0], np.arange(12, dtype=np.float32))
    assert np.all(out[:, 3] == 0)  # no intensity field


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m, "point_step", 8), "does not fit"),
    (lambda m: setattr(m, "row_step", m.row_step - 1), "row_step"),
    (lambda m: setattr(m, "data", bytes(m.data)[:-3]), "data has"),
    (lambda m: setattr(m, "width", m.width + 1), "row_step"),
    (lambda m: setattr(m, "fields", [f for f in m.fields if f.name != "y"]), "lacks field"),
    (lambda m: setattr(m, "fields", []), "no fields"),
    (lambda m: setattr(m, "point_step", 0), "point_step"),
    (lambda m: m.fields.__setitem__(0, PointField(name="x", offset=0, datatype=9, count=1)), "datatype"),
    (lambda m: m.fields.__setitem__(1, PointField(name="y", offset=2, datatype=7, count=1)), "overlap"),
    (lambda m: m.fields.__setitem__(1, PointField(name="x", offset=4, datatype=7, count=1)), "twice"),
])
def test_pointcloud2_validation_errors(mutate, match):
    msg = C.xyzi_to_pointcloud2(np.ones((5, 4), np.float32))
    mutate(msg)
    with pytest.raises(C.MessageError, match=match):
        C.pointcloud2_to_xyzi(msg)


def _image(arr, enc, pad=0, bigendian=False):
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">" if bigendian else "<"))
    row = arr.reshape(h, -1).view(np.uint8).reshape(h, -1)
    data = np.concatenate([row, np.full((h, pad), 77, np.uint8)], axis=1)
    m = Image(height=h, width=w, encoding=enc, is_bigendian=int(bigendian), step=row.shape[1] + pad)
    m.data = data.tobytes()
    return m


@pytest.mark.parametrize("pad", [0, 5])
def test_image_encodings(pad):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(C.image_to_rgb(_image(rgb, "rgb8", pad)), rgb)
    np.testing.assert_array_equal(C.image_to_rgb(_image(rgb[:, :, ::-1], "bgr8", pad)), rgb)
    rgba = np.concatenate([rgb, np.full((7, 9, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(C.image_to_rgb(_image(rgba, "rgba8", pad)), rgb)
    bgra = np.concatenate([rgb[:, :, ::-1], np.full((7, 9, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(C.image_to_rgb(_image(bgra, "bgra8", pad)), rgb)
    mono = rgb[:, :, 0]
    np.testing.assert_array_equal(C.image_to_rgb(_image(mono, "mono8", pad)), np.repeat(mono[:, :, None], 3, 2))
    m16 = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
    m16[0, :4] = [0, 255, 65535, 32767]  # 255: >> 8 gives 0, cv_bridge's rounding 1 (0.992)
    for be in (False, True):
        out = C.image_to_rgb(_image(m16, "mono16", pad, be))
        # cv_bridge: convertTo(CV_8U, 255 / 65535) = round(x * 255 / 65535), here in float64
        np.testing.assert_array_equal(out[:, :, 1], np.round(m16.astype(np.float64) * 255 / 65535).astype(np.uint8))
    f = rng.random((7, 9)).astype(np.float32)
    with pytest.raises(C.MessageError, match=r"\[32FC1\] is not a color format"):
        C.image_to_rgb(_image(f, "32FC1", pad))


def test_mono16_differs_from_a_plain_shift():
    """The rounding matters: over all 65536 values, round(x*255/65535) and x >> 8 differ by one level for many."""
    x = np.arange(65536, dtype=np.uint16)
    out = C.image_to_rgb(_image(x.reshape(256, 256), "mono16", 0))[:, :, 0].reshape(-1)
    ref = np.round(x.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)
    assert 0 < np.count_nonzero(out != (x >> 8)) and np.abs(out.astype(int) - (x >> 8)).max() == 1


def test_mono16_matches_cv_bridge_when_available():
    cv_bridge = pytest.importorskip("cv_bridge")
    rng = np.random.default_rng(3)
    m16 = rng.integers(0, 65536, (5, 6), dtype=np.uint16)
    msg = _image(m16, "mono16", 0)
    ref = cv_bridge.CvBridge().imgmsg_to_cv2(msg, "rgb8")
    np.testing.assert_array_equal(C.image_to_rgb(msg), ref)
    f = _image(rng.random((5, 6)).astype(np.float32), "32FC1", 0)
    with pytest.raises(Exception, match="not a color format"):
        cv_bridge.CvBridge().imgmsg_to_cv2(f, "rgb8")


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m, "encoding", "yuv422"), "unsupported image encoding"),
    (lambda m: setattr(m, "step", 3), "step"),
    (lambda m: setattr(m, "data", bytes(m.data)[:-1]), "data has"),
    (lambda m: setattr(m, "height", 0), "positive"),
])
def test_image_validation(mutate, match):
    m = C.rgb_to_image(np.zeros((4, 5, 3), np.uint8))
    mutate(m)
    with pytest.raises(C.MessageError, match=match):
        C.image_to_rgb(m)


def test_rgb_to_image_roundtrip():
    rgb = np.random.default_rng(2).integers(0, 256, (375, 1242, 3), dtype=np.uint8)
    for enc in ("rgb8", "bgr8"):
        m = C.rgb_to_image(rgb, 5, "cam", enc)
        assert m.step == 1242 * 3 and m.encoding == enc
        np.testing.assert_array_equal(C.image_to_rgb(m), rgb)


def test_calibration_roundtrip_through_camera_info(kitti_samples):
    calib = Calibration.from_kitti_object_file(kitti_samples / "object/training/calib/000008.txt", 1242, 375)
    info = C.calibration_to_camera_info(calib, 7, "cam")
    T = np.eye(4)
    T[:3] = calib.Tr_velo_to_cam
    back = C.camera_info_to_calibration(info, T)
    np.testing.assert_allclose(back.P2, calib.P2)
    np.testing.assert_allclose(back.V2R, calib.V2R, atol=1e-12)
    assert (back.image_width, back.image_height) == (1242, 375)
    pts = np.random.default_rng(0).uniform(5, 40, (100, 3))
    np.testing.assert_allclose(back.lidar_to_img(pts)[0], calib.lidar_to_img(pts)[0], atol=1e-9)
    # the 7-number (xyz + quaternion) form of the same extrinsic gives the same calibration
    tf = C.matrix_to_transform_msg(T, 0, "cam", "velo")
    T7 = C.transform_msg_to_matrix(tf)
    np.testing.assert_allclose(T7, T, atol=1e-6)
    q = tf.transform.rotation
    T7b = C.extrinsic_matrix([T[0, 3], T[1, 3], T[2, 3], q.x, q.y, q.z, q.w])
    np.testing.assert_allclose(T7b, T, atol=1e-6)
    np.testing.assert_allclose(C.extrinsic_matrix(T.reshape(-1)), T)
    np.testing.assert_allclose(C.extrinsic_matrix(T[:3].reshape(-1)), T)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m, "width", 0), "positive"),
    (lambda m: (setattr(m, "p", [0.0] * 12), setattr(m, "k", [0.0] * 9)), "all zero"),
    (lambda m: setattr(m, "p", [float("nan")] * 12), "NaN"),
    (lambda m: setattr(m, "p", [1.0] * 12), "CameraInfo"),
    (lambda m: setattr(m, "r", [2.0] + [0.0] * 8), "rotation"),
])
def test_camera_info_validation(mutate, match):
    calib = Calibration(np.array([[700, 0, 600, 0], [0, 700, 180, 0], [0, 0, 1, 0]]), np.eye(3), np.eye(4)[:3])
    m = C.calibration_to_camera_info(calib, 0, "c", 1242, 375)
    mutate(m)
    with pytest.raises(C.MessageError, match=match):
        C.camera_info_to_calibration(m, np.eye(4))


def test_k_only_camera_info():
    calib = Calibration(np.array([[700, 0, 600, 0], [0, 700, 180, 0], [0, 0, 1, 0]]), np.eye(3), np.eye(4)[:3])
    m = C.calibration_to_camera_info(calib, 0, "c", 1242, 375)
    m.p = [0.0] * 12
    np.testing.assert_allclose(C.camera_info_to_calibration(m, np.eye(4)).P2, calib.P2)


@pytest.mark.parametrize("vals,match", [([1, 2, 3], "16"), ([0] * 7, "norm"), ([np.nan] * 16, "NaN"),
                                        (list(np.eye(4).reshape(-1) * 2), "last row|orthonormal")])
def test_extrinsic_validation(vals, match):
    with pytest.raises(C.MessageError, match=match):
        C.extrinsic_matrix(vals)


def _dets(n=3, stamp=42, lidar_only=False):
    rng = np.random.default_rng(n)
    boxes = np.c_[rng.uniform(-20, 20, (n, 3)), rng.uniform(0.5, 4, (n, 3)), rng.uniform(-3, 3, n)]
    labels = (np.arange(n) % 3) + 1
    cls, iou = rng.random(n), rng.random(n)
    return Detections(boxes, labels, cls, iou, np.sqrt(cls * iou), stamp, "velo", lidar_only,
                      {"pre": 1.0, "net": 2.5})


def test_detections_to_vision_msgs_scores_markers():
    require("vision_msgs.msg")
    require("cmfiou_ros.msg")
    from std_msgs.msg import Header

    det = _dets(5)
    header = Header(stamp=C.ns_to_stamp(1_700_000_000_123_456_789), frame_id="velo_link")
    arr = C.detections_to_detection3d_array(det, header)
    scores = C.detections_to_scores_msg(det, header)
    marks = C.detections_to_markers(det, header)
    assert arr.header == header and scores.header == header
    assert len(arr.detections) == len(scores.score) == len(scores.cls_score) == len(scores.iou_score) == 5
    for k, d in enumerate(arr.detections):
        b = det.boxes[k]
        assert d.header == header and d.id == ""
        assert d.results[0].hypothesis.class_id == det.names[k] == scores.class_id[k]
        assert math.isclose(d.results[0].hypothesis.score, float(det.scores[k]), rel_tol=1e-6)
        assert math.isclose(scores.score[k], det.scores[k], rel_tol=1e-6)
        assert d.results[0].pose.pose == d.bbox.center
        c = d.bbox.center
        assert np.allclose([c.position.x, c.position.y, c.position.z], b[:3], atol=1e-5)
        assert np.allclose([d.bbox.size.x, d.bbox.size.y, d.bbox.size.z], b[3:6], atol=1e-5)
        yaw = C.quaternion_to_yaw(c.orientation)
        assert math.isclose(math.cos(yaw - b[6]), 1.0, abs_tol=1e-6)  # same heading (mod 2 pi)
        assert c.orientation.x == 0 and c.orientation.y == 0
    from visualization_msgs.msg import Marker

    assert marks.markers[0].action == Marker.DELETEALL
    assert len(marks.markers) == 1 + 2 * 5
    for k in range(5):
        box, text = marks.markers[1 + 2 * k], marks.markers[2 + 2 * k]
        assert box.type == Marker.LINE_LIST and len(box.points) == 24
        assert text.type == Marker.TEXT_VIEW_FACING and text.text.startswith(det.names[k])
        assert box.header == header
    empty = C.detections_to_markers(Detections.empty(1, "velo"))
    assert len(empty.markers) == 1  # DELETEALL only: stale boxes vanish
    t = C.timings_to_msg(det.timings_ms, header, 5.0, 7.0, 3)
    assert [s.stage for s in t.stages] == ["pre", "net"] and t.dropped_frames == 3


def test_marker_box_yaw_convention():
    det = Detections(np.array([[0, 0, 0, 4, 2, 2, math.pi / 2]], np.float32), np.array([1]), np.array([0.9]),
                     np.array([0.8]), np.array([0.9]), stamp_ns=1, frame_id="velo")
    box = C.detections_to_markers(det).markers[1]
    p = np.array([[q.x, q.y, q.z] for q in box.points])
    assert p.shape == (24, 3)  # 12 edges
    # rotated by +90 deg about z (counter-clockwise): the length now spans y
    assert np.isclose(p[:, 1].max(), 2) and np.isclose(p[:, 0].max(), 1) and np.isclose(p[:, 2].max(), 1)
    # every edge has the length of one box side
    lengths = np.linalg.norm(p[0::2] - p[1::2], axis=1)
    assert sorted(np.round(lengths, 5).tolist()) == [2.0] * 8 + [4.0] * 4


@pytest.mark.skipif(importlib.util.find_spec("sensor_msgs_py") is None,
                    reason="sensor_msgs_py not installed (not on PyPI; present in a real ROS 2 install)")
def test_agrees_with_sensor_msgs_py():
    from sensor_msgs_py import point_cloud2 as pc2

    pts = np.random.default_rng(3).normal(size=(1000, 4)).astype(np.float32)
    pts[10, 1] = np.nan
    msg = C.xyzi_to_pointcloud2(pts)
    ref = pc2.read_points_numpy(msg, field_names=("x", "y", "z", "intensity"), skip_nans=True)
    out, _ = C.pointcloud2_to_xyzi(msg)
    np.testing.assert_array_equal(out, ref)
    ref_msg = pc2.create_cloud(msg.header, msg.fields, pts.tolist())
    np.testing.assert_array_equal(C.pointcloud2_to_xyzi(ref_msg)[0], out)


@pytest.mark.skipif(importlib.util.find_spec("sensor_msgs_py") is None,
                    reason="sensor_msgs_py not installed (not on PyPI; present in a real ROS 2 install)")
def test_documented_differences_from_sensor_msgs_py():
    """README topic table: rows with inf are dropped (sensor_msgs_py keeps them), uint8 intensity becomes /255
    (sensor_msgs_py: the raw integer)."""
    from sensor_msgs.msg import PointField
    from sensor_msgs_py import point_cloud2 as pc2

    pts = np.array([[1, 2, 3, 0.5], [np.inf, 0, 0, 0.1], [4, 5, 6, 0.2]], np.float32)
    msg = C.xyzi_to_pointcloud2(pts)
    ref = pc2.read_points_numpy(msg, field_names=("x", "y", "z", "intensity"), skip_nans=True)
    ours, dropped = C.pointcloud2_to_xyzi(msg)
    assert len(ref) == 3 and dropped == 1 and len(ours) == 2  # inf row: kept there, dropped (and counted) here
    fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xyz")]
    fields.append(PointField(name="intensity", offset=12, datatype=PointField.UINT8, count=1))
    rows = [(1.0, 2.0, 3.0, 255), (4.0, 5.0, 6.0, 51)]
    cloud = pc2.create_cloud(msg.header, fields, rows)
    raw = pc2.read_points(cloud, field_names=("intensity",))
    assert [int(r[0]) for r in raw] == [255, 51]
    np.testing.assert_allclose(C.pointcloud2_to_xyzi(cloud)[0][:, 3], [1.0, 0.2])


@pytest.mark.skipif(importlib.util.find_spec("cv_bridge") is None,
                    reason="cv_bridge (ROS 2) not installed (not on PyPI; present in a real ROS 2 install)")
def test_agrees_with_cv_bridge():
    from cv_bridge import CvBridge

    br = CvBridge()
    rgb = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for enc in ("rgb8", "bgr8", "mono8"):
        src = rgb if enc != "mono8" else rgb[:, :, 0]
        msg = br.cv2_to_imgmsg(src, encoding=enc)
        ours = C.image_to_rgb(msg)
        ref = br.imgmsg_to_cv2(msg, desired_encoding="rgb8")
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("layout", ["xyzi16", "velodyne32", "uint16_intensity", "no_intensity", "bigendian",
                                    "float64_xyz"])
def test_pointcloud2_layouts_give_the_field_values(layout):
    """The one-gather float32 fast path and the generic per-field path give each field's own value, whatever the
    layout (offsets, padding, extra fields, integer intensity, byte order, float64)."""
    rng = np.random.default_rng(7)
    n = 1000
    xyz = rng.uniform(-50, 50, (n, 3))
    inten = rng.uniform(0, 1, n)
    f4, f8 = ("<f4", "<f8") if layout != "bigendian" else (">f4", ">f8")
    if layout == "xyzi16" or layout == "bigendian":
        dt = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": [f4] * 4, "offsets": [0, 4, 8, 12],
                       "itemsize": 16})
    elif layout == "velodyne32":
        dt = np.dtype({"names": ["x", "y", "z", "intensity", "ring", "time"],
                       "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "<f4"], "offsets": [0, 4, 8, 16, 20, 24],
                       "itemsize": 32})
    elif layout == "uint16_intensity":
        dt = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4", "<f4", "<f4", "<u2"],
                       "offsets": [0, 4, 8, 12], "itemsize": 16})
    elif layout == "no_intensity":
        dt = np.dtype({"names": ["x", "y", "z"], "formats": ["<f4"] * 3, "offsets": [0, 4, 8], "itemsize": 12})
    else:
        dt = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": [f8, f8, f8, "<f4"],
                       "offsets": [0, 8, 16, 24], "itemsize": 32})
    arr = np.zeros(n, dt)
    for j, c in enumerate("xyz"):
        arr[c] = xyz[:, j]
    if "intensity" in dt.names:
        arr["intensity"] = (inten * 65535).astype(np.uint16) if layout == "uint16_intensity" else inten
    msg = C.array_to_pointcloud2(arr, 1, "velodyne")
    if layout == "bigendian":      # array_to_pointcloud2 writes little endian: the big-endian bytes by hand
        msg.data = arr.tobytes()
        msg.is_bigendian = True
    out, dropped = C.pointcloud2_to_xyzi(msg)
    assert dropped == 0 and out.dtype == np.float32 and out.shape == (n, 4) and out.flags.c_contiguous
    for j, c in enumerate("xyz"):
        assert np.array_equal(out[:, j], arr[c].astype(np.float32))
    if layout == "no_intensity":
        assert np.all(out[:, 3] == 0)
    elif layout == "uint16_intensity":
        assert np.array_equal(out[:, 3], arr["intensity"].astype(np.float32) / np.float32(65535))
    else:
        assert np.array_equal(out[:, 3], arr["intensity"].astype(np.float32))
    out[0, 0] = 123.0                               # the result never aliases the message buffer
    assert float(C.pointcloud2_to_xyzi(msg)[0][0, 0]) != 123.0
