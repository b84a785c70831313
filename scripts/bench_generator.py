"""Scene generator throughput: frames/s of ``generate_dataset`` (frames rendered and written) per profile and number
of worker processes.

    python scripts/bench_generator.py --frames 8 --workers 1 2 --profiles v1 kitti_v2 \
        --json docs/results/generator_speed_cpu.json

Wall time of the whole call (process start-up of the pool included) and the CPU seconds per frame (this process and
its pool workers); the host's load average is recorded beside them, since other processes on a shared host slow the
wall time down (the CPU time much less).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--profiles", nargs="+", default=["v1", "kitti_v2"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    from cmfiou_core.data.synth.scene import profile_config
    from cmfiou_core.data.synthetic import generate_dataset
    from cmfiou_core.provenance import provenance

    rows = []
    for prof in a.profiles:
        cfg = profile_config(prof)
        for w in a.workers:
            with tempfile.TemporaryDirectory() as d:
                load0 = os.getloadavg()[0]
                t = time.perf_counter()
                c = time.process_time()
                ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                generate_dataset(Path(d) / "g", a.frames, seed=a.seed, workers=w, cfg=cfg)
                dt = time.perf_counter() - t
                ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = time.process_time() - c + (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
                rows.append({"profile": prof, "workers": w, "frames": a.frames, "wall_s": round(dt, 3),
                             "frames_per_s": round(a.frames / dt, 3),
                             "cpu_s_per_frame": round(cpu / a.frames, 3),
                             "loadavg_1min_before": round(load0, 2),
                             "loadavg_1min_after": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]))
    rep = {"what": "cmfiou_core.data.synthetic.generate_dataset throughput (render + write, KITTI layout)",
           "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "results": rows,
           "provenance": provenance(argv=None, resolve_default_checkpoint=False)}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rep, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
