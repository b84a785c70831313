"""The replay graph, described once: node names, executables/modules, parameter files, parameter overrides and
remappings. Used by ``launch/kitti_replay.launch.py`` (real ROS: launch_ros ``Node`` actions) and by
``cmfiou_ros.run_graph`` (pip world: subprocesses ``python -m <module> --ros-args ...``).

Pure Python: no ROS import, so both consumers (and tests) can load it anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PACKAGE = "cmfiou_ros"

# (name, default, description): the launch arguments, and the run_graph command-line options
LAUNCH_ARGUMENTS: List[Tuple[str, str, str]] = [
    ("data", "", "KITTI object/raw folder or generated scenes to replay"),
    ("checkpoint", "", "CMF-IOU checkpoint ('' = the bundled camera+LiDAR demo checkpoint)"),
    ("config", "", "model/pipeline config YAML ('' = pipeline default)"),
    ("rate", "10.0", "replay rate (frames per second; the maximum in lockstep)"),
    ("lockstep", "true", "publish the next frame only after the detector's output for the previous one: no frame "
                         "dropped whatever the detector's speed (false: real time at rate; frames the detector "
                         "cannot keep up with are dropped, counted and printed)"),
    ("print_frames", "true", "the replay logs one line per frame output (detections) and per dropped frame"),
    ("loop", "false", "replay in a loop"),
    ("use_sim_time", "false", "replay publishes /clock and every node uses sim time"),
    ("rviz", "false", "start RViz (real ROS only)"),
    ("device", "cpu", "inference device"),
    ("pipeline_factory", "cmfiou_core.pipeline:Pipeline.from_config", "import path of the pipeline factory"),
    ("sync_policy", "latest_image", "approx or latest_image"),
    ("max_frames", "0", "play at most this many frames (0 = all)"),
    ("exit_on_end", "false", "end the graph after the last frame, once the detector has answered it (drained)"),
]
DEFAULTS: Dict[str, str] = {n: d for n, d, _ in LAUNCH_ARGUMENTS}

# topics shared by the two nodes
TOPICS = {
    "lidar": "/kitti/velo/pointcloud",
    "image": "/kitti/camera_color_left/image_raw",
    "camera_info": "/kitti/camera_color_left/camera_info",
    "extrinsic": "/cmfiou/lidar_to_camera",
    "detections": "/cmfiou/detections",
    "scores": "/cmfiou/scores",
    "markers": "/cmfiou/markers",
    "timings": "/cmfiou/timings",
    "frame_map": "/kitti_replay/frame_map",
}


@dataclass
class NodeSpec:
    name: str  # node name (launch_ros ``name=``, run_graph ``-r __node:=``)
    package: str  # ROS package of the executable
    executable: str  # executable in lib/<package> (real ROS)
    module: str  # python -m module (pip world)
    params_file: Optional[str]  # YAML with ``<name>: ros__parameters:`` (or ``/**:``)
    parameters: Dict[str, object] = field(default_factory=dict)  # overrides, applied after params_file
    remappings: List[Tuple[str, str]] = field(default_factory=list)


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def config_dir() -> Path:
    """share/cmfiou_ros/config of the installed package (:mod:`cmfiou_core.resources`; an error naming where it
    looked when missing)."""
    from cmfiou_core import resources

    return resources.find("config")


def replay_graph(args: Optional[Dict[str, object]] = None) -> List[NodeSpec]:
    """The replay graph for the given argument values (strings as launch gives them, or typed values)."""
    a = dict(DEFAULTS)
    unknown = set(args or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown graph argument(s): {', '.join(sorted(unknown))}")
    a.update({k: v for k, v in (args or {}).items()})
    sim = _bool(a["use_sim_time"])
    cfg = config_dir()
    replay = NodeSpec(
        name="kitti_replay", package=PACKAGE, executable="kitti_replay_node", module="cmfiou_ros.replay_node",
        params_file=str(cfg / "replay_node.yaml"),
        parameters={
            "data_dir": str(a["data"]),
            "rate": float(a["rate"]),
            "loop": _bool(a["loop"]),
            "publish_clock": sim,
            "use_sim_time": False,  # the replay is the clock
            "max_frames": int(a["max_frames"]),
            "exit_on_end": _bool(a["exit_on_end"]),
            "lidar_topic": TOPICS["lidar"], "image_topic": TOPICS["image"],
            "camera_info_topic": TOPICS["camera_info"], "extrinsic_topic": TOPICS["extrinsic"],
            "frame_map_topic": TOPICS["frame_map"],
            "output_topic": TOPICS["detections"],
            "lockstep_topic": TOPICS["detections"] if _bool(a["lockstep"]) else "",
            # lockstep: wait for the detector however long its configure takes (model load + warm-up on a busy
            # CPU can pass the 30 s default), or the first frame would go out to nobody
            **({"wait_timeout": 3600.0} if _bool(a["lockstep"]) else {}),
            "print_frames": _bool(a["print_frames"]),
        },
    )
    detector = NodeSpec(
        name="cmfiou_detector", package=PACKAGE, executable="detector_node", module="cmfiou_ros.detector_node",
        params_file=str(cfg / "detector_node.yaml"),
        parameters={
            "pipeline_factory": str(a["pipeline_factory"]),
            "model_config": str(a["config"]),
            "checkpoint": str(a["checkpoint"]),
            "device": str(a["device"]),
            "sync_policy": str(a["sync_policy"]),
            "use_sim_time": sim,
            "extrinsic_topic": TOPICS["extrinsic"],
            "lidar_topic": TOPICS["lidar"], "image_topic": TOPICS["image"],
            "camera_info_topic": TOPICS["camera_info"],
        },
        remappings=[("~/detections", TOPICS["detections"]), ("~/scores", TOPICS["scores"]),
                    ("~/markers", TOPICS["markers"]), ("~/timings", TOPICS["timings"])],
    )
    return [replay, detector]


RVIZ = NodeSpec(name="rviz2", package="rviz2", executable="rviz2", module="", params_file=None,
                parameters={}, remappings=[])
