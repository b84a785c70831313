#!/usr/bin/env python3
"""Where a rounding-level change grows inside the RoI head: the eager pipeline on one frame, once as is and once with
every sparse backbone output feature x (1 + NOISE N(0, 1)) (``engine_agreement``'s ``eager_backbone_noise`` draw
SEED), recording the RoI head's per-stage tensors (``RoIHead.record``: input RoIs, pooled grids per modality, heads,
decoded boxes); prints and writes the largest absolute / relative difference of each.

    python bench/roi_stage_sensitivity.py --kitti KITTI/training --frame 0 --seed 3 --json J
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    from bench_pipeline import load_frames
    from engine_agreement import _BackboneNoise

    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.provenance import write_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--checkpoint", default="", help="'' = the bundled demo checkpoint")
    ap.add_argument("--kitti", required=True, help="KITTI object 'training' folder")
    ap.add_argument("--frame", type=int, default=0, help="index of the frame among the folder's frames")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--noise", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    frames = load_frames([args.kitti], 0, ROOT / "data", args.frame + 1)
    if len(frames) <= args.frame:
        raise SystemExit(f"--frame {args.frame}: {args.kitti} has {len(frames)} frames")
    name, frame = frames[args.frame]
    p = Pipeline.from_config(args.config, args.checkpoint or None, args.device, engine="eager")
    if p.model.roi_head is None:
        raise SystemExit("the model has no RoI head")
    recs = {}
    for tag, hooks in (("base", []), ("noise", [_BackboneNoise(args.noise, args.seed)])):
        p.stage_hooks[:] = hooks
        p.model.roi_head.record = {}
        with torch.no_grad():
            p(frame)
        recs[tag] = {k: v for k, v in p.model.roi_head.record.items() if torch.is_tensor(v)}
    p.model.roi_head.record = None
    rows = {}
    for k, a in recs["base"].items():
        b = recs["noise"].get(k)
        if b is None or b.shape != a.shape or not a.is_floating_point():
            continue
        d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        rel = d / max(1e-12, float(a.abs().max())) if a.numel() else 0.0
        rows[k] = {"max_abs": d, "max_rel": rel, "shape": list(a.shape)}
        print(f"{k:28s} max |d| {d:.3e}  rel {rel:.2e}  {tuple(a.shape)}")
    report = {"what": "RoI head per-stage tensors, eager vs eager with backbone output noise", "frame": name,
              "noise": args.noise, "seed": args.seed, "tensors": rows}
    write_report(args.json, report, config=args.config, checkpoint=args.checkpoint or None, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
