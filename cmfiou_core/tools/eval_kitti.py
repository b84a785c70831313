"""``cmfiou-eval-kitti --gt DIR --pred DIR [--ids FILE] [--json OUT]``: KITTI object evaluation (R11 + R40).

Prints the usual per-class table (both overlap sets) and optionally writes
``{"R40": {"Car": {"3d": [e, m, h], "bev": [...], "bbox": [...], "aos": [...]}, ...}, "R11": {...}}`` (percent,
first overlap set: Car 0.7 / Pedestrian 0.5 / Cyclist 0.5). Exit code 2 on invalid input (message names file+line).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cmfiou-eval-kitti", description=__doc__.split("\n")[0])
    ap.add_argument("--gt", required=True, help="ground-truth label folder (label_2 layout: <id>.txt)")
    ap.add_argument("--pred", required=True, help="result folder (<id>.txt, 16 fields per line)")
    ap.add_argument("--ids", help="id list (ImageSets/val.txt style); default: every *.txt in --gt")
    ap.add_argument("--json", help="write the AP JSON here")
    ap.add_argument("--classes", default="Car,Pedestrian,Cyclist")
    ap.add_argument("--allow-missing", action="store_true",
                    help="a missing prediction file counts as a frame with no detections (default: error)")
    args = ap.parse_args(argv)

    from cmfiou_core.eval.kitti_eval import evaluate
    from cmfiou_core.eval.kitti_io import KittiFormatError, load_folder, read_ids

    try:
        ids = read_ids(args.ids) if args.ids else None
        if ids is None:
            gt_dir = Path(args.gt)
            if not gt_dir.is_dir():
                raise KittiFormatError(f"folder not found: {gt_dir}")
            ids = sorted(p.stem for p in gt_dir.glob("*.txt"))
        t0 = time.perf_counter()
        gt = load_folder(args.gt, ids, is_result=False)
        dt = load_folder(args.pred, ids, is_result=True, allow_missing=args.allow_missing)
        t1 = time.perf_counter()
        res = evaluate(gt, dt, classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()))
        t2 = time.perf_counter()
    except (KittiFormatError, ValueError) as e:
        print(f"cmfiou-eval-kitti: error: {e}", file=sys.stderr)
        return 2
    print(res.table(), end="")
    print(f"[{len(ids)} frames: read {t1 - t0:.2f} s, evaluate {t2 - t1:.2f} s]")
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_json(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
