"""cmfiou-demo: replay -> detector graph (the same graph as launch/kitti_replay.launch.py, run as subprocesses) on the
embedded demo scenes, with a subscriber that prints a per-frame summary and a final latency summary. Exits 0.

    cmfiou-demo                                   # generated demo scenes (cmfiou_core.data.synthetic)
    cmfiou-demo --data ../shared/kitti_samples/object --rate 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np


def _demo_data() -> str:
    from cmfiou_core.data.synthetic import ensure_demo_scenes

    return str(ensure_demo_scenes())


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset folder (default: the generated demo scenes)")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--max-frames", type=int, default=0)
    ap.add_argument("--pipeline-factory", default="cmfiou_core.pipeline:Pipeline.from_config")
    ap.add_argument("--config", default="")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--use-sim-time", action="store_true", help="replay publishes /clock; nodes use sim time")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    ap.add_argument("--log-dir", default=None, help="node logs (default: a temporary folder, shown on failure)")
    ns = ap.parse_args(argv)

    import tempfile

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String
    from vision_msgs.msg import Detection3DArray

    from cmfiou_ros import convert as C
    from cmfiou_ros.graph import TOPICS, replay_graph
    from cmfiou_ros.msg import DetectionScores, FrameTimings
    from cmfiou_ros.run_graph import Graph

    data = ns.data or _demo_data()
    domain = int(os.environ.get("ROS_DOMAIN_ID", "0")) or random.randint(120, 220)
    log_dir = ns.log_dir or tempfile.mkdtemp(prefix="cmfiou_demo_")
    specs = replay_graph({"data": data, "rate": str(ns.rate), "max_frames": str(ns.max_frames),
                          "pipeline_factory": ns.pipeline_factory, "config": ns.config,
                          "checkpoint": ns.checkpoint, "device": ns.device,
                          "use_sim_time": str(ns.use_sim_time).lower()})
    # lockstep: every frame is shown whatever the pipeline's speed (bench/bench_soak.py measures drops instead)
    specs[0].parameters.update(wait_for_subscribers=2, wait_timeout=ns.timeout, lockstep_topic=TOPICS["detections"],
                               lockstep_timeout=ns.timeout)

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("cmfiou_demo", context=ctx)
    dets: Dict[int, object] = {}
    scores: Dict[int, object] = {}
    timings: Dict[int, object] = {}
    maps: List[dict] = []
    q = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_subscription(Detection3DArray, TOPICS["detections"],
                             lambda m: dets.__setitem__(C.stamp_to_ns(m.header.stamp), m), q)
    node.create_subscription(DetectionScores, TOPICS["scores"],
                             lambda m: scores.__setitem__(C.stamp_to_ns(m.header.stamp), m), q)
    node.create_subscription(FrameTimings, TOPICS["timings"],
                             lambda m: timings.__setitem__(C.stamp_to_ns(m.header.stamp), m), q)
    node.create_subscription(String, TOPICS["frame_map"], lambda m: maps.append(json.loads(m.data)), latched)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    print(f"[demo] data {data}; graph: {', '.join(s.name for s in specs)}; ROS_DOMAIN_ID={domain}; logs {log_dir}")
    g = Graph(specs, env={"ROS_DOMAIN_ID": str(domain)}, log_dir=log_dir).start()
    printed = set()
    subscribed = False
    t0 = time.monotonic()
    rc = 0
    try:
        while time.monotonic() - t0 < ns.timeout:
            ex.spin_once(timeout_sec=0.05)
            if not subscribed and node.count_publishers(TOPICS["detections"]) >= 1:
                from rclpy.qos import qos_profile_sensor_data
                from sensor_msgs.msg import PointCloud2

                # the replay starts once the detector and this demo are both listening (see wait_for_subscribers)
                node.create_subscription(PointCloud2, TOPICS["lidar"], lambda m: None, qos_profile_sensor_data)
                subscribed = True
            frames = maps[-1]["frames"] if maps else []
            for seq, index, stamp, cam in frames:
                if stamp in dets and stamp in scores and stamp not in printed:
                    printed.add(stamp)
                    _print_frame(index, stamp, dets[stamp], scores[stamp], timings.get(stamp))
            if maps and maps[-1]["done"] and all(f[2] in printed for f in frames):
                break
            ended = g.poll()
            if ended is not None:
                print(f"[demo] node {ended[0]} exited with {ended[1]}; logs in {log_dir}", file=sys.stderr)
                rc = 1
                break
        else:
            print(f"[demo] timed out after {ns.timeout:.0f} s; logs in {log_dir}", file=sys.stderr)
            rc = 1
    except KeyboardInterrupt:
        rc = 130
    finally:
        g.stop()
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    n_frames = len(maps[-1]["frames"]) if maps else 0
    lat = np.array([timings[s].input_age_ms for s in printed if s in timings])
    proc = np.array([timings[s].total_ms for s in printed if s in timings])
    lo = sum(1 for s in printed if scores[s].lidar_only)
    print(f"[demo] frames replayed {n_frames}, with detections {len(printed)}, LiDAR-only {lo}")
    if len(lat):
        print(f"[demo] latency (publish - LiDAR stamp) p50 {np.percentile(lat, 50):.1f} ms, "
              f"p95 {np.percentile(lat, 95):.1f} ms; node processing p50 {np.percentile(proc, 50):.1f} ms, "
              f"p95 {np.percentile(proc, 95):.1f} ms")
    if rc == 0 and not printed:
        rc = 1
    return rc


def _print_frame(index, stamp, det, sc, tm) -> None:
    mode = "LiDAR-only" if sc.lidar_only else "camera+LiDAR"
    lat = f", latency {tm.input_age_ms:.0f} ms" if tm is not None else ""
    print(f"frame {index} (stamp {stamp / 1e9:.3f}): {len(det.detections)} detections, {mode}{lat}")
    for k, d in enumerate(det.detections):
        p = d.bbox.center.position
        iou = sc.iou_score[k] if k < len(sc.iou_score) else float("nan")
        iou_s = f"{iou:.2f}" if iou == iou else "n/a"
        print(f"    {d.results[0].hypothesis.class_id:<10} score {d.results[0].hypothesis.score:.2f}  "
              f"IoU {iou_s}  distance {math.hypot(p.x, p.y):5.1f} m")


if __name__ == "__main__":
    raise SystemExit(main())
