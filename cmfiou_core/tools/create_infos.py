"""``python -m cmfiou_core.tools.create_infos --root DIR [--splits train val] [--no-db] [--no-pseudo]``

Creates ``kitti_infos_<split>.json`` for each split, and (from the train split) the GT database
``gt_database_mm/*.npy`` + ``kitti_dbinfos_train_mm.json``. Pseudo points are read from ``velodyne_depth`` or
generated (ipbasic) and cached there, unless ``--no-pseudo`` (DB then holds raw points only).
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    from ..data.gt_database import create_gt_database
    from ..data.kitti import create_infos, raw_rows_from_bin

    ap = argparse.ArgumentParser(prog="python -m cmfiou_core.tools.create_infos", description=__doc__.strip().splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--splits", nargs="+", default=["train", "val"])
    ap.add_argument("--no-db", action="store_true", help="skip the GT database")
    ap.add_argument("--no-pseudo", action="store_true", help="GT database from raw LiDAR only (flag 2 rows)")
    ap.add_argument("--raw-from-bin", action="store_true",
                    help="GT database raw rows from the float32 .bin instead of the float16 velodyne_depth file "
                         "(pair with data.raw_points_from_bin: true)")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    infos = {}
    for s in a.splits:
        infos[s] = create_infos(a.root, s, out="default")
        print(f"{s}: {len(infos[s])} frames")
    if not a.no_db and "train" in infos:
        from pathlib import Path

        def raw_only(info):
            return raw_rows_from_bin(Path(a.root) / "training" / "velodyne" / f"{info['point_cloud']['lidar_idx']}.bin")
        idx = create_gt_database(a.root, infos["train"], points_fn=raw_only if a.no_pseudo else None,
                                 raw_from_bin=a.raw_from_bin or a.no_pseudo)
        print(f"GT database index: {idx}")
    print(f"done in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
