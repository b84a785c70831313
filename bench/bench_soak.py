"""Soak test: replay in a loop through the detector for N minutes; sample the RSS of every node and the detector's
queue/drop counters (from /diagnostics); report the RSS slope (MB/min, least squares after a warm-up) and totals.

    python bench/bench_soak.py --minutes 10 --data ../shared/kitti_samples/object --rate 10 \
        --pipeline-factory cmfiou_core.pipeline:Pipeline.from_config --json soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return float("nan")


def slope_mb_per_min(t_s, mb) -> float:
    t, m = np.asarray(t_s, float), np.asarray(mb, float)
    ok = np.isfinite(m)
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(t[ok] / 60.0, m[ok], 1)[0])


def slope_stderr_mb_per_min(t_s, mb) -> float:
    """Standard error of the least-squares slope (MB/min): the RSS is sampled at random phases of a multi-second
    CPU frame, so single samples jitter by a few hundred MB and a slope means little without it."""
    t, m = np.asarray(t_s, float), np.asarray(mb, float)
    ok = np.isfinite(m)
    if ok.sum() < 4:
        return float("nan")
    _, cov = np.polyfit(t[ok] / 60.0, m[ok], 1, cov=True)
    return float(np.sqrt(cov[0, 0]))


def windows(t_s, mb, window_s: float = 120.0) -> list:
    """Per window of wall time: median / min / max RSS (the median is robust to the in-frame jitter)."""
    t, m = np.asarray(t_s, float), np.asarray(mb, float)
    out = []
    for a in np.arange(0.0, (t.max() if len(t) else 0.0) + 1e-9, window_s):
        k = (t >= a) & (t < a + window_s) & np.isfinite(m)
        if k.any():
            out.append({"t0_min": round(a / 60.0, 1), "median": _r(np.median(m[k]), 1), "min": _r(m[k].min(), 1),
                        "max": _r(m[k].max(), 1), "n": int(k.sum())})
    return out


def summarize(t, s, warmup_s: float) -> dict:
    t, s = np.asarray(t, float), np.asarray(s, float)
    end = t.max() if len(t) else 0.0
    keep, half = t >= min(warmup_s, end / 2), t >= end / 2
    w = windows(t, s)
    wt = np.array([x["t0_min"] * 60 for x in w])
    wm = np.array([x["median"] for x in w], float)
    return {"first": _r(s[0]) if len(s) else None, "last": _r(s[-1]) if len(s) else None,
            "max": _r(np.nanmax(s)) if len(s) else None,
            "slope_mb_per_min_all": _r(slope_mb_per_min(t, s)),
            "slope_mb_per_min_after_warmup": _r(slope_mb_per_min(t[keep], s[keep])),
            "slope_stderr_after_warmup": _r(slope_stderr_mb_per_min(t[keep], s[keep])),
            "slope_mb_per_min_last_half": _r(slope_mb_per_min(t[half], s[half])),
            "slope_stderr_last_half": _r(slope_stderr_mb_per_min(t[half], s[half])),
            "slope_of_window_medians_after_warmup": _r(slope_mb_per_min(wt[wt >= warmup_s], wm[wt >= warmup_s])),
            "windows_2min": w}


def _r(x, nd=3):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--data", default=None, help="dataset (default: generated demo scenes)")
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--pipeline-factory", default="cmfiou_core.pipeline:Pipeline.from_config")
    ap.add_argument("--config", default="")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds excluded from the slope")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the graph's processes (e.g. MALLOC_ARENA_MAX=2); repeatable")
    ap.add_argument("--detector-param", action="append", default=[], metavar="NAME=VALUE",
                    help="extra detector parameter (YAML value), e.g. malloc_trim_period=1; repeatable")
    ap.add_argument("--json", default=None, help="write the report here")
    ns = ap.parse_args(argv)

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2
    from vision_msgs.msg import Detection3DArray

    from cmfiou_ros.graph import TOPICS, replay_graph
    from cmfiou_ros.run_graph import Graph

    if ns.data is None:
        from cmfiou_core.data.synthetic import ensure_demo_scenes

        ns.data = str(ensure_demo_scenes())
    domain = int(os.environ.get("ROS_DOMAIN_ID", "0")) or random.randint(120, 220)
    specs = replay_graph({"data": ns.data, "rate": str(ns.rate), "loop": "true", "lockstep": "false",
                          "pipeline_factory": ns.pipeline_factory, "config": ns.config, "checkpoint": ns.checkpoint})
    specs[0].parameters.update(wait_for_subscribers=2, wait_timeout=600.0)
    import yaml

    for kv in ns.detector_param:
        k, _, v = kv.partition("=")
        next(s for s in specs if s.name == "cmfiou_detector").parameters[k] = yaml.safe_load(v)
    extra_env = dict(kv.partition("=")[::2] for kv in ns.env)
    log_dir = tempfile.mkdtemp(prefix="cmfiou_soak_")
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("cmfiou_soak", context=ctx)
    state = {"outputs": 0, "diag": {}}

    def on_diag(msg):
        for st in msg.status:
            state["diag"][st.name] = {kv.key: kv.value for kv in st.values}

    node.create_subscription(Detection3DArray, TOPICS["detections"],
                             lambda m: state.__setitem__("outputs", state["outputs"] + 1), QoSProfile(depth=50))
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, QoSProfile(depth=10))
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    g = Graph(specs, env={"ROS_DOMAIN_ID": str(domain), **extra_env}, log_dir=log_dir).start()
    samples = {name: [] for name in g.procs}
    anon = {name: [] for name in g.procs}
    times, queue_samples = [], []
    started = None
    t_sample = 0.0
    try:
        t_up = time.monotonic()
        while node.count_publishers(TOPICS["detections"]) < 1:
            ex.spin_once(timeout_sec=0.1)
            if g.poll() is not None or time.monotonic() - t_up > 600:
                print(f"graph did not come up; logs in {log_dir}", file=sys.stderr)
                return 1
        node.create_subscription(PointCloud2, TOPICS["lidar"], lambda m: None, qos_profile_sensor_data)
        started = time.monotonic()
        while time.monotonic() - started < ns.minutes * 60:
            ex.spin_once(timeout_sec=0.1)
            if g.poll() is not None:
                print(f"node exited: {g.poll()}; logs in {log_dir}", file=sys.stderr)
                return 1
            now = time.monotonic() - started
            if now >= t_sample:
                t_sample = now + ns.sample_every
                times.append(now)
                for name, p in g.procs.items():
                    samples[name].append(rss_mb(p.pid))
                    anon[name].append(rss_mb(p.pid, "RssAnon"))
                sync = next((v for k, v in state["diag"].items() if k.endswith(": sync")), {})
                inf = next((v for k, v in state["diag"].items() if k.endswith(": inference")), {})
                queue_samples.append({"t": round(now, 1), "sync_queue_sizes": sync.get("sync_queue_sizes"),
                                      "frames_dropped": inf.get("frames_dropped"), "outputs": state["outputs"],
                                      "rss_mb": {n: round(v[-1], 1) for n, v in samples.items()}})
    finally:
        g.stop()
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    t = np.asarray(times)
    inf = next((v for k, v in state["diag"].items() if k.endswith(": inference")), {})
    queues = [json.loads(q["sync_queue_sizes"]) for q in queue_samples if q.get("sync_queue_sizes")]

    def series(s):
        return summarize(t, s, ns.warmup)

    report = {
        "minutes": ns.minutes, "rate_hz": ns.rate, "data": ns.data, "pipeline_factory": ns.pipeline_factory,
        "env": extra_env, "detector_params": ns.detector_param, "warmup_s": ns.warmup,
        "outputs": state["outputs"], "frames_in": inf.get("frames_in"), "frames_out": inf.get("frames_out"),
        "frames_dropped": inf.get("frames_dropped"), "pipeline_errors": inf.get("pipeline_errors"),
        "last_pipeline_error": inf.get("last_pipeline_error"), "latency_ms_p50": inf.get("latency_ms_p50"),
        "latency_ms_p95": inf.get("latency_ms_p95"), "processing_ms_p95": inf.get("processing_ms_p95"),
        "max_sync_queue_sizes": [int(max(q[i] for q in queues)) for i in range(len(queues[0]))] if queues else None,
        "rss_mb": {n: series(s) for n, s in samples.items()},
        "rss_anon_mb": {n: series(s) for n, s in anon.items()},
        "samples": [{"t": round(float(x), 1), **{n: round(samples[n][i], 1) for n in samples}}
                    for i, x in enumerate(times)],
        "queue_samples": queue_samples[-20:], "logs": log_dir,
    }
    from cmfiou_core.provenance import provenance

    report["provenance"] = provenance(ns.config, ns.checkpoint, "cpu")
    text = json.dumps(report, indent=2)
    print(text)
    if ns.json:
        Path(ns.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
