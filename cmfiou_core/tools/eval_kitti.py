"""``cmfiou-eval-kitti --gt DIR --pred DIR [--ids FILE] [--json OUT]``: KITTI object evaluation (R11 + R40).

Prints the usual per-class table (both overlap sets) and optionally writes
``{"R40": {"Car": {"3d": [e, m, h], "bev": [...], "bbox": [...], "aos": [...]}, ...}, "R11": {...}}`` (percent,
first overlap set: Car 0.7 / Pedestrian 0.5 / Cyclist 0.5), plus ``ap_ceiling`` (perfect predictions on the same
ground truth), ``warnings``, ``skipped`` and ``provenance``. A malformed label or result file is named and its frame
skipped and counted (``--strict``: exit 2). Exit code 2 on invalid input: missing or empty ground truth, missing
predictions without ``--allow-missing`` (messages name the file and line).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cmfiou-eval-kitti", description=__doc__.split("\n")[0])
    ap.add_argument("--gt", required=True, help="ground-truth label folder (label_2 layout: <id>.txt)")
    ap.add_argument("--pred", required=True, help="result folder (<id>.txt, 16 fields per line)")
    ap.add_argument("--ids", help="id list (ImageSets/val.txt style); default: every *.txt in --gt")
    ap.add_argument("--json", help="write the AP JSON here")
    ap.add_argument("--classes", default="Car,Pedestrian,Cyclist")
    ap.add_argument("--allow-missing", action="store_true",
                    help="a missing prediction file counts as a frame with no detections (default: error); missing "
                         "ground truth is always an error")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first malformed file (default: name it, skip its frame, count it)")
    args = ap.parse_args(argv)

    from cmfiou_core.eval.kitti_eval import evaluate
    from cmfiou_core.eval.kitti_io import KittiFormatError, empty_annotations, read_ids, read_kitti_file

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    skipped = {}
    try:
        ids = read_ids(args.ids) if args.ids else None
        if ids is None:
            gt_dir = Path(args.gt)
            if not gt_dir.is_dir():
                raise KittiFormatError(f"folder not found: {gt_dir}")
            ids = sorted(p.stem for p in gt_dir.glob("*.txt"))
            if not ids:
                raise KittiFormatError(f"{gt_dir}: no ground truth (no *.txt label files)")
        t0 = time.perf_counter()
        # missing files first, all at once (load_folder's messages: ground truth never optional)
        missing_gt = [i for i in ids if not (Path(args.gt) / f"{i}.txt").is_file()]
        missing_dt = [i for i in ids if not (Path(args.pred) / f"{i}.txt").is_file()]
        for folder in (args.gt, args.pred):
            if not Path(folder).is_dir():
                raise KittiFormatError(f"folder not found: {folder}")
        if missing_gt:
            raise KittiFormatError(f"{args.gt}: ground truth missing for {len(missing_gt)} of {len(ids)} frames "
                                   f"(first: {missing_gt[0]}.txt): every evaluated frame needs its label file")
        if missing_dt and not args.allow_missing:
            raise KittiFormatError(f"{args.pred}: {len(missing_dt)} of {len(ids)} prediction files missing (first: "
                                   f"{missing_dt[0]}.txt); pass --allow-missing to count them as frames without "
                                   "detections")
        gt, dt = [], []
        empty = empty_annotations()
        for i in ids:  # one frame at a time: a malformed file is named and its frame skipped (--strict: stops)
            try:
                g = read_kitti_file(Path(args.gt) / f"{i}.txt")
                d = empty if i in missing_dt else read_kitti_file(Path(args.pred) / f"{i}.txt", is_result=True)
            except KittiFormatError as e:
                if args.strict:
                    raise
                print(f"cmfiou-eval-kitti: frame {i} skipped (not evaluated): {e}", file=sys.stderr)
                skipped[i] = str(e)
                continue
            gt.append(g)
            dt.append(d)
        if not gt:
            raise KittiFormatError(f"every frame was skipped ({len(skipped)} bad files): nothing to evaluate")
        if not any(np.isin(a["name"], classes).any() for a in gt):
            raise KittiFormatError(f"{args.gt}: the ground truth ({len(gt)} frames) has no object of "
                                   f"{', '.join(classes)}: AP is undefined")
        t1 = time.perf_counter()
        res = evaluate(gt, dt, classes=classes)
        t2 = time.perf_counter()
    except (KittiFormatError, ValueError) as e:
        print(f"cmfiou-eval-kitti: error: {e}", file=sys.stderr)
        return 2
    print(res.table(), end="")
    if skipped:
        print(f"skipped {len(skipped)} of {len(ids)} frames for bad files (not evaluated): {', '.join(skipped)}")
    print(f"[{len(gt)} frames evaluated: read {t1 - t0:.2f} s, evaluate {t2 - t1:.2f} s]")
    if args.json:
        from cmfiou_core.provenance import provenance

        js = res.to_json()
        js["ap_ceiling"] = res.ceiling_json()
        js["warnings"] = res.small_set_warnings()
        js["frames"] = len(gt)
        js["skipped"] = skipped
        js["provenance"] = provenance(resolve_default_checkpoint=False)
        Path(args.json).write_text(json.dumps(js, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
