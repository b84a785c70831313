"""Which message sizes arrive between two processes under the active Fast DDS profile, reliable vs best effort.

A subscriber process (real rclpy) receives sensor_msgs/Image messages of each size, sent ``--sends`` times each
(``--gap`` s apart) by this process; the JSON records, per size and reliability, how many arrived, together with the
profile's SHM limits (cmfiou_ros.transport). The detector's camera/LiDAR subscriptions are best effort
(sensor-data QoS), its outputs reliable.

    python bench/bench_message_size.py --json docs/results/message_size_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SUBSCRIBER = r"""
import sys, time, rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
rclpy.init(domain_id=int(sys.argv[1]))
node = rclpy.create_node("size_sub")
rel = ReliabilityPolicy.RELIABLE if sys.argv[2] == "reliable" else ReliabilityPolicy.BEST_EFFORT
node.create_subscription(Image, "/size_probe", lambda m: print("got", m.header.frame_id, flush=True),
                         QoSProfile(depth=2, reliability=rel))
t_end = time.monotonic() + float(sys.argv[3])
try:
    while time.monotonic() < t_end:
        rclpy.spin_once(node, timeout_sec=0.1)
except Exception:  # SIGTERM at the end: rclpy shuts the context down
    pass
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 8, 15.9, 16.5, 24, 31, 33, 48, 80])
    ap.add_argument("--sends", type=int, default=3)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between sends")
    ap.add_argument("--domain", type=int, default=int(os.environ.get("CMFIOU_BENCH_DOMAIN", "78")))
    ap.add_argument("--json", default=None)
    ns = ap.parse_args(argv)

    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from benchutil import write_json
    from cmfiou_core.provenance import provenance
    from cmfiou_ros.run_graph import child_env
    from cmfiou_ros.transport import active_limit

    lim = active_limit()
    results = {"command": " ".join(["python", "bench/bench_message_size.py"] + (argv if argv is not None else
                                                                                 sys.argv[1:])),
               "profile": lim.source, "max_message_bytes": lim.max_message_bytes, "segment_bytes": lim.segment_bytes,
               "sends_per_size": ns.sends, "gap_s": ns.gap, "loadavg_1min_start": round(os.getloadavg()[0], 2),
               "runs": [], "provenance": provenance(None, None, "cpu")}
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ns.domain)
    node = rclpy.create_node("size_pub", context=ctx)
    pub = node.create_publisher(Image, "/size_probe", QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE))
    try:
        for reliability in ("reliable", "best_effort"):
            run_s = 10 + len(ns.sizes_mb) * ns.sends * (ns.gap + 0.5) + 10
            sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, str(ns.domain), reliability, str(run_s)],
                                   env=child_env(), stdout=subprocess.PIPE, text=True)
            t_end = time.monotonic() + 30
            while pub.get_subscription_count() < 1 and time.monotonic() < t_end:
                time.sleep(0.05)
            time.sleep(1.0)
            sent = []
            for mb in ns.sizes_mb:
                m = Image()
                m.height, m.width, m.encoding = 1, int(mb * (1 << 20)), "mono8"
                m.step, m.data = m.width, bytes(m.width)
                for k in range(ns.sends):
                    m.header.frame_id = f"{mb:g}:{k}"
                    pub.publish(m)
                    sent.append(m.header.frame_id)
                    time.sleep(ns.gap)
            time.sleep(3.0)
            sub.terminate()
            out = sub.communicate(timeout=30)[0]
            got = {line.split()[1] for line in out.splitlines() if line.startswith("got ")}
            for mb in ns.sizes_mb:
                ok = sum(f"{mb:g}:{k}" in got for k in range(ns.sends))
                results["runs"].append({"subscriber": reliability, "size_mib": mb, "sent": ns.sends, "received": ok})
                print(json.dumps(results["runs"][-1]), flush=True)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    results["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    write_json(results, ns.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
