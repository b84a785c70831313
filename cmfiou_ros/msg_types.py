"""The ROS message types used by cmfiou_ros, imported in one place with an actionable error when they are missing.

Usage::

    from cmfiou_ros.msg_types import Detection3DArray, DetectionScores, PointCloud2

Our own types live in ``cmfiou_ros.msg`` (generated from ``msg/*.msg``); vision_msgs is the real package in a ROS 2
installation or the field-identical subset in ``compat/vision_msgs`` that ``scripts/setup.sh`` builds in the pip world.
"""
from __future__ import annotations

_HINT = (
    "pip world: run scripts/setup.sh, then `. .venv/cmfiou.env` (sets PYTHONPATH and AMENT_PREFIX_PATH); "
    "ROS 2 workspace: `colcon build` and `source install/setup.bash` "
    "(rosdep install --from-paths src -y --ignore-src for vision_msgs & co.)"
)

try:
    from builtin_interfaces.msg import Time
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from geometry_msgs.msg import Point, Pose, PoseWithCovariance, Quaternion, Vector3
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
    from std_msgs.msg import Header
    from visualization_msgs.msg import Marker, MarkerArray
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"ROS 2 message packages are not importable ({exc}). {_HINT}") from exc

try:
    from vision_msgs.msg import (
        BoundingBox3D,
        Detection3D,
        Detection3DArray,
        LabelInfo,
        ObjectHypothesis,
        ObjectHypothesisWithPose,
        VisionClass,
    )
except ImportError as exc:  # pragma: no cover
    raise ImportError(f"vision_msgs is not importable ({exc}). {_HINT}") from exc

try:
    from cmfiou_ros.msg import DetectionScores, FrameTimings, StageTiming
except ImportError as exc:  # pragma: no cover
    raise ImportError(f"the generated cmfiou_ros.msg interfaces are not importable ({exc}). {_HINT}") from exc

__all__ = [
    "BoundingBox3D",
    "CameraInfo",
    "Detection3D",
    "Detection3DArray",
    "DetectionScores",
    "DiagnosticArray",
    "DiagnosticStatus",
    "FrameTimings",
    "Header",
    "Image",
    "KeyValue",
    "LabelInfo",
    "Marker",
    "MarkerArray",
    "ObjectHypothesis",
    "ObjectHypothesisWithPose",
    "Point",
    "PointCloud2",
    "PointField",
    "Pose",
    "PoseWithCovariance",
    "Quaternion",
    "StageTiming",
    "Time",
    "Vector3",
    "VisionClass",
]
