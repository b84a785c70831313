"""rosbag2 files of KITTI frames with ``rosbags`` (pure Python; no rclpy): writing and strict reading.

Bag layout (one stamp per frame for every message of that frame; stamps ``t0 + k * 100 ms``; the bag log time of
each message equals its header stamp). Topic and frame names equal ``cmfiou_ros.replay_node``'s defaults, so a bag
replays into the detector node with its default parameters:

==========================================  =================================  ======================================
topic                                       type                               content
==========================================  =================================  ======================================
``/kitti/velo/pointcloud``                  sensor_msgs/msg/PointCloud2        x, y, z, intensity float32 (16 B/pt),
                                                                               the .bin bytes verbatim, ``velo_link``
``/kitti/camera_color_left/image_raw``      sensor_msgs/msg/Image              rgb8 (decoded PNG), camera frame
``/kitti/camera_color_left/camera_info``    sensor_msgs/msg/CameraInfo         P = P2, R = R0_rect, K = P2[:, :3], D 0
``/cmfiou/lidar_to_camera``                 geometry_msgs/msg/TransformStamped camera_color_left_optical <- velo_link
                                                                               = Tr_velo_to_cam (per frame)
``/tf_static``                              tf2_msgs/msg/TFMessage             same transform, written when it changes
``/kitti/ground_truth``                     vision_msgs/msg/Detection3DArray   label_2 objects (no DontCare) as LiDAR
                                                                               boxes; class_id = KITTI type; id = line
``/kitti/frame_meta``                       std_msgs/msg/String                JSON {seq, index, stamp_ns, label_2
                                                                               (verbatim text or null), calib (KITTI
                                                                               object calib text), image_width/height}
``/cmfiou/frame_map``                       std_msgs/msg/String                JSON (at t0) {"columns": [seq, index,
                                                                               stamp_ns, camera], "frames": [...]}
==========================================  =================================  ======================================

The calibration is recoverable two ways: exactly from ``/kitti/frame_meta`` (the KITTI text), or ROS-style from
CameraInfo + the TransformStamped (``Calibration.from_camera_info(P, w, h, T, R)``), which is what the detector node
uses. KITTI's Tr_velo_to_cam is not exactly orthonormal (~5e-8, 7-digit text) and no quaternion can carry that, so
every evaluation path (``cmfiou_core.tools.evaluate``, ``cmfiou-bag-eval`` offline and node) gives the pipeline
:func:`ros_calibration` -- bit for bit what the node rebuilds from CameraInfo + TransformStamped -- and a frame gets
one answer whichever path it takes. The KITTI result lines are written with the exact calibration.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from cmfiou_core.calib import Calibration
from cmfiou_core.geometry.rotation import matrix_to_quaternion, nearest_rotation, yaw_to_quaternion
from cmfiou_core.msg_format import MessageError, pointcloud2_to_xyzi
from cmfiou_core.msg_format import image_to_rgb as _image_to_rgb

TOPICS = {
    "cloud": "/kitti/velo/pointcloud",
    "image": "/kitti/camera_color_left/image_raw",
    "info": "/kitti/camera_color_left/camera_info",
    "extrinsic": "/cmfiou/lidar_to_camera",
    "tf_static": "/tf_static",
    "gt": "/kitti/ground_truth",
    "meta": "/kitti/frame_meta",
    "frame_map": "/cmfiou/frame_map",
}
TYPES = {
    "cloud": "sensor_msgs/msg/PointCloud2",
    "image": "sensor_msgs/msg/Image",
    "info": "sensor_msgs/msg/CameraInfo",
    "extrinsic": "geometry_msgs/msg/TransformStamped",
    "tf_static": "tf2_msgs/msg/TFMessage",
    "gt": "vision_msgs/msg/Detection3DArray",
    "meta": "std_msgs/msg/String",
    "frame_map": "std_msgs/msg/String",
}
LIDAR_FRAME = "velo_link"
CAMERA_FRAME = "camera_color_left_optical"
PERIOD_NS = 100_000_000
DEFAULT_T0_NS = 1_000_000_000  # non-zero: zero stamps break time synchronisers


class BagError(RuntimeError):
    """Unreadable/corrupt bag, missing or mistyped topic; the message names the bag and the topic."""


# ------------------------------------------------------------------------------------------------ type store
def typestore():
    """ROS 2 Kilted types + vision_msgs and cmfiou_ros types registered from the installed .msg files
    (:func:`cmfiou_core.resources.msg_dir`: the installed vision_msgs, else our compat copy; our msg/)."""
    from cmfiou_core import resources
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    add = {}
    for pkg in ("vision_msgs", "cmfiou_ros"):
        for f in sorted(resources.msg_dir(pkg).glob("*.msg")):
            add.update(get_types_from_msg(f.read_text(), f"{pkg}/msg/{f.stem}"))
    ts.register(add)
    return ts


# ------------------------------------------------------------------------------------------------ sources
@dataclass
class SourceFrame:
    index: str
    cloud_bytes: bytes  # (N, 4) float32 x y z intensity, little endian
    image: Optional[np.ndarray]  # (H, W, 3) uint8
    calib: Calibration
    calib_text: str
    label_text: Optional[str]


def calibration_from_object_text(text: str, source: str, width=None, height=None) -> Calibration:
    from cmfiou_core.calib import CalibrationError

    kv = Calibration._parse_kv(text, source)
    missing = [k for k in ("P2", "R0_rect", "Tr_velo_to_cam") if k not in kv]
    if missing:
        raise CalibrationError(f"{source}: missing {', '.join(missing)}")
    return Calibration(kv["P2"], kv["R0_rect"], kv["Tr_velo_to_cam"], width, height)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _read_bin(path: Path) -> bytes:
    b = path.read_bytes()
    if len(b) % 16:
        raise BagError(f"{path}: size {len(b)} is not a multiple of 16 (N x 4 float32 expected)")
    return b


def kitti_object_frames(root: Union[str, Path], ids: Optional[Sequence[str]] = None) -> Iterator[SourceFrame]:
    """``root`` = a KITTI object split folder (``training/`` with velodyne, image_2, calib[, label_2])."""
    root = Path(root)
    for sub in ("velodyne", "image_2", "calib"):
        if not (root / sub).is_dir():
            raise BagError(f"{root}: not a KITTI object split folder (missing {sub}/)")
    if ids is None:
        ids = sorted(p.stem for p in (root / "velodyne").glob("*.bin"))
    for i in ids:
        ctext = (root / "calib" / f"{i}.txt").read_text()
        img = _read_png(root / "image_2" / f"{i}.png")
        calib = calibration_from_object_text(ctext, str(root / "calib" / f"{i}.txt"), img.shape[1], img.shape[0])
        lp = root / "label_2" / f"{i}.txt"
        yield SourceFrame(i, _read_bin(root / "velodyne" / f"{i}.bin"), img, calib, ctext,
                          lp.read_text() if lp.is_file() else None)


def kitti_raw_frames(drive_dir: Union[str, Path], cam: int = 2) -> Iterator[SourceFrame]:
    """``drive_dir`` = ``<date>/<date>_drive_NNNN_sync``; calibration from ``<date>/calib_*.txt``."""
    d = Path(drive_dir)
    vel = d / "velodyne_points" / "data"
    imd = d / f"image_{cam:02d}" / "data"
    if not vel.is_dir():
        raise BagError(f"{d}: not a KITTI raw drive folder (missing velodyne_points/data)")
    calib = Calibration.from_kitti_raw_dir(d.parent, cam)
    ctext = calib.to_kitti_object_text()
    for p in sorted(vel.glob("*.bin")):
        ip = imd / f"{p.stem}.png"
        img = _read_png(ip) if ip.is_file() else None
        c = calib.with_image_size(img.shape[1], img.shape[0]) if img is not None else calib
        yield SourceFrame(p.stem, _read_bin(p), img, c, ctext, None)


# ------------------------------------------------------------------------------------------------ message builders
def _rot_to_quat(R: np.ndarray):
    """Rotation matrix -> (x, y, z, w) of its nearest rotation (orthonormalised first: KITTI's text matrices are not
    exactly orthonormal)."""
    return matrix_to_quaternion(nearest_rotation(R))


def ros_calibration(calib: Calibration) -> Calibration:
    """``calib`` as the bag's CameraInfo + TransformStamped carry it, which is what the detector node rebuilds: P2 and
    R0_rect exact, Tr_velo_to_cam's rotation replaced by the rotation of its quaternion (the nearest rotation, as
    ``cmfiou_ros.convert`` computes it from the message; ~5e-8 from KITTI's text), translation exact."""
    from cmfiou_core.calib import transform_from_tf

    Tr = np.asarray(calib.Tr_velo_to_cam, np.float64)
    T = transform_from_tf(Tr[:, 3], _rot_to_quat(Tr[:, :3]))
    return Calibration(calib.P2, calib.R0_rect, T[:3], calib.image_width, calib.image_height)


class _Msgs:
    def __init__(self, ts):
        self.ts = ts
        T = ts.types
        self.T = T

    def header(self, stamp_ns: int, frame: str):
        T = self.T
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=int(stamp_ns // 10**9),
                                                                              nanosec=int(stamp_ns % 10**9)),
                                        frame_id=frame)

    def cloud(self, data: bytes, stamp_ns: int):
        T = self.T
        PF = T["sensor_msgs/msg/PointField"]
        n = len(data) // 16
        fields = [PF(name=nm, offset=4 * k, datatype=7, count=1) for k, nm in enumerate(("x", "y", "z", "intensity"))]
        return T["sensor_msgs/msg/PointCloud2"](header=self.header(stamp_ns, LIDAR_FRAME), height=1, width=n,
                                                fields=fields, is_bigendian=False, point_step=16, row_step=16 * n,
                                                data=np.frombuffer(data, np.uint8), is_dense=True)

    def image(self, rgb: np.ndarray, stamp_ns: int):
        h, w, _ = rgb.shape
        return self.T["sensor_msgs/msg/Image"](header=self.header(stamp_ns, CAMERA_FRAME), height=h, width=w,
                                               encoding="rgb8", is_bigendian=0, step=3 * w,
                                               data=np.frombuffer(rgb.tobytes(), np.uint8))

    def camera_info(self, calib: Calibration, w: int, h: int, stamp_ns: int):
        T = self.T
        roi = T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        return T["sensor_msgs/msg/CameraInfo"](header=self.header(stamp_ns, CAMERA_FRAME), height=h, width=w,
                                               distortion_model="plumb_bob", d=np.zeros(5),
                                               k=calib.P2[:, :3].reshape(-1).copy(), r=calib.R0_rect.reshape(-1).copy(),
                                               p=calib.P2.reshape(-1).copy(), binning_x=0, binning_y=0, roi=roi)

    def transform(self, calib: Calibration, stamp_ns: int):
        T = self.T
        Tr = calib.Tr_velo_to_cam
        x, y, z, w = _rot_to_quat(Tr[:, :3])
        tf = T["geometry_msgs/msg/Transform"](
            translation=T["geometry_msgs/msg/Vector3"](x=float(Tr[0, 3]), y=float(Tr[1, 3]), z=float(Tr[2, 3])),
            rotation=T["geometry_msgs/msg/Quaternion"](x=x, y=y, z=z, w=w))
        return T["geometry_msgs/msg/TransformStamped"](header=self.header(stamp_ns, CAMERA_FRAME),
                                                       child_frame_id=LIDAR_FRAME, transform=tf)

    def gt(self, label_text: Optional[str], calib: Calibration, stamp_ns: int, source: str):
        from cmfiou_core.geometry.boxes import boxes3d_kitti_camera_to_lidar

        from .kitti_io import parse_kitti_text

        T = self.T
        hdr = self.header(stamp_ns, LIDAR_FRAME)
        dets = []
        if label_text:
            a = parse_kitti_text(label_text, source)
            keep = np.nonzero(a["name"] != "DontCare")[0]
            if len(keep):
                cam = np.c_[a["location"][keep], a["dimensions"][keep], a["rotation_y"][keep]]
                lid = boxes3d_kitti_camera_to_lidar(cam, calib)
                for k, b in zip(keep, lid):
                    q = T["geometry_msgs/msg/Quaternion"](**dict(zip("xyzw", yaw_to_quaternion(float(b[6])))))
                    pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](
                        x=float(b[0]), y=float(b[1]), z=float(b[2])), orientation=q)
                    hyp = T["vision_msgs/msg/ObjectHypothesisWithPose"](
                        hypothesis=T["vision_msgs/msg/ObjectHypothesis"](class_id=str(a["name"][k]), score=1.0),
                        pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)))
                    bbox = T["vision_msgs/msg/BoundingBox3D"](center=pose, size=T["geometry_msgs/msg/Vector3"](
                        x=float(b[3]), y=float(b[4]), z=float(b[5])))
                    dets.append(T["vision_msgs/msg/Detection3D"](header=hdr, results=[hyp], bbox=bbox, id=str(k)))
        return T["vision_msgs/msg/Detection3DArray"](header=hdr, detections=dets)

    def string(self, s: str):
        return self.T["std_msgs/msg/String"](data=s)


# ------------------------------------------------------------------------------------------------ writer
def write_bag(out: Union[str, Path], frames: Iterable[SourceFrame], storage: str = "mcap",
              t0_ns: int = DEFAULT_T0_NS, period_ns: int = PERIOD_NS) -> Dict[str, int]:
    """Write frames into a new rosbag2 folder ``out`` (must not exist). Returns message counts per topic."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    out = Path(out)
    if out.exists():
        raise BagError(f"{out} exists: choose a new output path")
    frames = list(frames)
    ts = typestore()
    M = _Msgs(ts)
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    counts = {k: 0 for k in TOPICS}
    fmap = [[k, f.index, t0_ns + k * period_ns, f.image is not None] for k, f in enumerate(frames)]
    with Writer(out, version=9, storage_plugin=plugin) as w:
        conns = {k: w.add_connection(TOPICS[k], TYPES[k], typestore=ts) for k in TOPICS}

        def put(key, msg, t):
            w.write(conns[key], t, ts.serialize_cdr(msg, TYPES[key]))
            counts[key] += 1

        put("frame_map", M.string(json.dumps({"columns": ["seq", "index", "stamp_ns", "camera"], "frames": fmap,
                                              "period_ns": period_ns, "done": True})), t0_ns)
        last_tf = None
        for k, f in enumerate(frames):
            t = t0_ns + k * period_ns
            tf = M.transform(f.calib, t)
            key_tf = f.calib.Tr_velo_to_cam.tobytes()
            if key_tf != last_tf:
                put("tf_static", ts.types["tf2_msgs/msg/TFMessage"](transforms=[tf]), t)
                last_tf = key_tf
            put("extrinsic", tf, t)
            if f.image is not None:
                h, wd = f.image.shape[:2]
                put("info", M.camera_info(f.calib, wd, h, t), t)
                put("image", M.image(f.image, t), t)
            put("cloud", M.cloud(f.cloud_bytes, t), t)
            if f.label_text is not None:
                put("gt", M.gt(f.label_text, f.calib, t, f"{f.index}/label_2"), t)
            meta = {"seq": k, "index": f.index, "stamp_ns": t, "label_2": f.label_text, "calib": f.calib_text,
                    "image_width": None if f.image is None else int(f.image.shape[1]),
                    "image_height": None if f.image is None else int(f.image.shape[0])}
            put("meta", M.string(json.dumps(meta)), t)
    from . import mcap_crc

    for f in sorted(out.glob("*.mcap")):  # the rosbags writer leaves every CRC at 0
        mcap_crc.fill(f)
    return {TOPICS[k]: v for k, v in counts.items() if v}


# ------------------------------------------------------------------------------------------------ reader
@dataclass
class BagFrame:
    seq: int
    index: str
    stamp_ns: int
    points: np.ndarray  # (N, 4) float32
    image: Optional[np.ndarray]
    calib: Optional[Calibration]
    label_text: Optional[str]


def open_bag(path: Union[str, Path]):
    from rosbags.highlevel import AnyReader

    from . import mcap_crc

    path = Path(path)
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    for f in ([path] if path.suffix == ".mcap" else sorted(path.glob("*.mcap"))):  # sqlite3 has no CRC
        try:
            mcap_crc.verify(f)
        except mcap_crc.McapCrcError as e:
            raise BagError(f"cannot open bag: {e}") from None
    try:
        r = AnyReader([path], default_typestore=typestore())
        r.open()
    except Exception as e:  # rosbags raises several types for corrupt metadata/storage
        raise BagError(f"{path}: cannot open bag: {type(e).__name__}: {e}") from None
    return r


def bag_topics(reader) -> Dict[str, str]:
    return {c.topic: c.msgtype for c in reader.connections}


def iter_messages(reader, topics: Dict[str, str], path) -> Iterator:
    """Yield (topic, log_time_ns, msg) for the given topic -> expected type map; errors name the topic."""
    have = bag_topics(reader)
    for t, ty in topics.items():
        if t not in have:
            raise BagError(f"{path}: topic {t} not in the bag (topics: {', '.join(sorted(have)) or 'none'})")
        if have[t] != ty:
            raise BagError(f"{path}: topic {t} has type {have[t]}, expected {ty}")
    conns = [c for c in reader.connections if c.topic in topics]
    topic = None
    try:
        for c, t, raw in reader.messages(connections=conns):
            topic = c.topic
            yield c.topic, t, reader.deserialize(raw, c.msgtype)
    except BagError:
        raise
    except Exception as e:
        raise BagError(f"{path}: corrupt or truncated bag while reading {topic or 'the first message'}: "
                       f"{type(e).__name__}: {e}") from None


def _stamp(h) -> int:
    return int(h.stamp.sec) * 10**9 + int(h.stamp.nanosec)


def cloud_to_xyzi(msg, topic: str) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity of a bag's PointCloud2, decoded as the detector node decodes it
    (``msg_format.pointcloud2_to_xyzi``: any field layout, non-finite rows dropped)."""
    try:
        return pointcloud2_to_xyzi(msg, allow_empty=True)[0]
    except MessageError as e:
        raise BagError(f"{topic}: {e}") from None


def image_to_rgb(msg, topic: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a bag's Image, decoded as the detector node decodes it (``msg_format.image_to_rgb``)."""
    try:
        return _image_to_rgb(msg)
    except MessageError as e:
        raise BagError(f"{topic}: {e}") from None


def read_frames(path: Union[str, Path], need_image: bool = False) -> List[BagFrame]:
    """All frames of a bag written by :func:`write_bag` (cloud + image + exact calib/labels from frame_meta).

    Reads everything before returning (a corrupt bag raises :class:`BagError` and no frame is returned).
    """
    r = open_bag(path)
    try:
        topics = {TOPICS["cloud"]: TYPES["cloud"], TOPICS["meta"]: TYPES["meta"]}
        have = bag_topics(r)
        if TOPICS["image"] in have or need_image:
            topics[TOPICS["image"]] = TYPES["image"]
        clouds, images, metas = {}, {}, {}
        for topic, _, msg in iter_messages(r, topics, path):
            if topic == TOPICS["cloud"]:
                clouds[_stamp(msg.header)] = cloud_to_xyzi(msg, topic).copy()
            elif topic == TOPICS["image"]:
                images[_stamp(msg.header)] = image_to_rgb(msg, topic).copy()
            else:
                try:
                    m = json.loads(msg.data)
                    metas[int(m["stamp_ns"])] = m
                except (ValueError, KeyError, TypeError) as e:
                    raise BagError(f"{path}: {topic}: invalid frame metadata JSON: {e}") from None
    finally:
        r.close()
    frames = []
    for seq, st in enumerate(sorted(clouds)):
        m = metas.get(st)
        if m is None:
            raise BagError(f"{path}: {TOPICS['meta']}: no frame metadata for the cloud stamped {st}")
        calib = calibration_from_object_text(m["calib"], f"{path}:{TOPICS['meta']}@{st}", m.get("image_width"),
                                             m.get("image_height")) if m.get("calib") else None
        frames.append(BagFrame(int(m.get("seq", seq)), str(m["index"]), st, clouds[st], images.get(st), calib,
                               m.get("label_2")))
    return frames
