#!/usr/bin/env python3
"""The detector node's own per-frame cost, outside the pipeline: what it pays on the host for each frame at any rate.

Per real KITTI frame (cloud ~120k points, 1242x375 image) and a result of ``--boxes`` detections, timed separately,
``--iters`` times each (p50 / p95 / p99, ms):

* ``deserialize_inputs``: rclpy's CDR -> Python of the PointCloud2, Image and CameraInfo (what the executor does
  before a subscription callback runs);
* ``cloud_to_array`` / ``image_to_array`` / ``camera_info_to_calibration``: ``cmfiou_ros.convert`` (validation,
  zero-copy structured view, one float32 copy);
* ``detections_to_messages``: Detection3DArray + DetectionScores + FrameTimings;
* ``serialize_outputs``: Python -> CDR of those messages (what a publish costs before the middleware);
* ``node_total``: the sum, i.e. the host time the node adds to the pipeline's latency per frame;
* ``markers_while_subscribed``: the RViz MarkerArray (built and serialized), which the node adds only while the
  markers topic has a subscriber.

    python bench/bench_node_cost.py --kitti ../shared/kitti_samples/object/training --json out/node_cost.json
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(v):
    a = np.asarray(v, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def _fake_detections(n: int, seed: int = 0):
    from cmfiou_core.types import Detections

    rng = np.random.default_rng(seed)
    boxes = np.column_stack([rng.uniform(5, 60, n), rng.uniform(-20, 20, n), rng.uniform(-1.5, 0, n),
                             rng.uniform(1, 4.5, n), rng.uniform(0.5, 2, n), rng.uniform(1, 2, n),
                             rng.uniform(-np.pi, np.pi, n)]).astype(np.float32)
    return Detections(boxes, rng.integers(1, 4, n), rng.uniform(0, 1, n).astype(np.float32),
                      rng.uniform(0, 1, n).astype(np.float32), rng.uniform(0, 1, n).astype(np.float32),
                      stamp_ns=1, frame_id="velodyne", class_names=("Car", "Pedestrian", "Cyclist"),
                      timings_ms={"depth": 3.0, "backbone_3d": 20.0, "total": 40.0})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kitti", default=str(ROOT.parent / "shared" / "kitti_samples" / "object" / "training"),
                    help="KITTI object 'training' folder (velodyne, image_2, calib)")
    ap.add_argument("--frames", type=int, default=4, help="real frames to use (cycled)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--boxes", type=int, default=50, help="detections per frame in the output messages")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from rclpy.serialization import deserialize_message, serialize_message

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_pipeline import load_frames

    from cmfiou_ros import convert as C
    from cmfiou_ros.msg_types import CameraInfo, Image, PointCloud2

    root = Path(args.kitti)
    if not (root / "velodyne").is_dir():
        raise SystemExit(f"--kitti {root}: no velodyne/ folder (give a KITTI object 'training' folder)")
    frames = load_frames([str(root)], 0, ROOT / "data", args.frames)[:args.frames]
    inputs = []
    for _, fr in frames:
        pc = C.xyzi_to_pointcloud2(fr.points, 1, "velodyne")
        im = C.rgb_to_image(fr.image, 1)
        ci = C.calibration_to_camera_info(fr.calib, 1)
        inputs.append((serialize_message(pc), serialize_message(im), serialize_message(ci), fr.calib))
    det = _fake_detections(args.boxes)
    stages = {k: [] for k in ("deserialize_inputs", "cloud_to_array", "image_to_array", "camera_info_to_calibration",
                              "detections_to_messages", "serialize_outputs", "node_total",
                              "markers_while_subscribed")}
    n_points = []
    for it in range(args.iters):
        raw_pc, raw_im, raw_ci, calib = inputs[it % len(inputs)]
        T = np.vstack([calib.Tr_velo_to_cam, [0.0, 0.0, 0.0, 1.0]])
        t0 = time.perf_counter()
        pc = deserialize_message(raw_pc, PointCloud2)
        im = deserialize_message(raw_im, Image)
        ci = deserialize_message(raw_ci, CameraInfo)
        t1 = time.perf_counter()
        pts, _ = C.pointcloud2_to_xyzi(pc)
        t2 = time.perf_counter()
        C.image_to_rgb(im)
        t3 = time.perf_counter()
        C.camera_info_to_calibration(ci, T)
        t4 = time.perf_counter()
        h = C._header(1, "velodyne")
        outs = [C.detections_to_detection3d_array(det, h), C.detections_to_scores_msg(det, h),
                C.timings_to_msg(det.timings_ms, h, 40.0, 50.0)]
        t5 = time.perf_counter()
        for m in outs:
            serialize_message(m)
        t6 = time.perf_counter()
        serialize_message(C.detections_to_markers(det, h))   # only while someone subscribes (RViz)
        t7 = time.perf_counter()
        for k, a, b in (("deserialize_inputs", t0, t1), ("cloud_to_array", t1, t2), ("image_to_array", t2, t3),
                        ("camera_info_to_calibration", t3, t4), ("detections_to_messages", t4, t5),
                        ("serialize_outputs", t5, t6), ("node_total", t0, t6),
                        ("markers_while_subscribed", t6, t7)):
            stages[k].append((b - a) * 1e3)
        n_points.append(len(pts))
    result = {"what": "the detector node's host cost per frame outside the pipeline (message (de)serialization and "
                      "conversion)", "cpu": platform.processor() or platform.machine(),
              "frames": [n for n, _ in frames], "mean_points": float(np.mean(n_points)), "boxes": args.boxes,
              "iters": args.iters, "stages_ms": {k: _pct(v) for k, v in stages.items()}}
    try:
        import os

        result["load_average"] = os.getloadavg()
    except OSError:
        pass
    for k, s in result["stages_ms"].items():
        print(f"{k:28s} p50 {s['p50']:7.2f}  p95 {s['p95']:7.2f}  p99 {s['p99']:7.2f} ms")
    if args.json:
        from cmfiou_core.provenance import write_report

        write_report(args.json, result, config=None, checkpoint=None, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
