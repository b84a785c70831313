"""Detector node under load: the main (executor) thread's CPU and the newest frame's latency at 0/1/10/20 Hz input.

Starts the real detector node as a subprocess (real rclpy, its own ROS domain), publishes one real KITTI frame
(cloud + image + camera_info + extrinsic, a new stamp each time) at each rate for ``--seconds`` and records:

- ``main_thread_cpu_pct``: CPU time of the detector's main thread (the executor; /proc/PID/task/PID/stat) per wall
  second over the phase, in percent of one core; ``process_cpu_pct`` for all threads (inference included);
- ``latency_s``: for every output, receive time - the frame's stamp (the stamps are wall ROS time); ``newest`` is
  the latency of the newest input frame's output, i.e. of the last output of the phase, which is what a planner sees;
- outputs, inputs, and outputs whose frame was the newest input at the time it was taken (drops are expected above
  the pipeline's rate: newest frame wins).

    python bench/bench_node_load.py --rates 0 1 10 20 --seconds 30 --json node_load.json
    python bench/bench_node_load.py --tiny-sleep-ms 200        # test pipeline (200 ms per frame) instead of CMF-IOU
    python bench/bench_node_load.py --device cuda --engine graph --model-config cfg_bf16.yaml --frames 13 \
        --rates 1 10 20 --json node_load_h200.json                # the GPU host: every real frame in turn

Per phase, ``dropped`` counts inputs without an output (the node keeps the newest frame: above its rate it drops by
design; at a rate it sustains it must drop none), ``frame_ms`` the node's own time per frame (FrameTimings.total_ms:
conversion + pipeline + publish).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def thread_cpu_s(pid: int, tid: int) -> float:
    """utime + stime of one thread in seconds (fields 14 and 15 of /proc/PID/task/TID/stat)."""
    try:
        txt = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")
    fields = txt[txt.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    txt = Path(f"/proc/{pid}/stat").read_text()
    fields = txt[txt.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 1.0, 10.0, 20.0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "kitti_samples" / "object"))
    ap.add_argument("--frame", type=int, default=0, help="index of the KITTI frame to publish")
    ap.add_argument("--frames", type=int, default=1,
                    help="publish this many frames from --frame on, in turn (KITTI's image sizes vary: each size is "
                         "one capacity bucket of the graph engine)")
    ap.add_argument("--engine", default="", help="the node's engine parameter (eager | graph | auto; '' = config)")
    ap.add_argument("--model-config", default="", help="the node's model_config parameter (e.g. inference.precision)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--tiny-sleep-ms", type=float, default=None,
                    help="use test/tiny_pipeline.py with this much latency instead of the real pipeline")
    ap.add_argument("--domain", type=int, default=int(os.environ.get("CMFIOU_BENCH_DOMAIN", "77")))
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--drain", type=float, default=90.0,
                    help="after a phase, wait up to this long for the newest frame's output (s)")
    ap.add_argument("--json", default=None, help="write the results here ('-' = stdout)")
    ns = ap.parse_args(argv)

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from geometry_msgs.msg import TransformStamped
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from vision_msgs.msg import Detection3DArray

    from cmfiou_ros.msg import FrameTimings

    from benchutil import write_json
    from cmfiou_core.provenance import provenance
    from cmfiou_ros import convert as C
    from cmfiou_ros.replay_node import KittiSource
    from cmfiou_ros.run_graph import child_env

    if ns.frames < 1:
        raise SystemExit("--frames must be >= 1")
    src = KittiSource(ns.data)
    msgs = []  # (cloud, image, info, extrinsic) per published frame
    for k in range(ns.frames):
        _, pts, rgb, calib = src.load((ns.frame + k) % len(src))
        T = np.eye(4)
        T[:3] = calib.Tr_velo_to_cam
        msgs.append((C.xyzi_to_pointcloud2(pts, 0, "velo_link"), C.rgb_to_image(rgb, 0, "cam"),
                     C.calibration_to_camera_info(calib, 0, "cam"), C.matrix_to_transform_msg(T, 0, "cam", "velo_link")))

    params = ["-p", "use_tf:=false", "-p", "extrinsic_topic:=/bench/lidar_to_camera", "-p", "diagnostics_period:=1.0",
              "-p", f"device:={ns.device}"]
    env = {"ROS_DOMAIN_ID": str(ns.domain)}
    if ns.tiny_sleep_ms is not None:
        params += ["-p", f"pipeline_factory:={REPO / 'test' / 'tiny_pipeline.py'}:TinyPipeline.from_config"]
        env["CMFIOU_TINY_SLEEP_MS"] = str(ns.tiny_sleep_ms)
    elif ns.checkpoint:
        params += ["-p", f"checkpoint:={ns.checkpoint}"]
    if ns.engine:
        params += ["-p", f"engine:={ns.engine}"]
    if ns.model_config:
        params += ["-p", f"model_config:={Path(ns.model_config).resolve()}"]
    cmd = [sys.executable, "-m", "cmfiou_ros.detector_node", "--ros-args"] + params
    proc = subprocess.Popen(cmd, env=child_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ns.domain)
    node = rclpy.create_node("bench_node_load", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    rel = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pubs = {"info": node.create_publisher(CameraInfo, "/kitti/camera_color_left/camera_info", rel),
            "image": node.create_publisher(Image, "/kitti/camera_color_left/image_raw", rel),
            "cloud": node.create_publisher(PointCloud2, "/kitti/velo/pointcloud", rel),
            "ext": node.create_publisher(TransformStamped, "/bench/lidar_to_camera", latched)}
    proc_ms = []  # per output: the node's own frame time (FrameTimings.total_ms: callback to publish)
    node.create_subscription(FrameTimings, "/cmfiou_detector/timings", lambda m: proc_ms.append(m.total_ms),
                             QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    got = []  # (receive wall ns, stamp ns)
    node.create_subscription(Detection3DArray, "/cmfiou_detector/detections",
                             lambda m: got.append((time.time_ns(), C.stamp_to_ns(m.header.stamp))),
                             QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    results = {"command": " ".join(["python", "bench/bench_node_load.py"] + (argv if argv is not None else
                                                                              sys.argv[1:])),
               "pipeline": "tiny" if ns.tiny_sleep_ms is not None else "cmfiou", "device": ns.device,
               "engine": ns.engine or "config", "model_config": ns.model_config or "default", "frames": ns.frames,
               "cpu_count": os.cpu_count(), "phases": [],
               "note": "a shared host: other jobs ran beside the bench (loadavg_1min per phase: at the start and end, "
                       "mean and max of 1 s samples; it includes the detector and this publisher, ~1-2)",
               "provenance": provenance(None, None if ns.tiny_sleep_ms is not None else ns.checkpoint, ns.device)}
    try:
        t_end = time.monotonic() + ns.startup_timeout
        while node.count_subscribers("/kitti/velo/pointcloud") < 1 or \
                node.count_publishers("/cmfiou_detector/detections") < 1:
            ex.spin_once(timeout_sec=0.1)
            if proc.poll() is not None or time.monotonic() > t_end:
                raise SystemExit(f"detector did not come up (rc {proc.poll()}): {proc.stderr.read()[-2000:]}")
        time.sleep(2.0)  # discovery of the other topics; pipeline warm-up already done at configure

        def publish(stamp_ns, k):
            cloud, image, info, ext = msgs[k % len(msgs)]
            st = C.ns_to_stamp(stamp_ns)
            ext.header.stamp = info.header.stamp = image.header.stamp = cloud.header.stamp = st
            pubs["ext"].publish(ext)
            pubs["info"].publish(info)
            pubs["image"].publish(image)
            pubs["cloud"].publish(cloud)

        for rate in ns.rates:
            got.clear()
            sent = []
            ex.spin_once(timeout_sec=0.5)
            got.clear()
            proc_ms.clear()
            load0 = os.getloadavg()[0]
            loads, t_load = [load0], time.monotonic()
            c0, p0, w0 = thread_cpu_s(proc.pid, proc.pid), process_cpu_s(proc.pid), time.monotonic()
            period = 1.0 / rate if rate > 0 else None
            t_next = time.monotonic()
            while time.monotonic() - w0 < ns.seconds:
                if period is not None and time.monotonic() >= t_next:
                    s = time.time_ns()
                    publish(s, len(sent))
                    sent.append(s)
                    t_next += period
                wait = 0.05 if period is None else max(0.0, min(0.05, t_next - time.monotonic()))
                ex.spin_once(timeout_sec=wait)
                if time.monotonic() - t_load >= 1.0:
                    loads.append(os.getloadavg()[0])
                    t_load = time.monotonic()
            c1, p1, w1 = thread_cpu_s(proc.pid, proc.pid), process_cpu_s(proc.pid), time.monotonic()
            # outputs still in flight belong to this phase's frames: drain for a while (not counted in the CPU)
            t_drain = time.monotonic() + ns.drain
            while sent and (not got or got[-1][1] != sent[-1]) and time.monotonic() < t_drain:
                ex.spin_once(timeout_sec=0.05)
            lat = [(r - s) * 1e-9 for r, s in got]
            newest = [(r - s) * 1e-9 for r, s in got if sent and s == sent[-1]]
            pct = (lambda v, q: float(np.percentile(v, q)) if v else None)
            ph = {"rate_hz": rate, "seconds": round(w1 - w0, 2), "inputs": len(sent), "outputs": len(got),
                  "dropped": len(set(sent) - {s for _, s in got}),
                  "main_thread_cpu_pct": round(100.0 * (c1 - c0) / (w1 - w0), 1),
                  "process_cpu_pct": round(100.0 * (p1 - p0) / (w1 - w0), 1),
                  "frame_ms_p50": pct(proc_ms, 50),
                  "frame_ms": {"p50": pct(proc_ms, 50), "p95": pct(proc_ms, 95), "p99": pct(proc_ms, 99),
                               "max": max(proc_ms) if proc_ms else None},
                  "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
                  "loadavg_1min_mean_max": [round(float(np.mean(loads)), 2), round(max(loads), 2)],
                  "latency_s": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
                                "max": max(lat) if lat else None,
                                "newest": newest[0] if newest else None}}
            results["phases"].append(ph)
            print(json.dumps(ph), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    write_json(results, ns.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
