"""cmfiou_ros.tf_buffer.TfBuffer (the TF fallback where tf2_ros is not installed) against independent references:
scipy's rotations and Slerp composed as 4x4 matrices, and tf2's documented semantics (chain walk, latest common
time, interpolation, extrapolation, the static cache, cache time, rejected transforms). Where tf2_ros is installed
the same transforms go into tf2_ros.Buffer too and both must give the same answers."""
import numpy as np
import pytest
from rosutil import require  # noqa: E402

require("geometry_msgs.msg")
from scipy.spatial.transform import Rotation, Slerp  # noqa: E402

from cmfiou_ros import convert as C  # noqa: E402
from cmfiou_ros.tf_buffer import (TfBuffer, TfConnectivityError, TfExtrapolationError, TfLookupError,  # noqa: E402
                                  make_tf_source)

S = 1_000_000_000


def tf_msg(parent, child, stamp_ns, xyz, quat_xyzw):
    from geometry_msgs.msg import TransformStamped

    m = TransformStamped()
    m.header.frame_id, m.child_frame_id = parent, child
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(int(stamp_ns), S)
    m.transform.translation.x, m.transform.translation.y, m.transform.translation.z = (float(v) for v in xyz)
    q = m.transform.rotation
    q.x, q.y, q.z, q.w = (float(v) for v in quat_xyzw)
    return m


def mat(xyz, quat_xyzw):
    """parent <- child as a 4x4 (scipy's quaternion convention is x, y, z, w)."""
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(quat_xyzw).as_matrix()
    T[:3, 3] = xyz
    return T


def got(buf, target, source, stamp=0):
    return C.transform_msg_to_matrix(buf.lookup(target, source, stamp))


RNG = np.random.default_rng(3)
LINKS = {  # child: (parent, xyz, quat): a robot with a LiDAR and a camera on a mast, all static
    "velo_link": ("base_link", [1.2, 0.1, 1.7], Rotation.from_euler("xyz", [0.01, -0.02, 0.3]).as_quat()),
    "mast": ("base_link", [0.3, 0.0, 1.2], Rotation.from_euler("xyz", [0.0, 0.1, -0.2]).as_quat()),
    "cam_link": ("mast", [0.2, -0.3, 0.4], Rotation.from_euler("xyz", [0.05, 0.0, 0.0]).as_quat()),
    "cam_optical": ("cam_link", [0.0, 0.0, 0.0], Rotation.from_euler("xyz", [-np.pi / 2, 0, -np.pi / 2]).as_quat()),
}


def robot(buf=None):
    buf = buf or TfBuffer()
    for child, (parent, xyz, q) in LINKS.items():
        assert buf.set_transform(tf_msg(parent, child, 5 * S, xyz, q), static=True) == ""
    return buf


def chain(frame):
    """root <- frame as a 4x4 from LINKS."""
    T = np.eye(4)
    while frame in LINKS:
        parent, xyz, q = LINKS[frame]
        T = mat(xyz, q) @ T
        frame = parent
    return T


@pytest.mark.parametrize("target,source", [("cam_optical", "velo_link"), ("velo_link", "cam_optical"),
                                           ("base_link", "cam_optical"), ("cam_optical", "base_link"),
                                           ("mast", "cam_optical"), ("cam_link", "mast")])
def test_static_chain_equals_composed_matrices(target, source):
    buf = robot()
    want = np.linalg.inv(chain(target)) @ chain(source)  # source points -> target frame
    for stamp in (0, 1, 123 * S):  # a static tree answers at any time
        np.testing.assert_allclose(got(buf, target, source, stamp), want, atol=1e-12)
    m = buf.lookup(target, source, 7 * S)
    assert (m.header.frame_id, m.child_frame_id, m.header.stamp.sec) == (target, source, 7)


def test_unknown_empty_and_unconnected_frames():
    buf = robot()
    buf.set_transform(tf_msg("odom", "other_base", S, [0, 0, 0], [0, 0, 0, 1]), static=True)
    with pytest.raises(TfLookupError, match="'velo_typo' does not exist"):
        buf.lookup("cam_optical", "velo_typo", 0)
    with pytest.raises(TfLookupError, match="empty"):
        buf.lookup("cam_optical", "", 0)
    with pytest.raises(TfConnectivityError, match="not connected"):
        buf.lookup("cam_optical", "other_base", 0)
    with pytest.raises(TfConnectivityError):
        buf.latest_common_time("cam_optical", "other_base")
    assert not buf.can_transform("cam_optical", "velo_typo") and buf.can_transform("cam_optical", "velo_link")
    np.testing.assert_array_equal(got(buf, "nowhere", "nowhere"), np.eye(4))  # identity even for unknown (tf2)
    assert "velo_link" in buf.frames() and "base_link" in buf.frames() and "velo_typo" not in buf.frames()


def test_a_loop_is_an_error_not_a_hang():
    buf = TfBuffer()
    buf.set_transform(tf_msg("a", "b", S, [1, 0, 0], [0, 0, 0, 1]), static=True)
    buf.set_transform(tf_msg("b", "a", S, [1, 0, 0], [0, 0, 0, 1]), static=True)
    buf.set_transform(tf_msg("c", "d", S, [1, 0, 0], [0, 0, 0, 1]), static=True)
    with pytest.raises(TfLookupError, match="loop"):
        buf.lookup("d", "a", 0)


def test_dynamic_interpolation_equals_scipy_slerp_and_lerp():
    buf = robot()
    r0, r1 = Rotation.from_euler("xyz", [0.1, 0.2, -0.4]), Rotation.from_euler("xyz", [-0.2, 0.1, 1.1])
    p0, p1 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.7])
    t0, t1 = 100 * S, 101 * S
    buf.set_transform(tf_msg("base_link", "velo_dyn", t1, p1, r1.as_quat()))  # arrival order does not matter
    buf.set_transform(tf_msg("base_link", "velo_dyn", t0, p0, r0.as_quat()))
    slerp = Slerp([0.0, 1.0], Rotation.concatenate([r0, r1]))
    for u in (0.0, 0.25, 0.5, 0.9, 1.0):
        stamp = t0 + int(u * S)
        link = np.eye(4)
        link[:3, :3] = slerp([u]).as_matrix()[0]
        link[:3, 3] = p0 + u * (p1 - p0)
        want = np.linalg.inv(chain("cam_optical")) @ link
        np.testing.assert_allclose(got(buf, "cam_optical", "velo_dyn", stamp), want, atol=1e-9)
    with pytest.raises(TfExtrapolationError, match="future"):
        buf.lookup("cam_optical", "velo_dyn", t1 + 1)
    with pytest.raises(TfExtrapolationError, match="past"):
        buf.lookup("cam_optical", "velo_dyn", t0 - 1)


def test_one_entry_answers_only_at_its_stamp_and_time_zero_is_the_latest_common_time():
    buf = robot()
    buf.set_transform(tf_msg("base_link", "velo_dyn", 50 * S, [1, 0, 0], [0, 0, 0, 1]))
    with pytest.raises(TfExtrapolationError, match="only"):
        buf.lookup("base_link", "velo_dyn", 50 * S + 1)
    np.testing.assert_allclose(got(buf, "base_link", "velo_dyn", 50 * S)[:3, 3], [1, 0, 0])
    # two dynamic links with newest stamps 50 s and 53 s: time 0 = 50 s, the value at 50 s
    buf.set_transform(tf_msg("cam_optical", "marker", 49 * S, [0, 0, 1], [0, 0, 0, 1]))
    buf.set_transform(tf_msg("cam_optical", "marker", 53 * S, [0, 0, 5], [0, 0, 0, 1]))
    assert buf.latest_common_time("marker", "velo_dyn") == 50 * S
    m = buf.lookup("marker", "velo_dyn", 0)
    assert m.header.stamp.sec == 50
    marker_at_50 = chain("cam_optical") @ mat([0, 0, 2], [0, 0, 0, 1])  # 1 + (50 - 49) / (53 - 49) * 4
    want = np.linalg.inv(marker_at_50) @ mat([1, 0, 0], [0, 0, 0, 1])
    np.testing.assert_allclose(C.transform_msg_to_matrix(m), want, atol=1e-12)
    assert buf.latest_common_time("cam_optical", "velo_link") == 0  # all static


def test_cache_time_and_time_jump_clear():
    buf = robot()
    buf.set_transform(tf_msg("base_link", "velo_dyn", 100 * S, [0, 0, 0], [0, 0, 0, 1]))
    buf.set_transform(tf_msg("base_link", "velo_dyn", 111 * S, [11, 0, 0], [0, 0, 0, 1]))
    assert "older than the 10 s cache" in buf.set_transform(tf_msg("base_link", "velo_dyn", 100 * S, [0, 0, 0],
                                                                    [0, 0, 0, 1]))
    buf.set_transform(tf_msg("base_link", "velo_dyn", 112 * S, [12, 0, 0], [0, 0, 0, 1]))  # prunes the 100 s entry
    with pytest.raises(TfExtrapolationError, match="past"):
        buf.lookup("base_link", "velo_dyn", 105 * S)
    buf.clear()  # what a clock jump back does: dynamic data gone, static kept
    with pytest.raises(TfConnectivityError):
        buf.lookup("base_link", "velo_dyn", 0)
    assert buf.can_transform("cam_optical", "velo_link")


def test_rejected_and_normalised_transforms():
    buf = TfBuffer()
    assert "both 'a'" in buf.set_transform(tf_msg("a", "a", S, [0, 0, 0], [0, 0, 0, 1]))
    assert "child_frame_id is empty" in buf.set_transform(tf_msg("a", "", S, [0, 0, 0], [0, 0, 0, 1]))
    assert "frame_id is empty" in buf.set_transform(tf_msg("", "b", S, [0, 0, 0], [0, 0, 0, 1]))
    assert "NaN" in buf.set_transform(tf_msg("a", "b", S, [np.nan, 0, 0], [0, 0, 0, 1]))
    assert "not normalised" in buf.set_transform(tf_msg("a", "b", S, [0, 0, 0], [0, 0, 0, 1.1]))
    assert buf.frames() == []
    q = Rotation.from_euler("z", 0.7).as_quat() * 1.004  # within tf2's tolerance: normalised
    assert buf.set_transform(tf_msg("/a", "b", S, [1, 2, 3], q), static=True) == ""  # leading '/' stripped
    np.testing.assert_allclose(got(buf, "a", "b"), mat([1, 2, 3], q / np.linalg.norm(q)), atol=1e-12)


def test_static_replaced_reparented_and_kind_switch():
    buf = TfBuffer()
    buf.set_transform(tf_msg("a", "b", S, [1, 0, 0], [0, 0, 0, 1]), static=True)
    buf.set_transform(tf_msg("a", "b", 2 * S, [2, 0, 0], [0, 0, 0, 1]), static=True)  # newer static replaces
    np.testing.assert_allclose(got(buf, "a", "b", 9 * S)[:3, 3], [2, 0, 0])
    buf.set_transform(tf_msg("a", "b", 3 * S, [3, 0, 0], [0, 0, 0, 1]))  # now dynamic: only at 3 s
    with pytest.raises(TfExtrapolationError):
        buf.lookup("a", "b", 9 * S)
    # the parent changes between two entries: between them the older entry holds (no interpolation across parents)
    buf.set_transform(tf_msg("c", "b", 5 * S, [5, 0, 0], [0, 0, 0, 1]))
    buf.set_transform(tf_msg("a", "c", S, [0, 0, 0], [0, 0, 0, 1]), static=True)
    np.testing.assert_allclose(got(buf, "a", "b", 4 * S)[:3, 3], [3, 0, 0])


def test_tf2_ros_is_first_choice_and_agrees_with_the_fallback():
    """Only where tf2_ros is installed (a real ROS): the node would use it; our buffer must give the same answers."""
    tf2_ros = pytest.importorskip("tf2_ros")
    import rclpy.time

    ours, theirs = robot(), tf2_ros.Buffer()
    for child, (parent, xyz, q) in LINKS.items():
        theirs.set_transform_static(tf_msg(parent, child, 5 * S, xyz, q), "test")
    r0, r1 = Rotation.from_euler("xyz", [0.1, 0.2, -0.4]), Rotation.from_euler("xyz", [-0.2, 0.1, 1.1])
    for stamp, p, r in ((100 * S, [1, 2, 0.5], r0), (101 * S, [1.5, 1, 0.7], r1)):
        m = tf_msg("base_link", "velo_dyn", stamp, p, r.as_quat())
        ours.set_transform(m)
        theirs.set_transform(m, "test")
    for target, source, stamp in (("cam_optical", "velo_link", 0), ("cam_optical", "velo_dyn", 100 * S + S // 3),
                                  ("velo_dyn", "mast", 0), ("base_link", "velo_dyn", 101 * S)):
        a = got(ours, target, source, stamp)
        b = C.transform_msg_to_matrix(theirs.lookup_transform(target, source, rclpy.time.Time(nanoseconds=stamp)))
        np.testing.assert_allclose(a, b, atol=1e-9)
    for target, source, stamp in (("cam_optical", "velo_typo", 0), ("cam_optical", "velo_dyn", 102 * S)):
        with pytest.raises(Exception):
            theirs.lookup_transform(target, source, rclpy.time.Time(nanoseconds=stamp))
        with pytest.raises((TfLookupError, TfExtrapolationError)):
            ours.lookup(target, source, stamp)


def test_make_tf_source_prefers_tf2_ros_when_importable():
    rclpy = require("rclpy")
    require("tf2_msgs.msg")
    import importlib.util

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node("tf_source_choice", context=ctx)
        src = make_tf_source(node)
        want = "tf2_ros" if importlib.util.find_spec("tf2_ros") is not None else "cmfiou_ros.tf_buffer"
        assert src.impl == want
        src.close()
        assert make_tf_source(node, prefer_tf2_ros=False).impl == "cmfiou_ros.tf_buffer"
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
