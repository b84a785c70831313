"""``cmfiou-gen-scenes --out DIR --num N --seed S [--profile v1|kitti_v2] [--split training|testing] [--val-fraction F]
[--workers W]``

Writes deterministic synthetic frames in the KITTI object layout (see :mod:`cmfiou_core.data.synthetic`).
``--profile``: ``v1`` (default; the generator the shipped demo checkpoint was trained with, same bytes per seed) or
``kitti_v2`` (parametric vehicles, articulated people, Van/Truck/Tram/Misc/Person_sitting labels (bicycle racks and
people beside their bikes among them), clutter, HDL-64E
and camera models with domain randomisation; :mod:`cmfiou_core.data.synth.frame_v2`).
"""
from __future__ import annotations

import argparse
import sys
import time

from ..data.synth.scene import PROFILES, profile_config
from ..data.synthetic import generate_dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cmfiou-gen-scenes", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--out", required=True, help="dataset root to write (created)")
    ap.add_argument("--num", type=int, required=True, help="number of frames")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", choices=PROFILES, default="v1",
                    help="generator profile: v1 (default, unchanged bytes per seed) or kitti_v2 (realistic)")
    ap.add_argument("--split", choices=("training", "testing"), default="training",
                    help="folder to write; 'testing' writes no labels and ImageSets/test.txt")
    ap.add_argument("--val-fraction", type=float, default=0.5, help="share of frames listed in ImageSets/val.txt")
    ap.add_argument("--start", type=int, default=0, help="first frame id")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPU cores, at most 8)")
    a = ap.parse_args(argv)
    if a.num < 0:
        ap.error("--num must be >= 0")
    if not 0.0 <= a.val_fraction <= 1.0:
        ap.error("--val-fraction must be in [0, 1]")
    t = time.perf_counter()
    generate_dataset(a.out, a.num, seed=a.seed, split=a.split, val_fraction=a.val_fraction, workers=a.workers,
                     start=a.start, cfg=profile_config(a.profile))
    dt = time.perf_counter() - t
    print(f"wrote {a.num} frames ({a.profile}) to {a.out} in {dt:.1f} s ({a.num / max(dt, 1e-9):.2f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
