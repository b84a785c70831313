#!/usr/bin/env python3
"""KITTI evaluation speed: ``cmfiou_core.eval.kitti_eval.evaluate`` on a val-split-size synthetic set (3769 frames,
~9 objects and ~26 detections per frame; ``cmfiou_core.eval.synthetic.make_dataset``). The goal: well under a minute
on one CPU core (it was a timed test before; speed lives here).

    python bench/bench_kitti_eval.py [--frames 3769] [--repeat 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchutil import p50_p95_mean, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=3769)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results as JSON to this path ('-' = stdout)")
    a = ap.parse_args(argv)
    from cmfiou_core.eval import kitti_eval as ke
    from cmfiou_core.eval.synthetic import make_dataset
    from cmfiou_core.provenance import provenance

    gts, dts = make_dataset(n_frames=a.frames, seed=a.seed)
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        ke.evaluate(gts, dts)
        times.append(time.perf_counter() - t)
    out = {"frames": a.frames, "seed": a.seed, "repeat": a.repeat, "evaluate_s": p50_p95_mean(times)}
    print(f"kitti_eval.evaluate on {a.frames} frames: p50 {out['evaluate_s']['p50']:.2f} s ({a.repeat} run(s))")
    write_json(out, a.json, provenance(None, None, "cpu", resolve_default_checkpoint=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
