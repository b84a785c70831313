"""Parameter tables of the detector and replay nodes: ONE place for name, type, default, meaning, validation.

``declare(node, SPECS)`` declares every parameter (with a ParameterDescriptor: description, read_only, ranges) and
returns the validated values; ``validate(SPECS, values)`` is the pure check used by it and by tests.
Model-bound parameters are read-only: changing them would need a new Pipeline (reconfigure the lifecycle node).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

DEFAULT_FACTORY = "cmfiou_core.pipeline:Pipeline.from_config"


class ParamError(ValueError):
    """An invalid parameter value (the text names the parameter and the rule)."""


@dataclass(frozen=True)
class P:
    name: str
    type: type  # bool, int, float, str, list (of float) or "str_list"
    default: Any
    doc: str
    read_only: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns an error text or None
    elem: Optional[type] = None  # element type for lists


def _rng(lo=None, hi=None, lo_open=False):
    def f(v):
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None
    return f


def _choice(*opts):
    return lambda v: None if v in opts else f"must be one of {', '.join(map(repr, opts))}"


def _device(v):
    return None if re.fullmatch(r"cpu|cuda(:\d+)?|auto", v) else "must be 'cpu', 'cuda', 'cuda:N' or 'auto'"


def _factory(v):
    return None if re.fullmatch(r"[^:\s]+:[A-Za-z_][\w.]*", v) else "must be 'module.path:attr[.attr]' or 'file.py:attr'"


def _topic(v):
    return None if re.fullmatch(r"~?/?[A-Za-z_{][\w/{}~]*", v) and "//" not in v else f"invalid topic name {v!r}"


def _opt_topic(v):
    return None if v == "" else _topic(v)


def _extrinsic(v):
    return None if len(v) in (0, 7, 12, 16) else "must have 0, 7 (xyz+quaternion), 12 (3x4) or 16 (4x4) numbers"


DETECTOR_PARAMS: List[P] = [
    P("pipeline_factory", str, DEFAULT_FACTORY, "Import path of the callable (config_path, checkpoint, device) -> "
      "Pipeline", True, _factory),
    P("model_config", str, "", "Model/pipeline config YAML ('' = the factory's default)", True),
    P("checkpoint", str, "", "Checkpoint file ('' = none: the factory decides, e.g. random init for tests)", True),
    P("device", str, "cpu", "Inference device: cpu, cuda, cuda:N, auto", True, _device),
    P("engine", str, "", "Inference engine: eager (spconv modules), graph (static-shape engine, CUDA graphs), auto "
      "(graph on CUDA); '' = the config's inference.engine. Passed to the factory as engine= only when set", True,
      lambda v: None if v in ("", "eager", "graph", "auto") else "must be '', 'eager', 'graph' or 'auto'"),
    P("warmup", bool, True, "Run pipeline.warmup() at configure time", True),
    P("score_threshold", float, 0.0, "Drop detections whose rectified score is below this (after the pipeline)",
      False, _rng(0.0, 1.0)),
    P("lidar_topic", str, "/kitti/velo/pointcloud", "Input sensor_msgs/PointCloud2", True, _topic),
    P("image_topic", str, "/kitti/camera_color_left/image_raw", "Input sensor_msgs/Image", True, _topic),
    P("camera_info_topic", str, "/kitti/camera_color_left/camera_info", "Input sensor_msgs/CameraInfo", True, _topic),
    P("extrinsic_topic", str, "", "Optional latched geometry_msgs/TransformStamped LiDAR->camera ('' = off)", True,
      _opt_topic),
    P("detections_topic", str, "~/detections", "Output vision_msgs/Detection3DArray", True, _topic),
    P("scores_topic", str, "~/scores", "Output cmfiou_ros/DetectionScores (index-aligned)", True, _topic),
    P("markers_topic", str, "~/markers", "Output visualization_msgs/MarkerArray ('' = off)", True, _opt_topic),
    P("timings_topic", str, "~/timings", "Output cmfiou_ros/FrameTimings ('' = off)", True, _opt_topic),
    P("lidar_frame", str, "", "Expected LiDAR frame_id ('' = accept the cloud's)", True),
    P("camera_frame", str, "", "Camera optical frame for TF ('' = CameraInfo header.frame_id)", True),
    P("lidar_to_camera", list, [], "LiDAR->camera-optical extrinsic: 16 (4x4 row-major), 12 (3x4) or 7 "
      "(x y z qx qy qz qw) numbers; used when TF and extrinsic_topic give none", True, _extrinsic, float),
    P("use_tf", bool, True, "Look the extrinsic up in TF (tf2_ros; without it our own buffer over /tf + "
      "/tf_static); a frame_id TF cannot connect is warned and counted", True),
    P("sync_policy", str, "latest_image", "approx (message_filters ApproximateTime on cloud+image) or latest_image "
      "(LiDAR-triggered)", True, _choice("approx", "latest_image")),
    P("slop", float, 0.05, "approx: max stamp spread of a set (s); latest_image: match tolerance (s)", True,
      _rng(0.0, 10.0, lo_open=True)),
    P("max_image_age", float, 0.15, "Older images (lidar stamp - image stamp, s) are not used: LiDAR-only frame",
      True, _rng(0.0, 60.0)),
    P("image_wait", float, 0.05, "latest_image: wall time (s) a cloud waits for its image before going without",
      True, _rng(0.0, 5.0)),
    P("calibration_tolerance", float, 0.02, "A frame's CameraInfo / extrinsic_topic message: the one stamped nearest "
      "its image stamp within this (s). A source whose content never changed serves every frame; once it changed, "
      "a frame without its own runs LiDAR-only", True, _rng(0.0, 60.0)),
    P("time_jump_threshold", float, 1.0, "A LiDAR or image stamp this much (s) older than the newest seen (bag loop, "
      "sim-time reset) resets the sync state, with one warning", True, _rng(0.0, 1e6, lo_open=True)),
    P("future_tolerance", float, 1.0, "Inputs stamped more than this (s) ahead of the node's clock are rejected and "
      "counted (0 = accept any stamp)", True, _rng(0.0, 1e9)),
    P("max_points", int, 1000000, "Clouds with more points are thinned (every k-th point) to this many, with a "
      "warning (an HDL-64 frame has ~130 000)", True, _rng(1, 10**9)),
    P("message_size_warn_mb", float, 0.0, "Warn about messages (inputs received, outputs published) bigger than "
      "this (MiB); 0 = the transport limit: maxMessageSize of the active Fast DDS profile (config/fastdds_shm.xml: "
      "16 MiB; bigger best-effort messages are lost without notice), 16 when none is known", True, _rng(0.0, 1e6)),
    P("queue_size", int, 5, "approx: per-input queue; also the subscription depth", True, _rng(1, 1000)),
    P("intensity_scale", float, 0.0, "Multiply intensity by this (0 = auto: float as is, uintN / max)", True,
      _rng(0.0, 1e6)),
    P("diagnostics_period", float, 1.0, "Seconds between /diagnostics messages", True, _rng(0.05, 60.0)),
    P("max_processing_ms", float, 1000.0, "Diagnostics WARN when the pipeline takes longer (ms)", False,
      _rng(0.0, 1e7, lo_open=True)),
    P("warn_throttle", float, 5.0, "Seconds between repeated warnings of one topic", False, _rng(0.0, 3600.0)),
    P("autostart", bool, True, "Configure and activate the lifecycle node at start-up", True),
    P("malloc_trim_period", int, 0, "Every N processed frames give the C heap's freed pages back to the OS (glibc "
      "malloc_trim; 0 = never). Lowers the resting RSS of CPU inference (glibc keeps ~0.9 GB of freed tensor "
      "memory resident), not its peak; costs ~12% CPU frame time at N=1 (docs/results/archive/soak_inprocess_cpu.json)", False,
      _rng(0, 1000000)),
]

REPLAY_PARAMS: List[P] = [
    P("data_dir", str, "", "KITTI object folder (training/ with velodyne, image_2, calib), a KITTI raw date folder "
      "or a generated-scene folder (object layout)", True),
    P("dataset", str, "auto", "object, raw or auto", True, _choice("auto", "object", "raw")),
    P("split", str, "training", "object layout: sub-folder to read (training, testing, training_fov_reduced)", True),
    P("drive", str, "", "raw layout: drive folder name ('' = the first *_sync folder)", True),
    P("frames", list, [], "Frame ids to play, in order ([] = all, sorted)", True, None, str),
    P("max_frames", int, 0, "Play at most this many frames (0 = all)", True, _rng(0, 10**9)),
    P("rate", float, 10.0, "Frames per second", True, _rng(0.0, 1000.0, lo_open=True)),
    P("loop", bool, False, "Start again after the last frame", True),
    P("publish_clock", bool, False, "Publish /clock (sim time: stamps = t0 + k / rate; run nodes with "
      "use_sim_time)", True),
    P("wait_for_subscribers", int, 1, "Wait until the cloud topic has this many subscribers (0 = no wait)", True,
      _rng(0, 1000)),
    P("wait_timeout", float, 30.0, "Give up waiting for subscribers after this many seconds, then start", True,
      _rng(0.0, 3600.0)),
    P("exit_on_end", bool, False, "Exit after the last frame (loop=false); otherwise stay up (latched topics)", True),
    P("start_delay", float, 0.0, "Seconds to wait after subscribers matched (discovery of the other topics)", True,
      _rng(0.0, 60.0)),
    P("lidar_topic", str, "/kitti/velo/pointcloud", "Output PointCloud2 (x, y, z, intensity float32)", True, _topic),
    P("image_topic", str, "/kitti/camera_color_left/image_raw", "Output Image rgb8", True, _topic),
    P("camera_info_topic", str, "/kitti/camera_color_left/camera_info", "Output CameraInfo", True, _topic),
    P("extrinsic_topic", str, "/cmfiou/lidar_to_camera", "Output latched TransformStamped camera<-LiDAR per "
      "frame ('' = off)", True, _opt_topic),
    P("frame_map_topic", str, "~/frame_map", "Latched std_msgs/String JSON frame index <-> stamp map", True, _topic),
    P("lidar_frame", str, "velo_link", "LiDAR frame_id", True),
    P("camera_frame", str, "camera_color_left_optical", "Camera optical frame_id", True),
    P("lockstep_topic", str, "", "Detection3DArray topic: publish the next frame only after the output for the "
      "previous one arrived (or lockstep_timeout): no drops with a detector slower than rate ('' = off)", True,
      _opt_topic),
    P("lockstep_timeout", float, 60.0, "Seconds to wait for an output in lockstep mode (and, with exit_on_end, "
      "for the last frame's output) before moving on", True, _rng(0.0, 3600.0, lo_open=True)),
    P("output_topic", str, "", "Detection3DArray topic of the detector's output to follow ('' = lockstep_topic): "
      "frames without an output are counted as dropped, exit_on_end waits for the last frame's output", True,
      _opt_topic),
    P("print_frames", bool, False, "Log one line per frame output (detections, their distance, delay) and per "
      "dropped frame", False),
    P("publish_image", bool, True, "Publish images (false: simulate a dead camera from the start)", False),
    P("stop_camera_after", int, -1, "Stop publishing image/camera_info after this many frames (-1 = never)", False,
      _rng(-1, 10**9)),
]


def _coerce(spec: P, v):
    if spec.type is bool:
        if isinstance(v, bool):
            return v
        raise ParamError(f"{spec.name}: expected a bool, got {v!r}")
    if spec.type is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ParamError(f"{spec.name}: expected an integer, got {v!r}")
        return int(v)
    if spec.type is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ParamError(f"{spec.name}: expected a number, got {v!r}")
        v = float(v)
        if v != v:
            raise ParamError(f"{spec.name}: NaN is not allowed")
        return v
    if spec.type is str:
        if not isinstance(v, str):
            raise ParamError(f"{spec.name}: expected a string, got {v!r}")
        return v
    if spec.type is list:
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            raise ParamError(f"{spec.name}: expected a list, got {v!r}")
        try:
            return [spec.elem(x) if spec.elem is not str else str(x) for x in v]
        except (TypeError, ValueError):
            raise ParamError(f"{spec.name}: list elements must be {spec.elem.__name__}") from None
    raise ParamError(f"{spec.name}: unsupported type {spec.type}")


def validate(specs: Sequence[P], values: Dict[str, Any]) -> Dict[str, Any]:
    """Coerce and check ``values`` (unknown names are errors); missing names take the default."""
    by = {s.name: s for s in specs}
    unknown = sorted(set(values) - set(by))
    if unknown:
        raise ParamError(f"unknown parameter(s): {', '.join(unknown)}")
    out = {}
    for s in specs:
        v = _coerce(s, values.get(s.name, s.default))
        if s.check is not None:
            err = s.check(v)
            if err:
                raise ParamError(f"{s.name}={v!r}: {err}")
        out[s.name] = v
    return out


def declare(node, specs: Sequence[P]) -> Dict[str, Any]:
    """Declare all parameters on an rclpy node (descriptors with description/read_only) and validate them.

    Floats and lists are declared with ``dynamic_typing`` so a YAML ``rate: 10`` (an int) is accepted and coerced
    here instead of failing with rclpy's InvalidParameterTypeException; the validation below is the type check.
    """
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.parameter import Parameter

    raw = {}
    for s in specs:
        dyn = s.type in (float, list)
        desc = ParameterDescriptor(description=s.doc, read_only=s.read_only, dynamic_typing=dyn)
        if s.type is list and not s.default:
            ptype = Parameter.Type.DOUBLE_ARRAY if s.elem is float else Parameter.Type.STRING_ARRAY
            desc.dynamic_typing = False
            p = node.declare_parameter(s.name, ptype, desc)
        else:
            p = node.declare_parameter(s.name, s.default, desc)
        v = p.value
        if v is None:
            v = s.default
        if s.type is list:
            v = list(v)
        raw[s.name] = v
    return validate(specs, raw)


def markdown_table(specs: Sequence[P]) -> str:
    rows = ["| name | type | default | read-only | meaning |", "|---|---|---|---|---|"]
    for s in specs:
        t = s.type.__name__ if s.type is not list else f"list[{s.elem.__name__}]"
        rows.append(f"| `{s.name}` | {t} | `{s.default!r}` | {'yes' if s.read_only else 'no'} | {s.doc} |")
    return "\n".join(rows)
