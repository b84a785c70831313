"""ROS message <-> numpy / cmfiou_core types. No rclpy node code here; importable without a running ROS graph.

- PointCloud2 <-> numpy for any field layout (offsets, INT8..FLOAT64, padding, endianness, organised clouds),
  through numpy structured dtypes and ``np.frombuffer`` (zero-copy views where the layout allows). The decoders
  (PointCloud2 -> numpy, Image -> RGB) live in :mod:`cmfiou_core.msg_format`, shared with the offline bag reader, and
  are re-exported here.
- Image -> RGB uint8 (rgb8, bgr8, rgba8, bgra8, mono8, mono16; row padding; big-endian) with cv_bridge's semantics
  (mono16 -> round(x * 255 / 65535); float images such as 32FC1 refused: not a colour format), RGB -> Image.
- CameraInfo (+ LiDAR->camera extrinsic) -> :class:`cmfiou_core.calib.Calibration`, and the inverse for replay.
- :class:`cmfiou_core.types.Detections` -> vision_msgs/Detection3DArray, the per-detection scores message,
  visualization_msgs/MarkerArray, the per-frame timings message.

Every validation failure raises :class:`MessageError` (a ``ValueError``) whose text names the field and the problem.
"""
from __future__ import annotations

import array
from typing import Dict, Optional

import numpy as np

from cmfiou_core.calib import Calibration, CalibrationError
from cmfiou_core.geometry.boxes import boxes_to_corners_3d
from cmfiou_core.geometry.rotation import (matrix_to_quaternion, quaternion_to_matrix,  # noqa: F401 (API)
                                          quaternion_to_yaw, yaw_to_quaternion)
from cmfiou_core.msg_format import (INTENSITY_NAMES, POINTFIELD_DTYPES, SUPPORTED_ENCODINGS,  # noqa: F401 (API)
                                    MessageError, cloud_dtype, image_to_rgb, pointcloud2_to_structured,
                                    pointcloud2_to_xyzi)

__all__ = [
    "MessageError", "POINTFIELD_DTYPES", "cloud_dtype", "pointcloud2_to_structured", "pointcloud2_to_xyzi",
    "array_to_pointcloud2", "xyzi_to_pointcloud2", "image_to_rgb", "rgb_to_image", "extrinsic_matrix",
    "camera_info_to_calibration", "calibration_to_camera_info", "yaw_to_quaternion", "quaternion_to_yaw",
    "detections_to_detection3d_array", "detections_to_markers", "detections_to_scores_msg",
    "timings_to_msg", "stamp_to_ns", "ns_to_stamp",
]


_NP_TO_POINTFIELD = {np.dtype(v).newbyteorder("<").str: k for k, v in POINTFIELD_DTYPES.items()}
_NP_TO_POINTFIELD.update({"|i1": 1, "|u1": 2})


# ------------------------------------------------------------------------------------------------ stamps
def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int):
    from builtin_interfaces.msg import Time

    ns = int(ns)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _set_bytes(msg, attr: str, buf) -> None:
    """Fast assignment of a uint8[] field (the array.array path of the generated setter)."""
    if isinstance(buf, np.ndarray):
        buf = np.ascontiguousarray(buf).view(np.uint8).reshape(-1)
        a = array.array("B")
        a.frombytes(buf.data)
    else:
        a = array.array("B", bytes(buf))
    setattr(msg, attr, a)


# ------------------------------------------------------------------------------------------------ PointCloud2
def array_to_pointcloud2(arr: np.ndarray, stamp_ns: int = 0, frame_id: str = "", height: int = 1):
    """Structured numpy array -> PointCloud2 (little endian, dense layout, the array's own field offsets)."""
    from sensor_msgs.msg import PointCloud2, PointField

    if arr.dtype.names is None:
        raise MessageError("array_to_pointcloud2 needs a structured array")
    n = arr.shape[0] if arr.ndim else 0
    if height < 1 or n % height:
        raise MessageError(f"{n} points do not form {height} rows")
    fields = []
    for name in arr.dtype.names:
        dt, off = arr.dtype.fields[name][:2]
        count = 1
        if dt.subdtype:
            dt, shape = dt.subdtype
            count = int(np.prod(shape))
        key = dt.newbyteorder("<").str if dt.byteorder not in ("|",) else dt.str
        if key not in _NP_TO_POINTFIELD:
            raise MessageError(f"field {name!r}: dtype {dt} has no PointField datatype")
        fields.append(PointField(name=name, offset=int(off), datatype=_NP_TO_POINTFIELD[key], count=count))
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    msg = PointCloud2()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height = int(height)
    msg.width = n // height
    msg.fields = fields
    msg.is_bigendian = False
    msg.point_step = int(arr.dtype.itemsize)
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = bool(n == 0 or all(np.isfinite(le[c]).all() for c in ("x", "y", "z") if c in arr.dtype.names))
    _set_bytes(msg, "data", np.ascontiguousarray(le).view(np.uint8).reshape(-1))
    return msg


XYZI_DTYPE = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4,
                       "offsets": [0, 4, 8, 12], "itemsize": 16})


def xyzi_to_pointcloud2(points: np.ndarray, stamp_ns: int = 0, frame_id: str = "velodyne"):
    """(N, >=4) float array x, y, z, intensity -> PointCloud2 with four float32 fields (16 bytes per point)."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] < 4:
        raise MessageError(f"points must be (N, 4), got {pts.shape}")
    pts = np.ascontiguousarray(pts[:, :4], dtype="<f4")
    return array_to_pointcloud2(pts.view(XYZI_DTYPE).reshape(-1), stamp_ns, frame_id)


# ------------------------------------------------------------------------------------------------ Image
def rgb_to_image(rgb: np.ndarray, stamp_ns: int = 0, frame_id: str = "camera", encoding: str = "rgb8"):
    """(H, W, 3) uint8 RGB -> sensor_msgs/Image (rgb8 or bgr8, no padding)."""
    from sensor_msgs.msg import Image

    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise MessageError(f"expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
    if encoding == "bgr8":
        img = img[:, :, ::-1]
    elif encoding != "rgb8":
        raise MessageError(f"rgb_to_image writes rgb8 or bgr8, not {encoding!r}")
    msg = Image()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(img.shape[0]), int(img.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    _set_bytes(msg, "data", np.ascontiguousarray(img))
    return msg


# ------------------------------------------------------------------------------------------------ calibration
def extrinsic_matrix(values) -> np.ndarray:
    """LiDAR->camera-optical extrinsic from a parameter: 16 numbers (row-major 4x4), 12 (3x4), or 7 numbers
    ``x, y, z, qx, qy, qz, qw`` (the transform that maps LiDAR points into the camera frame). Returns 4x4."""
    v = np.asarray(list(values), np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise MessageError("extrinsic contains NaN or inf")
    T = np.eye(4)
    if v.size == 16:
        T = v.reshape(4, 4).copy()
        if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-6):
            raise MessageError(f"4x4 extrinsic: last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    elif v.size == 12:
        T[:3] = v.reshape(3, 4)
    elif v.size == 7:
        T[:3, :3] = quaternion_to_matrix(v[3:], error=MessageError)
        T[:3, 3] = v[:3]
    else:
        raise MessageError(f"extrinsic must have 16 (4x4), 12 (3x4) or 7 (xyz + quaternion) numbers, got {v.size}")
    err = np.abs(T[:3, :3] @ T[:3, :3].T - np.eye(3)).max()
    if err > 1e-3:
        raise MessageError(f"extrinsic rotation is not orthonormal (|R R^T - I| = {err:.3g})")
    return T


def transform_msg_to_matrix(tf) -> np.ndarray:
    """geometry_msgs/Transform (or TransformStamped) -> 4x4."""
    t = getattr(tf, "transform", tf)
    return extrinsic_matrix([t.translation.x, t.translation.y, t.translation.z,
                             t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w])


def matrix_to_transform_msg(T: np.ndarray, stamp_ns: int, parent: str, child: str):
    """4x4 -> geometry_msgs/TransformStamped (header.frame_id = parent, child_frame_id = child)."""
    from geometry_msgs.msg import TransformStamped

    T = np.asarray(T, np.float64)
    m = TransformStamped()
    m.header.stamp = ns_to_stamp(stamp_ns)
    m.header.frame_id = parent
    m.child_frame_id = child
    m.transform.translation.x, m.transform.translation.y, m.transform.translation.z = (float(x) for x in T[:3, 3])
    q = matrix_to_quaternion(T[:3, :3])
    m.transform.rotation.x, m.transform.rotation.y, m.transform.rotation.z, m.transform.rotation.w = q
    return m


def camera_info_to_calibration(msg, T_lidar_to_cam) -> Calibration:
    """CameraInfo (P, R, width, height) + 4x4/3x4 LiDAR->camera-optical extrinsic -> Calibration.

    Raises MessageError when the CameraInfo is unusable (zero size, wrong P/R length, zero or non-finite P, ...).
    """
    w, h = int(msg.width), int(msg.height)
    if w <= 0 or h <= 0:
        raise MessageError(f"CameraInfo size must be positive, got {w}x{h}")
    P = np.asarray(msg.p, np.float64).reshape(-1)
    if P.size != 12:
        raise MessageError(f"CameraInfo.p must have 12 entries, got {P.size}")
    K = np.asarray(msg.k, np.float64).reshape(-1)
    if not np.all(np.isfinite(P)) or not np.all(np.isfinite(K)):
        raise MessageError("CameraInfo.p or .k contains NaN or inf")
    if np.allclose(P, 0) and (K.size != 9 or np.allclose(K, 0)):
        raise MessageError("CameraInfo.p and .k are all zero (uncalibrated camera?)")
    R = np.asarray(msg.r, np.float64).reshape(-1)
    if R.size != 9:
        raise MessageError(f"CameraInfo.r must have 9 entries, got {R.size}")
    try:  # P all zero: drivers that publish only K (rectified images assumed) -> P = [K | 0]
        return Calibration.from_camera_info(P.reshape(3, 4), w, h, T_lidar_to_cam, R_rect=R.reshape(3, 3),
                                            K=K.reshape(3, 3) if K.size == 9 else None)
    except CalibrationError as e:
        raise MessageError(f"CameraInfo: {e}") from None


def calibration_to_camera_info(calib: Calibration, stamp_ns: int = 0, frame_id: str = "camera",
                               width: Optional[int] = None, height: Optional[int] = None):
    """Calibration -> CameraInfo (P = P2, R = R0_rect, K = P2[:3, :3], no distortion: images are rectified)."""
    from sensor_msgs.msg import CameraInfo

    w = width if width is not None else calib.image_width
    h = height if height is not None else calib.image_height
    if w is None or h is None:
        raise MessageError("calibration_to_camera_info needs the image size")
    m = CameraInfo()
    m.header.stamp = ns_to_stamp(stamp_ns)
    m.header.frame_id = frame_id
    m.width, m.height = int(w), int(h)
    m.distortion_model = "plumb_bob"
    m.d = [0.0] * 5
    m.k = [float(x) for x in calib.P2[:, :3].reshape(-1)]
    m.r = [float(x) for x in calib.R0_rect.reshape(-1)]
    m.p = [float(x) for x in calib.P2.reshape(-1)]
    return m


# ------------------------------------------------------------------------------------------------ detections
_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4],
                   [0, 4], [1, 5], [2, 6], [3, 7]])
# colours as RViz' vision_msgs plugin: car orange, pedestrian blue, cyclist yellow, other grey
CLASS_COLORS = {"Car": (1.0, 0.5, 0.0), "Pedestrian": (0.0, 0.4, 1.0), "Cyclist": (1.0, 0.9, 0.0)}


def _header(stamp_ns: int, frame_id: str):
    from std_msgs.msg import Header

    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


def detections_to_detection3d_array(det, header=None):
    """Detections -> vision_msgs/Detection3DArray.

    header: the input LiDAR header (stamp and frame_id unchanged); default built from ``det.stamp_ns/frame_id``.
    Per detection: ``results[0].hypothesis.class_id`` = class name, ``score`` = the rectified score,
    ``results[0].pose.pose`` = ``bbox.center`` (box centre, yaw quaternion about +z), ``bbox.size`` = (dx, dy, dz),
    ``id`` = "" (no tracking).
    """
    from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

    if header is None:
        header = _header(det.stamp_ns, det.frame_id)
    out = Detection3DArray()
    out.header = header
    names = det.names
    boxes = det.boxes.astype(np.float64)
    scores = det.scores.astype(np.float64)
    dets = []
    for k in range(len(det)):
        x, y, z, dx, dy, dz, yaw = (float(v) for v in boxes[k])
        d = Detection3D()
        d.header = header
        d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.center.position.z = x, y, z
        q = yaw_to_quaternion(yaw)
        o = d.bbox.center.orientation
        o.x, o.y, o.z, o.w = q
        d.bbox.size.x, d.bbox.size.y, d.bbox.size.z = dx, dy, dz
        h = ObjectHypothesisWithPose()
        h.hypothesis.class_id = names[k]
        h.hypothesis.score = float(scores[k])
        h.pose.pose = d.bbox.center
        d.results = [h]
        dets.append(d)
    out.detections = dets
    return out


def detections_to_scores_msg(det, header=None, score_mode: Optional[str] = None):
    """Detections -> cmfiou_ros/DetectionScores, index-aligned with Detection3DArray.detections (same header).

    ``score_mode``: how ``score`` was computed (one of the message's SCORE_MODE_* constants: "cls", "rectified",
    "add"); default ``det.score_mode`` (the model config's ``post_processing.score_mode``). iou_score stays NaN when
    the model has no IoU branch.
    """
    from cmfiou_ros.msg import DetectionScores

    if header is None:
        header = _header(det.stamp_ns, det.frame_id)
    m = DetectionScores()
    m.header = header
    m.class_id = list(det.names)
    m.cls_score = det.cls_scores.astype(np.float32).tolist()
    m.iou_score = det.iou_scores.astype(np.float32).tolist()
    m.score = det.scores.astype(np.float32).tolist()
    mode = str(score_mode or getattr(det, "score_mode", "") or "")
    known = {getattr(DetectionScores, c) for c in dir(DetectionScores) if c.startswith("SCORE_MODE_")}
    if mode not in known:
        raise ValueError(f"score_mode {mode!r} is not one of DetectionScores' {sorted(known)}")
    m.score_mode = mode
    m.lidar_only = bool(det.lidar_only)
    return m


def timings_to_msg(timings_ms: Dict[str, float], header=None, total_ms: float = 0.0, input_age_ms: float = 0.0,
                   dropped_frames: int = 0):
    """Per-stage timings (ordered dict name -> ms) -> cmfiou_ros/FrameTimings."""
    from cmfiou_ros.msg import FrameTimings, StageTiming

    m = FrameTimings()
    if header is not None:
        m.header = header
    m.stages = [StageTiming(stage=str(k), ms=float(v)) for k, v in timings_ms.items()]
    m.total_ms = float(total_ms)
    m.input_age_ms = float(input_age_ms)
    m.dropped_frames = int(max(0, min(dropped_frames, 2**32 - 1)))
    return m


def detections_to_markers(det, header=None, ns: str = "cmfiou", line_width: float = 0.08, text_size: float = 0.8,
                          lifetime_s: float = 0.0):
    """Detections -> MarkerArray: DELETEALL first (stale boxes vanish), then per detection a LINE_LIST box
    (12 edges) and a TEXT_VIEW_FACING label ``"<class> <score>"`` above it. Marker ids: 2k box, 2k+1 text."""
    from builtin_interfaces.msg import Duration
    from geometry_msgs.msg import Point
    from visualization_msgs.msg import Marker, MarkerArray

    if header is None:
        header = _header(det.stamp_ns, det.frame_id)
    out = MarkerArray()
    clear = Marker()
    clear.header = header
    clear.ns = ns
    clear.action = Marker.DELETEALL
    markers = [clear]
    if len(det):
        corners = boxes_to_corners_3d(np.asarray(det.boxes, np.float64).reshape(-1, 7))
        names = det.names
        life = Duration(sec=int(lifetime_s), nanosec=int((lifetime_s % 1) * 1e9))
        for k in range(len(det)):
            color = CLASS_COLORS.get(names[k], (0.6, 0.6, 0.6))
            m = Marker()
            m.header = header
            m.ns = ns
            m.id = 2 * k
            m.type = Marker.LINE_LIST
            m.action = Marker.ADD
            m.pose.orientation.w = 1.0
            m.scale.x = float(line_width)
            m.color.r, m.color.g, m.color.b, m.color.a = color[0], color[1], color[2], 1.0
            m.lifetime = life
            m.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in corners[k][_EDGES.reshape(-1)]]
            t = Marker()
            t.header = header
            t.ns = ns
            t.id = 2 * k + 1
            t.type = Marker.TEXT_VIEW_FACING
            t.action = Marker.ADD
            t.pose.position.x = float(det.boxes[k, 0])
            t.pose.position.y = float(det.boxes[k, 1])
            t.pose.position.z = float(det.boxes[k, 2] + det.boxes[k, 5] / 2 + 0.5)
            t.pose.orientation.w = 1.0
            t.scale.z = float(text_size)
            t.color.r, t.color.g, t.color.b, t.color.a = color[0], color[1], color[2], 1.0
            t.lifetime = life
            t.text = f"{names[k]} {float(det.scores[k]):.2f}"
            markers += [m, t]
    out.markers = markers
    return out
