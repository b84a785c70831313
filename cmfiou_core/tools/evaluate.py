"""``python -m cmfiou_core.tools.evaluate --data ROOT [--split val] [--checkpoint CKPT]``: run the inference pipeline
over a KITTI-layout split (real KITTI or generated scenes) and report KITTI AP (R40 and R11, each beside the ceiling
that perfect predictions reach on the same ground truth) with the project's evaluator. Writes the per-frame result
files (``--out``) and a JSON summary with provenance (``--json``).

Without ``--checkpoint`` (or with ``--checkpoint ''``) the bundled demo checkpoint
``models/cmfiou_synthetic_demo_fp16.pt`` runs with its config ``config/cmfiou_kitti.yaml``: a camera+LiDAR model
trained on generated scenes only, not on KITTI. ``--checkpoint none`` runs random weights (meaningless detections).
``--predictions DIR`` scores existing result files instead of running a model, ``--predictions-from-gt`` feeds
label_2 back (the reference: AP = the ceiling, nothing unmatched, no size error).

The JSON's ``headline`` holds the numbers a sim-to-real comparison quotes: per class the R40 AP (easy / moderate /
hard; 3D, and BEV for Car) beside its ceiling and the object counts, best 3D IoU mean and recall at the AP threshold;
the centre match at score >= 0.5 (``cmfiou_core.eval.centre_match``: objects found within 2 m (vehicles) / 1 m
(others), unmatched detections per frame, median absolute l / w / h error of matched cars).

Exit codes: 0 done; 1 inference failed on every frame; 2 bad arguments or data (unknown split, missing or empty
ground truth, with ``--strict`` the first bad input file).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder holding training/ and ImageSets/")
    ap.add_argument("--split", default="val", help="ImageSets/<split>.txt; 'all' = every label_2 file when there is "
                                                   "no all.txt (default: val)")
    ap.add_argument("--config", default=None, help="model YAML (default: config/cmfiou_kitti.yaml)")
    ap.add_argument("--checkpoint", default="",
                    help="weights file (default '': the bundled demo checkpoint models/cmfiou_synthetic_demo_fp16.pt, "
                         "trained on generated scenes, not KITTI; 'none': random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off")
    ap.add_argument("--engine", choices=("eager", "graph", "auto"), default=None,
                    help="inference engine (default: the config's inference.engine)")
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default=None,
                    help="CUDA products (default: the config's inference.precision)")
    ap.add_argument("--lidar-only", action="store_true", help="give the pipeline no camera image (pseudo branch empty)")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first bad input file (default: name it, skip the frame, count it)")
    ap.add_argument("--out", default=None, help="write results/<id>.txt here")
    ap.add_argument("--json", default=None)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--predictions", default=None, help="score these result files (<id>.txt) instead of running a "
                                                         "model")
    src.add_argument("--predictions-from-gt", action="store_true",
                     help="score label_2 itself (Car / Pedestrian / Cyclist, score 1): the reference")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from cmfiou_core.config import ConfigError
    from cmfiou_core.eval.dataset_eval import evaluate_predictions, evaluate_split, split_ids
    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.provenance import provenance

    try:
        split_ids(args.data, args.split)  # unknown split / missing or empty ground truth: before the model loads
        no_model = bool(args.predictions or args.predictions_from_gt)
        if no_model:
            r = evaluate_predictions(args.data, args.split, args.predictions, max_frames=args.max_frames)
        else:
            pipe = Pipeline.from_config(args.config, args.checkpoint, args.device, amp=args.amp, engine=args.engine,
                                        precision=args.precision)
            r = evaluate_split(pipe, args.data, args.split, args.out, lidar_only=args.lidar_only,
                               max_frames=args.max_frames, strict=args.strict)
    except (ValueError, FileNotFoundError, ConfigError) as e:  # BadInputError / KittiFormatError are ValueErrors
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(r.result.table())
    for c, q in r.localization.items():
        if q["num_gt"]:
            print(f"{c} localization: {q['num_gt']} objects, best 3D IoU mean {q['mean_best_iou']:.3f} median "
                  f"{q['median_best_iou']:.3f}, recall@{q['threshold']:.2f} {q['recall']:.3f}, within "
                  f"+-{q['band']:.2f} of the threshold {q['near_threshold']:.3f}")
    hl = r.headline()
    for c in ("Car", "Pedestrian", "Cyclist"):
        q = hl.get(c)
        if q:
            fmt = lambda v: " / ".join(f"{x:.1f}" for x in v) if v else "-"  # noqa: E731
            bev = f", BEV {fmt(q['ap_bev_r40'])} (ceiling {fmt(q['ceiling_bev_r40'])})" if "ap_bev_r40" in q else ""
            print(f"{c} R40 3D {fmt(q['ap_3d_r40'])} (ceiling {fmt(q['ceiling_3d_r40'])}){bev}; objects easy / "
                  f"moderate / hard {' / '.join(str(n) for n in q['objects_easy_mod_hard'])}")
    cm = r.centre
    for c, q in cm["classes"].items():
        if q["num_gt"]:
            err = q["median_centre_error_m"]
            print(f"{c} at score >= {cm['score_min']}: {q['found']} of {q['num_gt']} found within "
                  f"{cm['radius_m']['vehicles' if c == 'Car' else 'others']} m ({q['found_right_class']} with the right "
                  f"class), median centre error {'-' if err is None else f'{err:.2f} m'}")
    sz = cm["car_size"]
    if sz["matched"]:
        print("car size error (median abs l / w / h, m): " + " / ".join(f"{x:.2f}" for x in
              sz["median_abs_error_lwh_m"]) + f" over {sz['matched']} matched cars; length spread detected "
              f"{sz['detected_length_std_m']:.2f} m, labelled {sz['labelled_length_std_m']:.2f} m")
    print(f"unmatched detections at score >= {cm['score_min']}: {cm['unmatched']} ({cm['unmatched_per_frame']:.2f} "
          f"per frame; {cm['duplicates']} of them second detections of a found object)")
    for fid, why in r.lidar_only.items():
        print(f"frame {fid} ran LiDAR-only (without depth): {why}")
    for fid, why in r.skipped.items():
        print(f"frame {fid} skipped (not evaluated): {why}")
    print(f"frames {r.frames} evaluated, skipped {len(r.skipped)} (bad input files), failed {len(r.failed)} "
          f"(evaluated as empty), LiDAR-only {len(r.lidar_only)}, latency ms {r.latency_ms}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        s = r.summary()
        s.update(data=str(args.data), split=args.split, lidar_only=args.lidar_only, amp=args.amp,
                 engine=None if no_model else pipe.engine, precision=None if no_model else pipe.precision,
                 predictions=("label_2" if args.predictions_from_gt else args.predictions),
                 provenance=provenance(None if no_model else args.config, None if no_model else args.checkpoint,
                                       None if no_model else args.device, resolve_default_checkpoint=not no_model))
        Path(args.json).write_text(json.dumps(s, indent=1))
    return 1 if r.failed and len(r.failed) == r.frames else 0


if __name__ == "__main__":
    sys.exit(main())
