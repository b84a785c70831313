"""``python -m cmfiou_core.tools.evaluate --data ROOT [--split val] --checkpoint CKPT``: run the inference pipeline
over a KITTI-layout split (real KITTI or generated scenes) and report KITTI AP (R40 and R11) with the project's
evaluator. Writes the per-frame result files (``--out``) and a JSON summary (``--json``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="folder holding training/ and ImageSets/")
    ap.add_argument("--split", default="val")
    ap.add_argument("--config", default=None, help="model YAML (default: config/cmfiou_kitti.yaml)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off")
    ap.add_argument("--lidar-only", action="store_true", help="give the pipeline no camera image (pseudo branch empty)")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--out", default=None, help="write results/<id>.txt here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from cmfiou_core.eval.dataset_eval import evaluate_split
    from cmfiou_core.pipeline import Pipeline

    pipe = Pipeline.from_config(args.config, args.checkpoint, args.device, amp=args.amp)
    r = evaluate_split(pipe, args.data, args.split, args.out, lidar_only=args.lidar_only, max_frames=args.max_frames)
    print(r.result.table())
    for c, q in r.localization.items():
        if q["num_gt"]:
            print(f"{c} localization: {q['num_gt']} objects, best 3D IoU mean {q['mean_best_iou']:.3f} median "
                  f"{q['median_best_iou']:.3f}, recall@{q['threshold']:.2f} {q['recall']:.3f}, within "
                  f"+-{q['band']:.2f} of the threshold {q['near_threshold']:.3f}")
    print(f"frames {r.frames}, failed {len(r.failed)}, latency ms {r.latency_ms}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        s = r.summary()
        s.update(checkpoint=args.checkpoint, split=args.split, lidar_only=args.lidar_only, amp=args.amp)
        Path(args.json).write_text(json.dumps(s, indent=1))
    return 1 if r.failed and len(r.failed) == r.frames else 0


if __name__ == "__main__":
    sys.exit(main())
