"""Fuzzing the converters and the detector node's callbacks with malformed messages (hypothesis, >= 10 000 cases).

Every malformed message must produce a warning (counted per topic, logged throttled, naming the topic and the
problem), never an exception out of a callback; the node keeps publishing on the next valid frame. Callbacks are
called in-process for bulk fuzzing; test_node.py's cross-process run also injects malformed messages.
"""
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosutil import require  # noqa: E402  (pytest puts test/ on sys.path)
rclpy = require("rclpy")
require("vision_msgs.msg")
require("cmfiou_ros.msg")

from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rosutil import fresh_domain, kitti_frame_msgs, make_detector, wait_until  # noqa: E402
from tiny_pipeline import TinyPipeline  # noqa: E402

from cmfiou_core.calib import Calibration  # noqa: E402
from cmfiou_ros import convert as C  # noqa: E402
from cmfiou_ros.detector_node import TransitionCallbackReturn  # noqa: E402

S = 1_000_000_000
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
CASES = {"cloud": 4000, "image": 2500, "camera_info": 2000, "random": 1500}  # 10 000 in all


class RecordingLogger:
    def __init__(self, inner):
        self.inner, self.lines = inner, []

    def warning(self, text):
        self.lines.append(text)
        self.inner.warning(text)


class Rig(dict):
    def __repr__(self):  # hypothesis prints the arguments of failing cases: keep it short
        return "<rig>"


@pytest.fixture(scope="module")
def rig(kitti_samples):
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=fresh_domain())
    node = make_detector(ctx, TinyPipeline(), image_wait=0.0, warn_throttle=2.0)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    node.warn.logger = RecordingLogger(node.get_logger())
    cloud, img, info, T, _ = kitti_frame_msgs(kitti_samples, 3, S)
    node._param_T = T
    small = C.xyzi_to_pointcloud2(np.random.default_rng(0).uniform(-5, 5, (64, 4)).astype(np.float32), S, "velo")
    yield Rig(node=node, cloud=cloud, img=img, info=info, small=small, stamp=[1000 * S])
    node._teardown()
    node.destroy_node()
    rclpy.shutdown(context=ctx)


def valid_frame_still_works(rig):
    """The next valid camera+LiDAR frame is processed and published (with the camera)."""
    node = rig["node"]
    rig["stamp"][0] += S
    stamp = C.ns_to_stamp(rig["stamp"][0])
    for m in (rig["info"], rig["img"], rig["cloud"]):
        m.header.stamp = stamp
    node.on_camera_info(rig["info"])
    node.on_image(rig["img"])
    before = node.frames_out
    cams = node.camera_frames
    node.on_cloud(rig["cloud"])
    assert wait_until(lambda: node.frames_out > before, 10), "node stopped publishing after malformed input"
    assert node.camera_frames == cams + 1
    assert all(s.name for s in node.diagnostics_statuses())


def _clone_cloud(m):
    c = PointCloud2()
    c.header.stamp, c.header.frame_id = C.ns_to_stamp(2 * S), m.header.frame_id
    c.height, c.width, c.point_step, c.row_step = m.height, m.width, m.point_step, m.row_step
    c.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in m.fields]
    c.is_bigendian, c.is_dense = m.is_bigendian, m.is_dense
    c.data = bytes(m.data)
    return c


@st.composite
def bad_clouds(draw):
    kind = draw(st.sampled_from(["point_step", "row_step", "data_len", "missing_xyz", "datatype", "count",
                                 "width", "zero_size", "all_nan", "overlap", "zero_stamp", "offset"]))
    m = draw(st.just(None))  # placeholder; the base message is supplied by the test
    return kind, draw(st.integers(1, 10**6)), draw(st.integers(0, 3)), m


def mutate_cloud(base, kind, n, j):
    c = _clone_cloud(base)
    if kind == "point_step":
        c.point_step = n % 12  # smaller than the x,y,z,intensity layout
        c.row_step = c.point_step * c.width
    elif kind == "row_step":
        c.row_step = base.row_step + (n % 50 + 1) * (1 if n % 2 else -1)
    elif kind == "data_len":
        c.data = bytes(base.data)[: max(0, len(base.data) - (n % 63 + 1))] if n % 2 else bytes(base.data) + bytes(
            n % 63 + 1)
    elif kind == "missing_xyz":
        drop = "xyz"[j % 3]
        c.fields = [f for f in c.fields if f.name != drop]
    elif kind == "datatype":
        c.fields[j].datatype = [0, 9, 10, 200, 255][n % 5]
    elif kind == "count":
        c.fields[j].count = 0 if n % 2 else 100
    elif kind == "width":
        c.width = base.width + n % 1000 + 1
    elif kind == "zero_size":
        c.width = 0 if n % 2 else c.width
        c.height = c.height if n % 2 else 0
        c.row_step = c.point_step * c.width
        c.data = b""
    elif kind == "all_nan":
        arr = np.full((16, 4), np.nan, np.float32)
        arr[:, 3] = 1
        c = C.xyzi_to_pointcloud2(arr, 2 * S, "velo")
    elif kind == "overlap":
        c.fields[j].offset = (c.fields[j].offset + 2 + n % 2) % 16
    elif kind == "zero_stamp":
        c.header.stamp = C.ns_to_stamp(0)
    elif kind == "offset":
        c.fields[j].offset = c.point_step + n % 100
    return c


@settings(max_examples=CASES["cloud"], **FUZZ)
@given(bad_clouds())
def test_fuzz_malformed_clouds(rig, case):
    kind, n, j, _ = case
    node = rig["node"]
    msg = mutate_cloud(rig["small"], kind, n, j)
    before = node.warn.count.get(node._lidar_topic, 0)
    node.on_cloud(msg)  # must not raise
    assert node.warn.count.get(node._lidar_topic, 0) == before + 1, kind
    assert node.warn.last_problem[node._lidar_topic]


def test_clouds_then_valid_frame(rig):
    valid_frame_still_works(rig)
    assert any("[/kitti/velo/pointcloud]" in line for line in rig["node"].warn.logger.lines)


@st.composite
def bad_images(draw):
    kind = draw(st.sampled_from(["encoding", "step", "data_len", "zero", "zero_stamp"]))
    return kind, draw(st.integers(1, 10**6)), draw(st.text(max_size=12))


@settings(max_examples=CASES["image"], **FUZZ)
@given(bad_images())
def test_fuzz_malformed_images(rig, case):
    kind, n, text = case
    node = rig["node"]
    h, w = 6 + n % 5, 7 + n % 3
    enc = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "32FC1"][n % 7]
    bpp = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2, "32FC1": 4}[enc]
    m = Image(height=h, width=w, encoding=enc, step=w * bpp)
    m.header.stamp = C.ns_to_stamp(3 * S + n)
    m.data = bytes(h * w * bpp)
    if kind == "encoding":
        m.encoding = text if text.lower() not in C.SUPPORTED_ENCODINGS else "bayer_rggb8"
    elif kind == "step":
        m.step = w * bpp - 1 - n % (w * bpp)
    elif kind == "data_len":
        m.data = bytes(h * w * bpp + (n % 17 + 1) * (1 if n % 2 else -1))
    elif kind == "zero":
        m.height = 0
        m.data = b""
    else:
        m.header.stamp = C.ns_to_stamp(0)
    before = node.warn.count.get(node._image_topic, 0)
    node.on_image(m)
    assert node.warn.count.get(node._image_topic, 0) == before + 1, kind


def test_images_then_valid_frame(rig):
    valid_frame_still_works(rig)


@st.composite
def bad_infos(draw):
    kind = draw(st.sampled_from(["size0", "p_zero", "p_nan", "r_bad", "focal_neg", "size_mismatch"]))
    return kind, draw(st.integers(1, 10**6)), draw(st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=CASES["camera_info"], **FUZZ)
@given(bad_infos())
def test_fuzz_malformed_camera_info(rig, case):
    kind, n, x = case
    node = rig["node"]
    good = rig["info"]
    m = CameraInfo()
    m.header.stamp = C.ns_to_stamp(rig["stamp"][0] + S // 2 + n)
    m.header.frame_id = "cam"
    m.width, m.height = good.width, good.height
    m.k, m.r, m.p = list(good.k), list(good.r), list(good.p)
    if kind == "size0":
        m.width = 0 if n % 2 else m.width
        m.height = m.height if n % 2 else 0
    elif kind == "p_zero":
        m.p, m.k = [0.0] * 12, [0.0] * 9
    elif kind == "p_nan":
        p = list(m.p)
        p[n % 12] = x if (x != x or abs(x) == float("inf")) else float("nan")
        m.p = p
    elif kind == "r_bad":
        m.r = [1.0 + (n % 7)] * 9
    elif kind == "focal_neg":
        p = list(m.p)
        p[0] = -abs(p[0]) - 1
        m.p = p
    topic = node._info_topic
    before = node.warn.count.get(topic, 0)
    if kind != "size_mismatch":
        node.on_camera_info(m)
        assert node.warn.count.get(topic, 0) == before + 1, kind
        return
    # structurally valid CameraInfo whose size does not match the image: warning at frame assembly, LiDAR-only
    m.width = good.width + 1 + n % 100
    stamp = m.header.stamp
    img, cloud = rig["img"], rig["small"]
    img.header.stamp = stamp
    cloud.header.stamp = stamp
    node.on_camera_info(m)
    node.on_image(img)
    lo = node.lidar_only_frames
    node.on_cloud(cloud)
    assert node.warn.count.get(topic, 0) == before + 1
    assert node.lidar_only_frames == lo + 1 and "camera_info is" in node.last_lidar_only_reason


def test_camera_infos_then_valid_frame(rig):
    time.sleep(0.2)
    valid_frame_still_works(rig)


@settings(max_examples=CASES["random"], **FUZZ)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 64), st.integers(-10, 2000), st.booleans(),
       st.lists(st.tuples(st.sampled_from(["x", "y", "z", "intensity", "q", ""]), st.integers(0, 70),
                          st.integers(0, 9), st.integers(0, 3)), max_size=6), st.binary(max_size=2048))
def test_fuzz_random_clouds_never_crash(rig, h, w, ps, rs, be, fields, data):
    """Fully random headers + bytes: the converter gives a result or a MessageError (nothing else); a cloud it refuses
    is warned about on the LiDAR topic with the converter's own text, counted, and dropped; a cloud it accepts raises
    no other error in the node (on_cloud catches everything, so its not raising proves nothing)."""
    node = rig["node"]
    m = PointCloud2(height=h, width=w, point_step=ps, row_step=max(rs, 0), is_bigendian=be)
    m.header.stamp = C.ns_to_stamp(4 * S + h * 1000 + w)
    m.fields = [PointField(name=n_, offset=o, datatype=d, count=c) for n_, o, d, c in fields]
    m.data = data
    try:
        pts, _ = C.pointcloud2_to_xyzi(m, node.params["intensity_scale"], allow_empty=True)
        refused = None
    except C.MessageError as e:
        refused = str(e)
    topic = node._lidar_topic
    before, empty_before = node.warn.count.get(topic, 0), node.empty_clouds
    node.on_cloud(m)
    after = node.warn.count.get(topic, 0)
    if refused is not None:
        assert after == before + 1 and node.warn.last_problem[topic] == refused
        assert node.empty_clouds == empty_before  # dropped before any further handling
    else:
        problem = node.warn.last_problem.get(topic, "") if after > before else ""
        assert not re.match(r"^[A-Z]\w*(Error|Exception): ", problem), problem  # no unexpected exception
        assert node.empty_clouds == empty_before + (len(pts) == 0)


def test_random_then_valid_frame(rig):
    time.sleep(0.3)
    valid_frame_still_works(rig)
    node = rig["node"]
    assert node.pipeline_errors == 0
    assert node.warn.total >= CASES["cloud"] + CASES["image"] + CASES["camera_info"]
    # throttled: far fewer log lines than warnings
    assert len(node.warn.logger.lines) < node.warn.total / 10


# ------------------------------------------------------------------------------ robustness cases ----------
# Each sends one frame with one defect and asserts: a warning naming the problem, its counter, and (for every
# accepted LiDAR frame) an output for that very frame.
def _spy_outputs(node):
    """Record what the node publishes per stamp (the real publishing still happens)."""
    if hasattr(node, "_spied"):
        return node._spied
    node._spied = {}
    real = node.publish_outputs

    def publish(det, header, t_arrival, proc_ms, lidar_only_reason="", empty_reason=""):
        node._spied[C.stamp_to_ns(header.stamp)] = (det, lidar_only_reason, empty_reason)
        real(det, header, t_arrival, proc_ms, lidar_only_reason, empty_reason)

    node.publish_outputs = publish
    return node._spied


def _send_frame(rig, cloud=None, info=None, img=None, stamp=None, expect_output=True):
    node = rig["node"]
    out = _spy_outputs(node)
    if stamp is None:
        rig["stamp"][0] += S
        stamp = rig["stamp"][0]
    info = rig["info"] if info is None else info
    img = rig["img"] if img is None else img
    cloud = rig["cloud"] if cloud is None else cloud
    for m in (info, img, cloud):
        m.header.stamp = C.ns_to_stamp(stamp)
    node.on_camera_info(info)
    node.on_image(img)
    node.on_cloud(cloud)
    if expect_output:
        assert wait_until(lambda: stamp in out, rig.get("timeout", 10)), "no output for the frame"
        return out[stamp]
    time.sleep(0.2)
    assert stamp not in out
    return None


def _warned(node, topic, before, text):
    # a publisher-side warning comes from the worker thread, after the output spy saw the frame: wait for it
    assert wait_until(lambda: node.warn.count.get(topic, 0) > before, 10), (topic, node.warn.last_problem.get(topic))
    assert text in node.warn.last_problem[topic], node.warn.last_problem[topic]


def test_infinite_intensity_is_zeroed_and_counted_not_dropped(rig):
    node = rig["node"]
    pts = C.pointcloud2_to_xyzi(rig["cloud"])[0].copy()
    pts[:, 3] = np.inf
    cloud = C.xyzi_to_pointcloud2(pts, 0, "velo_link")
    before, zeroed = node.warn.count.get(node._lidar_topic, 0), node.intensity_zeroed
    det, lo_reason, empty = _send_frame(rig, cloud=cloud)
    _warned(node, node._lidar_topic, before, "non-finite intensity: set to 0")
    assert node.intensity_zeroed == zeroed + len(pts)
    assert len(det) > 0 and not det.lidar_only and empty == ""  # all points kept: the frame detects as usual


def test_empty_frame_id_is_warned_and_still_published(rig):
    node = rig["node"]
    cloud = _clone_cloud(rig["cloud"])
    cloud.header.frame_id = ""
    before = node.warn.count.get(node._lidar_topic, 0)
    det, _, _ = _send_frame(rig, cloud=cloud)
    _warned(node, node._lidar_topic, before, "header.frame_id is empty")
    assert len(det) > 0


def test_point_cap_thins_the_cloud_with_a_warning(rig):
    node = rig["node"]
    n = len(C.pointcloud2_to_xyzi(rig["cloud"])[0])
    node.params["max_points"] = n // 2
    try:
        before, capped = node.warn.count.get(node._lidar_topic, 0), node.points_capped
        calls = len(node.pipeline.frames)
        det, _, _ = _send_frame(rig)
        _warned(node, node._lidar_topic, before, f"> max_points {n // 2}: thinned")
        assert node.points_capped == capped + n - n // 2 and len(node.pipeline.frames) == calls + 1
    finally:
        node.params["max_points"] = 1000000


def test_oversize_message_is_warned_and_still_processed(rig):
    node = rig["node"]
    node.params["message_size_warn_mb"] = 0.5  # the KITTI cloud is ~1.9 MiB
    try:
        before, n = node.warn.count.get(node._lidar_topic, 0), node.oversize_messages
        det, _, _ = _send_frame(rig)
        _warned(node, node._lidar_topic, before, "close to the transport limit")
        assert node.oversize_messages >= n + 1 and len(det) > 0
    finally:
        node.params["message_size_warn_mb"] = 0.0


def test_oversize_output_is_warned_at_the_publisher_and_still_published(rig):
    """Outputs above the transport limit (here a limit of 1 KiB; the node's default is the Fast DDS profile's
    maxMessageSize) are warned where they are published, counted, and published all the same."""
    from visualization_msgs.msg import MarkerArray

    node = rig["node"]
    node.params["message_size_warn_mb"] = 1.0 / 1024
    # markers are built only while someone subscribes: subscribe, so that they are published (and oversize) too
    sub = node.create_subscription(MarkerArray, node.markers_pub.topic_name, lambda m: None, 1)
    try:
        deadline = time.monotonic() + 5
        while node.markers_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        topic = node.det_pub.topic_name
        before, n, done = node.warn.count.get(topic, 0), node.oversize_outputs, node.frames_out
        det, _, _ = _send_frame(rig)
        assert wait_until(lambda: node.frames_out > done, 10)  # all of the frame's outputs are out
        assert len(det) >= 4  # the tiny pipeline's boxes: a Detection3DArray over 1 KiB
        _warned(node, topic, before, f"published Detection3DArray ({len(det)} detections) of 0.0")
        assert "> message_size_warn_mb 0.000976562: subscribers with best-effort QoS" in node.warn.last_problem[topic]
        assert node.oversize_outputs >= n + 2  # the detections and the markers at least
        vals = dict(node.diagnostics_statuses()[0].values)
        assert int(vals["oversize_outputs"]) == node.oversize_outputs
    finally:
        node.destroy_subscription(sub)
        node.params["message_size_warn_mb"] = 0.0


def test_future_stamped_input_is_rejected_and_counted(rig):
    node = rig["node"]
    now = node.get_clock().now().nanoseconds
    before, n = node.warn.count.get(node._lidar_topic, 0), node.future_stamped
    _send_frame(rig, stamp=now + 1000 * S, expect_output=False)  # all three messages 1000 s ahead
    _warned(node, node._lidar_topic, before, "ahead of the node's clock")
    assert node.future_stamped == n + 3
    det, lo, _ = _send_frame(rig)  # the next frame fuses as before: nothing of the future frame was kept
    assert not det.lidar_only, lo


def test_future_stamped_image_is_rejected_and_the_cloud_still_gets_its_output(rig):
    """An image (and its CameraInfo) stamped 1000 s ahead: rejected and counted; the cloud of that frame is published
    LiDAR-only, and the next frame fuses again (a far-future image must not block the camera)."""
    node = rig["node"]
    out = _spy_outputs(node)
    now = node.get_clock().now().nanoseconds
    rig["stamp"][0] += S
    stamp = rig["stamp"][0]
    before, n = node.warn.count.get(node._image_topic, 0), node.future_stamped
    rig["info"].header.stamp = rig["img"].header.stamp = C.ns_to_stamp(now + 1000 * S)
    node.on_camera_info(rig["info"])
    node.on_image(rig["img"])
    rig["cloud"].header.stamp = C.ns_to_stamp(stamp)
    node.on_cloud(rig["cloud"])
    assert wait_until(lambda: stamp in out, 10), "no output for the frame"
    _warned(node, node._image_topic, before, "ahead of the node's clock")
    assert node.future_stamped == n + 2
    det, lo, _ = out[stamp]
    assert det.lidar_only and lo, lo
    det, lo, _ = _send_frame(rig)
    assert not det.lidar_only, lo


def test_camera_info_of_another_size_runs_lidar_only_with_a_warning(rig):
    """A CameraInfo whose size disagrees with the image (1000x300 for a 1242x375 image) is never fused."""
    node = rig["node"]
    info = CameraInfo()
    info.header.frame_id = "cam"
    info.width, info.height = 1000, 300
    info.k, info.r, info.p = list(rig["info"].k), list(rig["info"].r), list(rig["info"].p)
    before = node.warn.count.get(node._info_topic, 0)
    det, lo_reason, _ = _send_frame(rig, info=info)
    w, h = rig["img"].width, rig["img"].height
    _warned(node, node._info_topic, before, f"camera_info is 1000x300 but the image is {w}x{h}")
    assert det.lidar_only and lo_reason == f"camera_info is 1000x300 but the image is {w}x{h}", lo_reason


def test_frame_id_unknown_to_tf_is_warned_and_falls_back_to_the_parameter(rig):
    """TF knows the LiDAR but not the camera frame 'cam': warned naming 'cam', counted, and the frame is fused with
    the lidar_to_camera parameter (the rig sets it) instead of TF; published."""
    node = rig["node"]
    if node.tf is None or node.tf.impl != "cmfiou_ros.tf_buffer":
        pytest.skip("the in-process TF case feeds cmfiou_ros.tf_buffer directly (test_tf_node covers tf2_ros)")
    from test_tf_buffer import tf_msg

    buf = node.tf.buffer
    buf.set_transform(tf_msg("base_link", "velo_link", S, [1, 0, 1.7], [0, 0, 0, 1]), static=True)
    buf.set_transform(tf_msg("base_link", "cam_elsewhere", S, [1, 0, 1.5], [0, 0, 0, 1]), static=True)
    try:
        before, n = node.warn.count.get(node._info_topic, 0), node.assembler.tf_unavailable
        det, lo, _ = _send_frame(rig)
        _warned(node, node._info_topic, before, "no TF path from LiDAR frame 'velo_link' to camera frame 'cam': "
                                                "frame 'cam' is not in TF")
        assert "using the lidar_to_camera parameter" in node.warn.last_problem[node._info_topic]
        assert node.assembler.tf_unavailable == n + 1 and not det.lidar_only, lo
        vals = dict(node.diagnostics_statuses()[1].values)
        assert int(vals["tf_unavailable_frames"]) == n + 1 and "'cam' is not in TF" in vals["last_tf_problem"]
    finally:
        with buf.lock:
            buf.caches.clear()
            buf.known.clear()


def test_rejected_camera_info_is_not_replaced_by_an_older_one(rig):
    node = rig["node"]
    bad = CameraInfo()
    bad.header.frame_id = "cam"
    bad.width, bad.height = rig["info"].width, rig["info"].height
    bad.k, bad.r, bad.p = [0.0] * 9, list(rig["info"].r), [0.0] * 12
    _send_frame(rig)  # a good CameraInfo of the previous frame is there
    before = node.warn.count.get(node._info_topic, 0)
    det, lo_reason, _ = _send_frame(rig, info=bad)
    _warned(node, node._info_topic, before, "all zero")
    assert det.lidar_only and "was rejected" in lo_reason, lo_reason
    assert node.last_lidar_only_reason == lo_reason


def test_stamps_jumping_back_reset_the_sync_state_once(rig):
    node = rig["node"]
    asm = node.assembler
    jumps = asm.time_jumps
    det, lo, _ = _send_frame(rig)
    assert not det.lidar_only
    back = rig["stamp"][0] - 50 * S  # a bag loop: 50 s back
    logger, asm.logger = asm.logger, node.warn.logger  # records the lines
    try:
        lines = len(node.warn.logger.lines)
        det, lo, _ = _send_frame(rig, stamp=back)
        warned = [x for x in node.warn.logger.lines[lines:] if "stamp jumped back 50.000 s: sync state reset" in x]
        assert len(warned) == 1, node.warn.logger.lines[lines:]
    finally:
        asm.logger = logger
    assert asm.time_jumps == jumps + 1 and "stamp jumped back 50.000 s" in asm.last_time_jump
    assert not det.lidar_only, lo  # fused at once: the lower-stamped image is not discarded
    det, lo, _ = _send_frame(rig, stamp=back + S // 10)
    assert not det.lidar_only and asm.time_jumps == jumps + 1  # one warning per jump
    vals = dict(node.diagnostics_statuses()[1].values)
    assert int(vals["time_jumps"]) == jumps + 1
    rig["stamp"][0] = back + S  # later cases continue on the new timeline


@pytest.fixture(scope="module")
def real_node(kitti_samples):
    """The node with the real pipeline (demo checkpoint), for the frames only the model can reject."""
    from cmfiou_core.pipeline import Pipeline

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=fresh_domain())
    node = make_detector(ctx, Pipeline.from_config(None, None, "cpu"), image_wait=0.0, warmup=False)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    cloud, img, info, T, _ = kitti_frame_msgs(kitti_samples, 3, S)
    node._param_T = T
    # the real pipeline takes seconds per frame on a CPU, more on a loaded one: not a timing test
    yield Rig(node=node, cloud=cloud, img=img, info=info, stamp=[2000 * S], timeout=90)
    node._teardown()
    node.destroy_node()
    rclpy.shutdown(context=ctx)


@pytest.mark.parametrize("where", ["far", "behind"])
def test_cloud_out_of_range_gives_an_empty_output_with_the_reason(real_node, where):
    node = real_node["node"]
    pts = C.pointcloud2_to_xyzi(real_node["cloud"])[0].copy()
    if where == "far":
        pts[:, 0] += 1000.0
    else:
        pts[:, 0] = -np.abs(pts[:, 0]) - 1.0
    cloud = C.xyzi_to_pointcloud2(pts, 0, "velo_link")
    before, empty = node.warn.count.get(node._lidar_topic, 0), node.empty_outputs
    det, _, reason = _send_frame(real_node, cloud=cloud)
    _warned(node, node._lidar_topic, before, "no LiDAR point inside the detection range")
    assert len(det) == 0 and reason.startswith("no LiDAR point inside the detection range")
    assert node.empty_outputs == empty + 1 and node.pipeline_errors == 0
    inf = dict(node.diagnostics_statuses()[2].values)
    assert inf["last_empty_reason"] == reason


def test_tiny_image_runs_lidar_only_with_the_reason(real_node):
    node = real_node["node"]
    img = C.rgb_to_image(np.full((2, 2, 3), 100, np.uint8), 0, "cam")
    info = C.calibration_to_camera_info(
        Calibration(np.array([[1.2, 0, 1, 0], [0, 1.2, 1, 0], [0, 0, 1, 0]]), np.eye(3),
                    real_node["node"]._param_T[:3], 2, 2), 0, "cam")
    before = node.warn.count.get(node._image_topic, 0)
    det, lo_reason, empty = _send_frame(real_node, img=img, info=info)
    _warned(node, node._image_topic, before, "image 2x2 is smaller than the 3x3")
    assert det.lidar_only and lo_reason.startswith("image 2x2 is smaller") and empty == ""
    assert node.pipeline_errors == 0
