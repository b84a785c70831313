"""``cmfiou-bag-eval BAG --out DIR [--mode offline|node] [predictor options]``: evaluate a detector on a bag.

Bags are those of ``cmfiou-kitti2bag`` (layout: :mod:`cmfiou_core.eval.bag_io`). Predictors:

- default: ``cmfiou_core.pipeline.Pipeline.from_config(--config, --checkpoint, --device)`` (``--pipeline-factory
  module:attr`` picks another callable with that signature, e.g. a test pipeline);
- ``--predictions-from-gt``: the bag's own label_2 lines (Car/Pedestrian/Cyclist, score 1) -- checks the protocol,
  gives exactly the perfect-prediction AP;
- ``--empty``: no detections (AP 0).

Modes:
- ``offline``: every frame through the pipeline in this process (the single inference path), timings from
  ``Detections.timings_ms`` plus ``total``;
- ``node``: plays the bag (raw CDR bytes, no re-serialisation) into the detector node (started in this process,
  lifecycle configure+activate, unless ``--external-node``) and records its Detection3DArray + FrameTimings;
  by default in lockstep (``--rate 0``: each cloud is published once the node answered the previous one, so no frame
  is dropped whatever the node's speed); ``--rate R`` plays in real time (R = realtime factor, 1.0 = 10 Hz as
  recorded), where the node drops the frames it cannot keep up with. Frames without an output within
  ``--node-timeout`` are *dropped* (evaluated as empty); the drop count is always printed.

LiDAR boxes become KITTI result lines as OpenPCDet does (``--pad-small-boxes`` adds
CMF-IOU's +2 px to < 25 px boxes). Output: printed table, DIR/report.json, report.html, pr_curves.png,
latency.png, results/<index>.txt. Exit code 2 on bad input (nothing written).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Callable, List, Optional

import numpy as np

from cmfiou_core.eval import bag_io
from cmfiou_core.factory import load_factory as _load_factory
from cmfiou_core.geometry.rotation import quaternion_to_yaw
from cmfiou_core.eval.kitti_io import lidar_boxes_to_result_text
from cmfiou_core.eval.report import FrameResult, build_report, format_table, write_report
from cmfiou_core.provenance import provenance

EVAL_CLASSES = ("Car", "Pedestrian", "Cyclist")


def gt_result_text(label_text: Optional[str]) -> str:
    """Label lines of the evaluated classes with a score of 1 appended (the ground truth as predictions)."""
    out = []
    for ln in (label_text or "").splitlines():
        p = ln.split()
        if p and p[0] in EVAL_CLASSES:
            out.append(" ".join(p[:15]) + " 1.0\n")
    return "".join(out)


def load_factory(path: str) -> Callable:
    return _load_factory(path, "--pipeline-factory")


def _result_text(det, frame: bag_io.BagFrame, pad_small: bool) -> str:
    if len(det) == 0:
        return ""
    shape = None if frame.image is None else frame.image.shape[:2]
    return lidar_boxes_to_result_text(det.boxes, det.labels, det.scores, frame.calib, shape,
                                      class_names=tuple(det.class_names), pad_small=pad_small)


def run_offline(frames: List[bag_io.BagFrame], args) -> List[FrameResult]:
    from cmfiou_core.types import Frame

    out: List[FrameResult] = []
    if args.predictions_from_gt or args.empty:
        for f in frames:
            t = time.perf_counter()
            txt = gt_result_text(f.label_text) if args.predictions_from_gt else ""
            out.append(FrameResult(f.index, f.stamp_ns, txt, {"total": (time.perf_counter() - t) * 1e3}))
        return out
    from cmfiou_core.eval.dataset_eval import _progress

    factory = load_factory(args.pipeline_factory)
    pipe = factory(args.config, checkpoint=args.checkpoint, device=args.device)
    if hasattr(pipe, "warmup"):
        pipe.warmup()
    for f in _progress(frames, "bag-eval offline"):
        img = None if args.no_camera else f.image
        try:
            # the calibration as the node rebuilds it from CameraInfo + TF (one answer per frame on every path)
            calib = None if f.calib is None else bag_io.ros_calibration(f.calib)
            fr = Frame(f.points, img, calib, f.stamp_ns, bag_io.LIDAR_FRAME, f.index)
            t = time.perf_counter()
            det = pipe(fr)
            total = (time.perf_counter() - t) * 1e3
            tm = dict(det.timings_ms)
            tm["total"] = total
            why = ""
            if det.lidar_only:
                why = ("--no-camera" if args.no_camera else "the bag has no camera image for this frame"
                       if f.image is None else "the pipeline ran without depth completion (depth disabled in the "
                       "configuration)")
            out.append(FrameResult(f.index, f.stamp_ns, _result_text(det, f, args.pad_small_boxes), tm,
                                   lidar_only=bool(det.lidar_only), lidar_only_reason=why))
        except Exception as e:  # a failing frame is skipped = evaluated as empty, never removed
            out.append(FrameResult(f.index, f.stamp_ns, "", {}, "skipped", f"{type(e).__name__}: {e}"))
    return out


# ------------------------------------------------------------------------------------------------ node mode
def detection_array_to_arrays(msg, class_names=EVAL_CLASSES):
    """vision_msgs/Detection3DArray -> (boxes (M, 7), labels (M,), scores (M,)); unknown class ids are dropped."""
    boxes, labels, scores = [], [], []
    for d in msg.detections:
        if not d.results:
            continue
        h = d.results[0].hypothesis
        if h.class_id not in class_names:
            continue
        c, s, q = d.bbox.center.position, d.bbox.size, d.bbox.center.orientation
        yaw = quaternion_to_yaw(q)
        boxes.append([c.x, c.y, c.z, s.x, s.y, s.z, yaw])
        labels.append(class_names.index(h.class_id) + 1)
        scores.append(h.score)
    return (np.asarray(boxes, np.float64).reshape(-1, 7), np.asarray(labels, np.int64), np.asarray(scores))


def run_node(frames: List[bag_io.BagFrame], args) -> List[FrameResult]:
    """Thin layer: a player (bag raw CDR -> rclpy publishers, waits for subscriber match) + a recorder."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from cmfiou_ros.msg_types import Detection3DArray, FrameTimings
    from cmfiou_core.types import Detections

    from cmfiou_ros.msg_types import DetectionScores

    reasons = {}  # stamp -> why the node ran that frame LiDAR-only (in-process node only)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    nodes = []
    # single-threaded: callbacks run inline in spin_once (inference has its own worker thread in the node). rclpy's
    # MultiThreadedExecutor.shutdown destroys its guard condition while pool threads may still run a handler, which
    # then fails with "cannot use Destroyable" ("The following exception was never retrieved" at exit).
    ex = SingleThreadedExecutor(context=ctx)
    try:
        if not args.external_node:
            from cmfiou_ros.detector_node import DetectorNode

            overrides = [Parameter("extrinsic_topic", value=bag_io.TOPICS["extrinsic"]), Parameter("use_tf", value=False)]
            pipeline = None
            overrides += [Parameter("pipeline_factory", value=args.pipeline_factory),
                          Parameter("model_config", value=args.config or ""),
                          Parameter("checkpoint", value=args.checkpoint or "")]
            det_node = DetectorNode(pipeline=pipeline, context=ctx, parameter_overrides=overrides)
            nodes.append(det_node)
            from rclpy.lifecycle import TransitionCallbackReturn as TCR

            if det_node.trigger_configure() != TCR.SUCCESS or det_node.trigger_activate() != TCR.SUCCESS:
                raise bag_io.BagError("the detector node failed to configure/activate (see its log above)")
            ex.add_node(det_node)
            _record_lidar_only_reasons(det_node, reasons)
        io_node = rclpy.create_node("cmfiou_bag_eval", context=ctx)
        nodes.append(io_node)
        ex.add_node(io_node)
        got_det, got_tim, recv_wall, pub_wall, got_lo = {}, {}, {}, {}, {}

        def on_det(m):
            st = m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
            got_det[st] = m
            recv_wall[st] = time.monotonic()

        q = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        io_node.create_subscription(Detection3DArray, args.detections_topic, on_det, q)
        io_node.create_subscription(FrameTimings, args.timings_topic,
                                    lambda m: got_tim.__setitem__(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec, m), q)
        io_node.create_subscription(DetectionScores, args.scores_topic, lambda m: got_lo.__setitem__(
            m.header.stamp.sec * 10**9 + m.header.stamp.nanosec,
            (bool(m.lidar_only), str(getattr(m, "lidar_only_reason", "")))), q)
        # player: the raw CDR bytes of the bag, in bag order
        r = bag_io.open_bag(args.bag)
        msgs = importlib.import_module
        pubs = {}
        play = [k for k in ("extrinsic", "info", "image", "cloud") if bag_io.TOPICS[k] in bag_io.bag_topics(r)]
        for k in play:
            pkg, _, name = bag_io.TYPES[k].split("/")
            cls = getattr(msgs(f"{pkg}.msg"), name)
            qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if k == "extrinsic" else DurabilityPolicy.VOLATILE)
            pubs[bag_io.TOPICS[k]] = io_node.create_publisher(cls, bag_io.TOPICS[k], qos)
        t_end = time.monotonic() + args.match_timeout
        while time.monotonic() < t_end and not all(p.get_subscription_count() > 0 for p in pubs.values()):
            ex.spin_once(timeout_sec=0.05)
        missing = [t for t, p in pubs.items() if p.get_subscription_count() == 0]
        if missing:
            raise bag_io.BagError(f"no subscriber matched on {', '.join(missing)} within {args.match_timeout} s")
        conns = [c for c in r.connections if c.topic in pubs]
        t0_wall = time.monotonic()
        t0_bag = None
        for c, t, raw in r.messages(connections=conns):
            if t0_bag is None:
                t0_bag = t
            if args.rate > 0:
                due = t0_wall + (t - t0_bag) / 1e9 / args.rate
                while time.monotonic() < due:
                    ex.spin_once(timeout_sec=max(0.0, min(0.01, due - time.monotonic())))
            pubs[c.topic].publish(bytes(raw))
            if c.topic == bag_io.TOPICS["cloud"]:
                pub_wall[t] = time.monotonic()
            if args.rate <= 0 and c.topic == bag_io.TOPICS["cloud"]:
                deadline = time.monotonic() + args.node_timeout
                while t not in got_det and time.monotonic() < deadline:
                    ex.spin_once(timeout_sec=0.01)
        r.close()
        deadline = time.monotonic() + args.node_timeout
        stamps = [f.stamp_ns for f in frames]
        while time.monotonic() < deadline and not all(s in got_det for s in stamps):
            ex.spin_once(timeout_sec=0.02)
    finally:
        # executor first (it waits for its running callbacks), then the detector's worker, then the nodes: destroying
        # a node under a live executor leaves "cannot use Destroyable" futures behind
        ex.shutdown()
        for n in nodes:
            try:
                if hasattr(n, "_teardown"):
                    n._teardown()
                n.destroy_node()
            except Exception:  # noqa: BLE001
                pass
        rclpy.shutdown(context=ctx)
    node_drops = sum(int(getattr(m, "dropped_frames", 0)) for m in got_tim.values())
    missing = [f.index for f in frames if f.stamp_ns not in got_det]
    mode = "lockstep" if args.rate <= 0 else f"real time x{args.rate:g}"
    print(f"cmfiou-bag-eval: node mode ({mode}): {len(frames) - len(missing)} of {len(frames)} frames answered, "
          f"{len(missing)} dropped (no output within --node-timeout {args.node_timeout:g} s; evaluated as empty)"
          + (f": {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}" if missing else "")
          + (f"; the node reported {node_drops} frame(s) dropped for newer ones" if node_drops else ""),
          file=sys.stderr)
    out = []
    for f in frames:
        m = got_det.get(f.stamp_ns)
        if m is None:
            out.append(FrameResult(f.index, f.stamp_ns, "", {}, "dropped"))
            continue
        b, l, s = detection_array_to_arrays(m)
        det = Detections(b, l, s, np.full(len(s), np.nan), s)
        tm = {}
        ft = got_tim.get(f.stamp_ns)
        if ft is not None:
            tm = {st.stage: float(st.ms) for st in ft.stages}
            tm["total"] = float(ft.total_ms)
        if f.stamp_ns in pub_wall and f.stamp_ns in recv_wall:  # cloud published -> detections received
            tm["end_to_end"] = (recv_wall[f.stamp_ns] - pub_wall[f.stamp_ns]) * 1e3
        lo, msg_reason = got_lo.get(f.stamp_ns, (None, ""))
        why = reasons.get(f.stamp_ns) or msg_reason  # in-process: the frame assembly's; else DetectionScores'
        if lo is None:
            lo, why = False, "no DetectionScores message received: camera use unknown"
        out.append(FrameResult(f.index, f.stamp_ns, _result_text(det, f, args.pad_small_boxes), tm,
                               lidar_only=lo, lidar_only_reason=why if lo else ""))
    return out


def _record_lidar_only_reasons(det_node, reasons: dict) -> None:
    """Keep, per LiDAR stamp, the reason the in-process node's frame assembly gave for a frame without camera."""
    asm = getattr(det_node, "assembler", None)
    build = getattr(asm, "build", None)
    if build is None:
        return

    def recording_build(pairing, final=True):
        a = build(pairing, final)
        if a is not None and a.frame.image is None:
            reasons[a.frame.stamp_ns] = a.reason or "camera unavailable"
        return a

    asm.build = recording_build


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cmfiou-bag-eval", description=__doc__.strip().splitlines()[0])
    ap.add_argument("bag", help="rosbag2 folder (or .mcap) written by cmfiou-kitti2bag")
    ap.add_argument("--out", required=True, help="report folder")
    ap.add_argument("--mode", choices=("offline", "node"), default="offline")
    ap.add_argument("--config", default=None, help="pipeline/model config YAML")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pipeline-factory", default="cmfiou_core.pipeline:Pipeline.from_config")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--predictions-from-gt", action="store_true", help="use the label_2 lines as predictions")
    g.add_argument("--empty", action="store_true", help="predict nothing")
    ap.add_argument("--no-camera", action="store_true", help="offline: LiDAR-only frames (image=None)")
    ap.add_argument("--pad-small-boxes", action="store_true", help="CMF-IOU's +2 px for < 25 px 2D boxes")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="node mode: 0 (default) = lockstep, no frame dropped; R > 0 = real time x R (10 Hz as "
                         "recorded at 1.0): frames the node cannot keep up with are dropped (counted and printed)")
    ap.add_argument("--node-timeout", type=float, default=30.0, help="node mode: seconds to wait for an output")
    ap.add_argument("--match-timeout", type=float, default=10.0, help="node mode: seconds to wait for subscribers")
    ap.add_argument("--external-node", action="store_true", help="node mode: the detector node is already running")
    ap.add_argument("--detections-topic", default="/cmfiou_detector/detections")
    ap.add_argument("--timings-topic", default="/cmfiou_detector/timings")
    ap.add_argument("--scores-topic", default="/cmfiou_detector/scores")
    ap.add_argument("--no-results", action="store_true", help="do not write results/<index>.txt")
    a = ap.parse_args(argv)
    from cmfiou_core.model.checkpoint import CheckpointError

    try:
        frames = bag_io.read_frames(a.bag)  # whole bag read and validated before anything runs or is written
        if not frames:
            raise bag_io.BagError(f"{a.bag}: no frames")
        if a.mode == "node" and (a.predictions_from_gt or a.empty):
            raise ValueError("--predictions-from-gt / --empty are offline-mode predictors")
        if a.mode == "offline":
            res = run_offline(frames, a)
        else:
            res = run_node(frames, a)
        predictor = "ground truth" if a.predictions_from_gt else ("empty" if a.empty else a.pipeline_factory)
        model = not (a.predictions_from_gt or a.empty)
        rep = build_report(res, [f.label_text for f in frames],
                           {"bag": str(a.bag), "mode": a.mode, "predictor": predictor,
                            "config": a.config, "checkpoint": a.checkpoint,
                            "provenance": provenance(a.config if model else None, a.checkpoint if model else None,
                                                     a.device if model else None, resolve_default_checkpoint=model)})
    except (bag_io.BagError, ValueError, ImportError, CheckpointError, OSError) as e:
        # bad input (bag, options, config, checkpoint, a missing file): the reason, no traceback, nothing written
        print(f"cmfiou-bag-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rep), end="")
    paths = write_report(rep, res, a.out, write_results=not a.no_results)
    print(f"report: {paths['html']}  json: {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
