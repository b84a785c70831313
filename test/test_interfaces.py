"""Our interfaces (cmfiou_ros/msg) and vision_msgs: type hashes, and a cross-process round trip with field checks.

* vision_msgs/Detection3DArray must be wire- and hash-compatible with upstream ros-perception/vision_msgs 4.1.1:
  rclpy's type hash (from the generated type support, seen through the ROS graph) must equal upstream's, and so must
  the hash that rosbags computes independently from the compat/vision_msgs .msg texts.
* The installed cmfiou_ros interfaces must match msg/*.msg (hash from rclpy == hash from rosbags), i.e. not be stale.
* DetectionScores / FrameTimings / Detection3DArray / LabelInfo published by one process arrive with every field
  intact in another.
"""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# RIHS01 of vision_msgs/msg/Detection3DArray in upstream ros-perception/vision_msgs 4.1.1 (rosbags on upstream's .msg)
UPSTREAM_DETECTION3DARRAY_HASH = "RIHS01_793f5eab9595ac1c0da07873cc859db42eae51f0ee76056db8562515d830e018"

from rosutil import CHILD_EXCHANGE, fresh_domain, require, run_children  # noqa: E402

rclpy = require("rclpy")

pytestmark = pytest.mark.ros


def rosbags_hashes(msg_dir: Path, package: str, names: list) -> dict:
    """RIHS01 hashes computed by rosbags (independent of rosidl) from .msg files."""
    typesys = require("rosbags.typesys")
    store = typesys.get_typestore(typesys.Stores.ROS2_KILTED)
    types = {}
    for path in sorted(msg_dir.glob("*.msg")):
        types.update(typesys.get_types_from_msg(path.read_text(), f"{package}/msg/{path.stem}"))
    store.register(types)
    return {name: store.hash_rihs01(f"{package}/msg/{name}") for name in names}


def graph_hashes(types: dict) -> dict:
    """Type hashes rclpy announces on the ROS graph for publishers of the given message classes (in-process)."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=fresh_domain())
    try:
        node = rclpy.create_node(f"hash_probe_{uuid.uuid4().hex[:6]}", context=ctx)
        out = {}
        for name, cls in types.items():
            topic = f"/cmfiou_hash_{uuid.uuid4().hex[:8]}"
            node.create_publisher(cls, topic, 1)
            infos = node.get_publishers_info_by_topic(topic)
            assert len(infos) == 1
            out[name] = str(infos[0].topic_type_hash)
        node.destroy_node()
        return out
    finally:
        rclpy.shutdown(context=ctx)


def test_detection3darray_type_hash_equals_upstream():
    from vision_msgs.msg import Detection3D, Detection3DArray

    from_rclpy = graph_hashes({"Detection3DArray": Detection3DArray, "Detection3D": Detection3D})
    assert from_rclpy["Detection3DArray"] == UPSTREAM_DETECTION3DARRAY_HASH
    from_rosbags = rosbags_hashes(REPO / "compat" / "vision_msgs" / "msg", "vision_msgs",
                                  ["Detection3DArray", "Detection3D"])
    assert from_rosbags["Detection3DArray"] == UPSTREAM_DETECTION3DARRAY_HASH
    assert from_rosbags == from_rclpy


def test_tfmessage_type_hash_equals_upstream():
    """The tf2_msgs/TFMessage the node listens to (compat/tf2_msgs where no real tf2_msgs exists) hashes like
    upstream's: rosbags' built-in Kilted definition (upstream's .msg), rclpy's announced hash, and rosbags on
    compat/tf2_msgs agree."""
    typesys = require("rosbags.typesys")
    TFMessage = require("tf2_msgs.msg").TFMessage
    upstream = typesys.get_typestore(typesys.Stores.ROS2_KILTED).hash_rihs01("tf2_msgs/msg/TFMessage")
    assert graph_hashes({"TFMessage": TFMessage})["TFMessage"] == upstream
    assert rosbags_hashes(REPO / "compat" / "tf2_msgs" / "msg", "tf2_msgs", ["TFMessage"])["TFMessage"] == upstream


def test_installed_cmfiou_interfaces_match_sources():
    from cmfiou_ros.msg import DetectionScores, FrameTimings, StageTiming

    names = {"DetectionScores": DetectionScores, "FrameTimings": FrameTimings, "StageTiming": StageTiming}
    from_rclpy = graph_hashes(names)
    from_rosbags = rosbags_hashes(REPO / "msg", "cmfiou_ros", list(names))
    assert from_rclpy == from_rosbags, "installed cmfiou_ros interfaces are stale: re-run scripts/setup.sh"
    assert DetectionScores.SCORE_MODE_RECTIFIED == "rectified" and DetectionScores.SCORE_MODE_CLS == "cls"


def test_msg_types_helper_imports_everything():
    from cmfiou_ros import msg_types

    for name in msg_types.__all__:
        assert getattr(msg_types, name) is not None
    assert msg_types.DetectionScores.__module__.startswith("cmfiou_ros.msg")


# ---- cross-process round trip ------------------------------------------------------------------------------------
def make_payload() -> dict:
    """Deterministic detections; float32 fields get float32-representable values so equality can be exact."""
    rng = np.random.default_rng(20261124)
    n = 6
    boxes = np.column_stack([
        rng.uniform(0, 70, n), rng.uniform(-40, 40, n), rng.uniform(-3, 1, n),   # x y z (centre)
        rng.uniform(0.5, 4.5, n), rng.uniform(0.5, 2.0, n), rng.uniform(1.0, 2.0, n),  # dx dy dz
        rng.uniform(-math.pi, math.pi, n),  # heading
    ])
    labels = rng.integers(1, 4, n)
    names = np.array(["Car", "Pedestrian", "Cyclist"])[labels - 1]
    cls = rng.uniform(0.3, 1.0, n).astype(np.float32)
    iou = rng.uniform(0.1, 1.0, n).astype(np.float32)
    alpha = np.array([0.68, 0.71, 0.65], dtype=np.float32)[labels - 1]
    score = (cls ** (1 - alpha) * iou ** alpha).astype(np.float32)
    return {
        "stamp": [1317000001, 987654321], "frame_id": "velodyne",
        "boxes": boxes.tolist(), "class_id": names.tolist(),
        "cls_score": cls.tolist(), "iou_score": iou.tolist(), "score": score.tolist(),
        "pos_var": rng.uniform(0.01, 0.5, (n, 6)).astype(np.float64).tolist(),
        "stages": [["pseudo_points", 81.5], ["voxelize", 3.25], ["backbone", 120.125], ["roi_head", 40.0625],
                   ["postprocess", 1.5]],
        "total_ms": 246.4375, "input_age_ms": 260.75, "dropped_frames": 3,
        "class_map": [[1, "Car"], [2, "Pedestrian"], [3, "Cyclist"]], "threshold": 0.375,
    }


_IF_COMMON = CHILD_EXCHANGE + r'''
import math
import numpy as np
from cmfiou_ros.msg import DetectionScores, FrameTimings, StageTiming
from vision_msgs.msg import Detection3DArray, LabelInfo

payload, prefix = json.loads(sys.argv[1]), sys.argv[2]
TOPICS = {"detections": (Detection3DArray, prefix + "/detections"), "scores": (DetectionScores, prefix + "/scores"),
          "timings": (FrameTimings, prefix + "/timings"), "labels": (LabelInfo, prefix + "/label_info")}
'''

IF_PUBLISHER = _IF_COMMON + r'''
from builtin_interfaces.msg import Time
from std_msgs.msg import Header
from vision_msgs.msg import BoundingBox3D, Detection3D, ObjectHypothesis, ObjectHypothesisWithPose, VisionClass

header = Header(stamp=Time(sec=payload["stamp"][0], nanosec=payload["stamp"][1]), frame_id=payload["frame_id"])
boxes = np.asarray(payload["boxes"], dtype=np.float64)
half = boxes[:, 6] / 2.0
quat = np.column_stack([np.zeros_like(half), np.zeros_like(half), np.sin(half), np.cos(half)])  # yaw about z

dets = Detection3DArray(header=header)
for i, (box, q) in enumerate(zip(boxes, quat)):
    d = Detection3D(header=header, id=str(i))
    d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.center.position.z = box[:3]
    d.bbox.center.orientation.x, d.bbox.center.orientation.y, d.bbox.center.orientation.z, d.bbox.center.orientation.w = q
    d.bbox.size.x, d.bbox.size.y, d.bbox.size.z = box[3:6]
    hyp = ObjectHypothesisWithPose(hypothesis=ObjectHypothesis(class_id=payload["class_id"][i], score=payload["score"][i]))
    hyp.pose.pose = d.bbox.center
    hyp.pose.covariance = np.diag(np.asarray(payload["pos_var"][i], dtype=np.float64)).ravel()
    d.results = [hyp]
    dets.detections.append(d)

scores = DetectionScores(header=header, class_id=payload["class_id"],
                         cls_score=np.asarray(payload["cls_score"], np.float32),
                         iou_score=np.asarray(payload["iou_score"], np.float32),
                         score=np.asarray(payload["score"], np.float32),
                         score_mode=DetectionScores.SCORE_MODE_RECTIFIED, lidar_only=False)
timings = FrameTimings(header=header, stages=[StageTiming(stage=s, ms=ms) for s, ms in payload["stages"]],
                       total_ms=payload["total_ms"], input_age_ms=payload["input_age_ms"],
                       dropped_frames=payload["dropped_frames"])
labels = LabelInfo(header=header, class_map=[VisionClass(class_id=c, class_name=n) for c, n in payload["class_map"]],
                   threshold=payload["threshold"])

discovery_s = publish_once("cmfiou_iface_publisher",
                           {"detections": dets, "scores": scores, "timings": timings, "labels": labels})
print(json.dumps({"discovery_s": discovery_s}))
'''

IF_SUBSCRIBER = _IF_COMMON + r'''
def to_plain(value):
    """Generated message -> JSON-able structure (recursively, via the generated field table)."""
    if hasattr(value, "get_fields_and_field_types"):
        return {f: to_plain(getattr(value, f)) for f in value.get_fields_and_field_types()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays (fixed-size fields) and array.array (numeric sequences)
        return value.tolist()
    return value

def graph(node):
    infos = {k: node.get_publishers_info_by_topic(name) for k, (t, name) in TOPICS.items()}
    return ({k: [str(i.topic_type_hash) for i in v] for k, v in infos.items()},
            {k: [i.topic_type for i in v] for k, v in infos.items()})

got, _, (hashes, types) = receive("cmfiou_iface_subscriber", graph)
print(json.dumps({"msgs": {k: to_plain(m) for k, m in got.items()}, "graph_hashes": hashes, "graph_types": types}))
'''


def _run_pair(args: list, timeout: float = 90.0) -> dict:
    return run_children({"subscriber": IF_SUBSCRIBER, "publisher": IF_PUBLISHER}, args, timeout)["subscriber"]


def test_messages_cross_processes_with_all_fields():
    payload = make_payload()
    prefix = f"/cmfiou_if_{uuid.uuid4().hex[:8]}"
    result = _run_pair([json.dumps(payload), prefix])
    msgs = result["msgs"]
    header = {"stamp": {"sec": payload["stamp"][0], "nanosec": payload["stamp"][1]}, "frame_id": payload["frame_id"]}
    n = len(payload["boxes"])

    # Detection3DArray (vision_msgs): boxes, orientation (yaw about z), size, hypothesis, covariance.
    dets = msgs["detections"]
    assert dets["header"] == header and len(dets["detections"]) == n
    for i, (det, box) in enumerate(zip(dets["detections"], payload["boxes"])):
        assert det["header"] == header and det["id"] == str(i)
        c = det["bbox"]["center"]
        assert [c["position"]["x"], c["position"]["y"], c["position"]["z"]] == box[:3]
        q = c["orientation"]
        assert q["x"] == 0.0 and q["y"] == 0.0
        assert math.isclose(2.0 * math.atan2(q["z"], q["w"]), box[6], abs_tol=1e-12)
        assert [det["bbox"]["size"][k] for k in "xyz"] == box[3:6]
        assert len(det["results"]) == 1
        hyp = det["results"][0]
        assert hyp["hypothesis"] == {"class_id": payload["class_id"][i], "score": payload["score"][i]}
        assert hyp["pose"]["pose"] == c
        assert hyp["pose"]["covariance"] == np.diag(payload["pos_var"][i]).ravel().tolist()

    # DetectionScores: same header, arrays aligned index by index with the detections.
    scores = msgs["scores"]
    assert scores["header"] == dets["header"]
    for key in ("class_id", "cls_score", "iou_score", "score"):
        assert scores[key] == payload[key], key
        assert len(scores[key]) == n
    assert scores["score"] == [d["results"][0]["hypothesis"]["score"] for d in dets["detections"]]
    assert scores["score_mode"] == "rectified" and scores["lidar_only"] is False

    timings = msgs["timings"]
    assert timings["header"] == header
    assert [[s["stage"], s["ms"]] for s in timings["stages"]] == payload["stages"]
    assert (timings["total_ms"], timings["input_age_ms"], timings["dropped_frames"]) == (
        payload["total_ms"], payload["input_age_ms"], payload["dropped_frames"])

    labels = msgs["labels"]
    assert [[v["class_id"], v["class_name"]] for v in labels["class_map"]] == payload["class_map"]
    assert labels["threshold"] == payload["threshold"]

    # The graph as another process sees it: types and upstream-compatible hash.
    assert result["graph_types"]["detections"] == ["vision_msgs/msg/Detection3DArray"]
    assert result["graph_types"]["scores"] == ["cmfiou_ros/msg/DetectionScores"]
    assert result["graph_hashes"]["detections"] == [UPSTREAM_DETECTION3DARRAY_HASH]
    ours = rosbags_hashes(REPO / "msg", "cmfiou_ros", ["DetectionScores", "FrameTimings"])
    assert result["graph_hashes"]["scores"] == [ours["DetectionScores"]]
    assert result["graph_hashes"]["timings"] == [ours["FrameTimings"]]
