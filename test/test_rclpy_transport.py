"""A real KITTI frame (PointCloud2 + Image + CameraInfo) travels intact between two rclpy processes.

Two separate interpreters (``sys.executable``), real rclpy + Fast DDS with the project's SHM profile
(``config/fastdds_shm.xml``), a private ROS_DOMAIN_ID and unique topic names per test. The publisher waits for the
match (discovery is bimodal, ~0.1 s or ~3 s) and publishes once with TRANSIENT_LOCAL, so nothing depends on timing.
The receiver reports what it got; this process checks it against values it computes itself from the files.
"""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FRAME = "000008"

from rosutil import CHILD_EXCHANGE, require, run_children  # noqa: E402

require("rclpy")  # the children need it; importing here gives a clear skip (or, under CMFIOU_REQUIRE_ROS, a failure)

pytestmark = pytest.mark.ros


def run_pair(pub_script: str, sub_script: str, args: list, timeout: float = 90.0) -> tuple[dict, dict]:
    """Start subscriber and publisher processes together; return the JSON each prints on its last stdout line."""
    out = run_children({"subscriber": sub_script, "publisher": pub_script}, args, timeout)
    return out["publisher"], out["subscriber"]


# ---- child processes ---------------------------------------------------------------------------------------------
_COMMON = CHILD_EXCHANGE + r'''
import array
import numpy as np
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField

root, frame, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
TOPICS = {"cloud": (PointCloud2, prefix + "/points"), "image": (Image, prefix + "/image"),
          "info": (CameraInfo, prefix + "/camera_info")}
'''

PUBLISHER = _COMMON + r'''
from builtin_interfaces.msg import Time
from PIL import Image as PILImage

pts = np.fromfile(f"{root}/velodyne/{frame}.bin", dtype=np.float32).reshape(-1, 4)
rgb = np.asarray(PILImage.open(f"{root}/image_2/{frame}.png").convert("RGB"), dtype=np.uint8)
calib = {}
for line in open(f"{root}/calib/{frame}.txt"):
    key, _, val = line.partition(":")
    if val.strip():
        calib[key.strip()] = np.array(val.split(), dtype=np.float64)
P2 = calib["P2"].reshape(3, 4)
stamp = Time(sec=1317000000, nanosec=123456789)

cloud = PointCloud2()
cloud.header.stamp, cloud.header.frame_id = stamp, "velodyne"
cloud.height, cloud.width = 1, pts.shape[0]
cloud.fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                for i, n in enumerate(("x", "y", "z", "intensity"))]
cloud.is_bigendian, cloud.point_step, cloud.row_step, cloud.is_dense = False, 16, 16 * pts.shape[0], True
cloud.data = array.array("B", pts.tobytes())

image = Image()
image.header.stamp, image.header.frame_id = stamp, "camera_2"
image.height, image.width = rgb.shape[:2]
image.encoding, image.is_bigendian, image.step = "rgb8", 0, 3 * rgb.shape[1]
image.data = array.array("B", rgb.tobytes())

info = CameraInfo()
info.header.stamp, info.header.frame_id = stamp, "camera_2"
info.height, info.width = rgb.shape[:2]
info.distortion_model = "plumb_bob"
info.d = [0.0] * 5
info.k = P2[:, :3].ravel()
info.r = np.eye(3).ravel()
info.p = P2.ravel()

discovery_s = publish_once("kitti_frame_publisher", {"cloud": cloud, "image": image, "info": info})
print(json.dumps({"discovery_s": discovery_s, "points": int(pts.shape[0])}))
'''

SUBSCRIBER = _COMMON + r'''
import hashlib

got, elapsed, _ = receive("kitti_frame_subscriber")

def stamp(h):
    return [h.stamp.sec, h.stamp.nanosec, h.frame_id]

c, i, ci = got["cloud"], got["image"], got["info"]
cdata = c.data.tobytes()
xyzi = np.frombuffer(cdata, dtype=np.float32).reshape(-1, 4)
print(json.dumps({
    "elapsed_s": elapsed,
    "cloud": {"header": stamp(c.header), "height": c.height, "width": c.width, "point_step": c.point_step,
              "row_step": c.row_step, "is_dense": c.is_dense, "is_bigendian": c.is_bigendian,
              "fields": [[f.name, f.offset, f.datatype, f.count] for f in c.fields],
              "nbytes": len(cdata), "sha256": hashlib.sha256(cdata).hexdigest(),
              "first_point": xyzi[0].tolist()},
    "image": {"header": stamp(i.header), "height": i.height, "width": i.width, "encoding": i.encoding,
              "step": i.step, "nbytes": len(i.data), "sha256": hashlib.sha256(i.data.tobytes()).hexdigest()},
    "info": {"header": stamp(ci.header), "height": ci.height, "width": ci.width, "p": list(ci.p), "k": list(ci.k),
             "distortion_model": ci.distortion_model},
}))
'''


def test_kitti_frame_crosses_processes_intact(kitti_samples):
    from PIL import Image as PILImage

    root = kitti_samples / "object" / "training"
    raw = (root / "velodyne" / f"{FRAME}.bin").read_bytes()
    n_points = len(raw) // 16
    rgb = np.asarray(PILImage.open(root / "image_2" / f"{FRAME}.png").convert("RGB"), dtype=np.uint8)
    p2 = None
    for line in (root / "calib" / f"{FRAME}.txt").read_text().splitlines():
        if line.startswith("P2:"):
            p2 = [float(v) for v in line.split()[1:]]
    assert p2 is not None and len(p2) == 12

    prefix = f"/cmfiou_test_{uuid.uuid4().hex[:8]}"
    pub, sub = run_pair(PUBLISHER, SUBSCRIBER, [str(root), FRAME, prefix])

    assert 100_000 < n_points < 140_000 and pub["points"] == n_points
    cloud = sub["cloud"]
    assert cloud["fields"] == [["x", 0, 7, 1], ["y", 4, 7, 1], ["z", 8, 7, 1], ["intensity", 12, 7, 1]]
    assert (cloud["height"], cloud["width"], cloud["point_step"]) == (1, n_points, 16)
    assert cloud["row_step"] == 16 * n_points and cloud["nbytes"] == len(raw)
    assert cloud["sha256"] == hashlib.sha256(raw).hexdigest()
    assert cloud["first_point"] == np.frombuffer(raw[:16], dtype=np.float32).tolist()
    assert cloud["is_dense"] is True and cloud["is_bigendian"] is False

    image = sub["image"]
    assert (image["height"], image["width"], image["encoding"]) == (rgb.shape[0], rgb.shape[1], "rgb8")
    assert image["step"] == 3 * rgb.shape[1] and image["nbytes"] == rgb.size
    assert image["sha256"] == hashlib.sha256(rgb.tobytes()).hexdigest()

    info = sub["info"]
    assert info["p"] == p2
    assert info["k"] == [p2[0], p2[1], p2[2], p2[4], p2[5], p2[6], p2[8], p2[9], p2[10]]
    assert (info["height"], info["width"]) == rgb.shape[:2]

    # One stamp for the whole frame; frames as published.
    assert cloud["header"] == [1317000000, 123456789, "velodyne"]
    assert image["header"] == info["header"] == [1317000000, 123456789, "camera_2"]
    print(f"discovery {pub['discovery_s']:.2f} s, received after {sub['elapsed_s']:.2f} s")
