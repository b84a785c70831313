#!/usr/bin/env python3
"""Training-step benchmark and a short overfit check of the full CMF-IOU model (GPU; CPU works for a smoke run).

``--mode step``: forward + backward + optimizer step at KITTI scale (generated or real frames, batch size B, the
official 2 per GPU by default) in fp32 and with AMP; reports step time p50/p95 and peak GPU memory.

``--mode overfit``: trains on a handful of fixed frames (no augmentation) for N iterations and reports the loss curve
and, before/after, the mean rectified score (and predicted IoU) of the detections matched to each ground-truth box
(3D IoU >= 0.5 for cars, 0.25 otherwise; unmatched GT counts 0) through the deployed inference path (Pipeline).

    python bench/bench_train.py --mode step --data data/generated/g400 --device cuda --json out/step.json
    python bench/bench_train.py --mode overfit --data data/generated/g400 --frames 4 --iters 300 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(args):
    import torch

    from cmfiou_core.data.collate import collate_batch
    from cmfiou_core.data.kitti import DatasetConfig, KittiDataset
    from cmfiou_core.model.detector import build_model
    from cmfiou_core.model.model_config import load_config
    from cmfiou_core.tools.train import _data_section, _make_prepare_fn

    cfg = load_config(args.config)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
        from cmfiou_core.model.spconv_compat import enable_cpu_backward

        enable_cpu_backward()
    model = build_model(cfg).to(dev)
    dcfg = DatasetConfig.from_dict(_data_section(cfg))
    ds = KittiDataset(args.data, "train", training=True, cfg=dcfg, seed=0, augment=args.mode == "step")
    prepare = _make_prepare_fn(cfg, no_pseudo=False)
    return cfg, model, ds, collate_batch, prepare, dev


def matched_scores(cfg, model, root, ids, device):
    """Mean rectified score / predicted IoU of the best detection per GT box (0 when no detection matches)."""
    import torch
    from PIL import Image

    from cmfiou_core.calib import Calibration
    from cmfiou_core.data.kitti import load_points_mm  # noqa: F401  (same data path as training)
    from cmfiou_core.eval.kitti_io import read_kitti_file
    from cmfiou_core.geometry.boxes import boxes3d_kitti_camera_to_lidar
    from cmfiou_core.geometry.iou import boxes_iou3d
    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.types import Frame

    pipe = Pipeline(cfg, model, device, timing=False)
    scores, ious, hits = [], [], []
    data = Path(root) / "training"
    names = ("Car", "Pedestrian", "Cyclist")
    for fid in ids:
        img = np.array(Image.open(data / "image_2" / f"{fid}.png").convert("RGB"))
        cal = Calibration.from_kitti_object_file(data / "calib" / f"{fid}.txt", img.shape[1], img.shape[0])
        pts = np.fromfile(data / "velodyne" / f"{fid}.bin", np.float32).reshape(-1, 4)
        det = pipe(Frame(pts, img, cal))
        gt = read_kitti_file(data / "label_2" / f"{fid}.txt")
        keep = np.isin(gt["name"], names)
        if not keep.any():
            continue
        cam = np.concatenate([gt["location"][keep], gt["dimensions"][keep],
                              gt["rotation_y"][keep][:, None]], 1).astype(np.float32)
        gt_lidar = boxes3d_kitti_camera_to_lidar(cam, cal)
        thr = np.where(gt["name"][keep] == "Car", 0.5, 0.25)
        if len(det):
            iou = boxes_iou3d(torch.as_tensor(np.asarray(gt_lidar), dtype=torch.float32),
                              torch.as_tensor(det.boxes)).numpy()
            best = iou.argmax(1)
            ok = iou.max(1) >= thr
            scores += list(np.where(ok, det.scores[best], 0.0))
            ious += list(np.where(ok, det.iou_scores[best], 0.0))
            hits += list(ok)
        else:
            scores += [0.0] * int(keep.sum())
            ious += [0.0] * int(keep.sum())
            hits += [False] * int(keep.sum())
    model.train()
    return {"mean_rectified_score": float(np.mean(scores)) if scores else 0.0,
            "mean_pred_iou": float(np.mean(ious)) if ious else 0.0,
            "recall": float(np.mean(hits)) if hits else 0.0, "num_gt": len(hits)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("step", "overfit"), required=True)
    ap.add_argument("--config", default=str(ROOT / "config" / "cmfiou_kitti.yaml"))
    ap.add_argument("--data", required=True, help="KITTI-layout root with infos (cmfiou-gen-scenes + create_infos)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="step mode: measured steps per precision")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--amp", default="fp32,fp16", help="step mode: comma list of fp32, fp16, bf16")
    ap.add_argument("--frames", type=int, default=4, help="overfit: number of fixed frames")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    cfg, model, ds, collate, prepare, dev = build(args)
    cuda = dev.type == "cuda"
    out = {"mode": args.mode, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size}
    if args.mode == "step":
        out["results"] = {}
        for prec in [p for p in args.amp.split(",") if p]:
            dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[prec]
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
            scaler = torch.amp.GradScaler("cuda", enabled=prec == "fp16" and cuda)
            model.train()
            times = []
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            n_pts = []
            for it in range(args.warmup + args.steps):
                items = [ds[(it * args.batch_size + b) % len(ds)] for b in range(args.batch_size)]
                batch = collate(items)
                n_pts.append(sum(len(p) for p in batch["points"]) + sum(len(p) for p in batch["points_mm"]))
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                b = prepare(batch, dev)
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                    loss, tb = model(b)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                scaler.step(opt)
                scaler.update()
                if cuda:
                    torch.cuda.synchronize()
                if it >= args.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
                if not np.isfinite(float(loss)):
                    print(f"[{prec}] non-finite loss at step {it}: {tb}")
            a = np.asarray(times)
            out["results"][prec] = {"step_ms_p50": float(np.percentile(a, 50)),
                                    "step_ms_p95": float(np.percentile(a, 95)),
                                    "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None,
                                    "points_per_batch_mean": float(np.mean(n_pts)), "last_loss": float(loss)}
            print(prec, out["results"][prec], flush=True)
    else:
        ids = [ds.infos[i]["frame_id"] if "frame_id" in ds.infos[i] else ds.infos[i]["point_cloud"]["lidar_idx"]
               for i in range(args.frames)]
        before = matched_scores(cfg, model, args.data, ids, dev)
        print("before", before, flush=True)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iters, pct_start=0.2)
        model.train()
        losses = []
        for it in range(args.iters):
            items = [ds[(it * args.batch_size + b) % args.frames] for b in range(args.batch_size)]
            b = prepare(collate(items), dev)
            loss, tb = model(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
            if it % 20 == 0:
                print(f"it {it} loss {float(loss):.4f}", flush=True)
        after = matched_scores(cfg, model, args.data, ids, dev)
        print("after", after, flush=True)
        k = max(1, len(losses) // 10)
        out.update(before=before, after=after, loss_first=float(np.mean(losses[:k])),
                   loss_last=float(np.mean(losses[-k:])), losses=losses[::max(1, len(losses) // 50)])
    print(json.dumps({k: v for k, v in out.items() if k != "losses"}, indent=1))
    if args.json:
        from cmfiou_core.provenance import provenance

        out["provenance"] = provenance(args.config, None, args.device, resolve_default_checkpoint=False)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
