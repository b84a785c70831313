#!/usr/bin/env python3
"""3D backbone (S2D + ResVC) latency: eager spconv vs the static-shape engine, with and without a CUDA graph.

Times ``model.backbone_3d`` alone (VFE outputs in, the per-view spconv tensors out, as the rest of the model reads
them) on KITTI-size frames (generated scenes and/or real KITTI frames with pseudo points from the pipeline's own depth
completion), checks the engine against the eager backbone on every frame (index sets equal, features within 1e-3
relative), records site counts per conv (for capacity calibration), kernel launches per frame (profiler) and peak
memory. Writes JSON (with provenance) and prints a table.

    python bench/bench_engine.py --device cuda --frames 50 --generated 8 --json out/bench_engine.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _percentiles(v):
    a = np.asarray(v, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "n": int(a.size)}


def _batches(pipe, frames):
    """Frame -> the model's batch dict before VFE, through the pipeline's own preprocessing (depth, voxelization),
    recorded by a pipeline stage hook after ``voxelize``."""
    got = []

    def grab(stage, batch):
        if stage == "voxelize":
            got.append(dict(batch))

    pipe.stage_hooks.append(grab)
    try:
        for _, fr in frames:
            pipe(fr)
    finally:
        pipe.stage_hooks.remove(grab)
    return [(n, b) for (n, _), b in zip(frames, got)]


def _kernel_launches(fn, steps=3):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    n, t = 0, 0.0
    for e in prof.key_averages():
        if e.device_type is not None and str(e.device_type).endswith("CUDA"):
            n += e.count
            t += getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
    return n / steps, t / steps / 1000.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "config" / "cmfiou_kitti.yaml"))
    ap.add_argument("--checkpoint", default="", help="'' = bundled demo checkpoint, 'none' = random weights")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--generated", type=int, default=8)
    ap.add_argument("--gen-dir", default="/tmp/bench_engine_gen")
    ap.add_argument("--kitti", action="append", default=[])
    ap.add_argument("--views", choices=("1", "3"), default="1")
    ap.add_argument("--dilate-ratio", type=float, default=6.0)
    ap.add_argument("--down-ratio", type=float, default=1.0)
    ap.add_argument("--dtypes", default="fp32", help="comma list of engine dtypes to time: fp32,tf32,bf16,fp16")
    ap.add_argument("--margin", type=float, default=1.3)
    ap.add_argument("--profile-top", type=int, default=0, help="print the N heaviest CUDA kernels of the graph engine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_pipeline import load_frames  # noqa: E402

    from cmfiou_core.engine.backbone import Capacities
    from cmfiou_core.engine.runtime import EngineBackbone
    from cmfiou_core.pipeline import Pipeline

    frames = load_frames(args.kitti, args.generated, Path(args.gen_dir), max(args.frames, 1))
    pipe = Pipeline.from_config(args.config, args.checkpoint or None, args.device, engine="eager")
    if args.views == "3":
        from cmfiou_core.model.model_config import OFFICIAL_X_TRANS
        pipe.views = OFFICIAL_X_TRANS.params()
    model = pipe.model
    dev = torch.device(args.device)
    batches = _batches(pipe, frames)
    eager = model.backbone_3d
    caps = Capacities(dilate_ratio=args.dilate_ratio, down_ratio=args.down_ratio)
    cap_in = model.cfg.max_voxels(False)
    engine_nog = EngineBackbone(eager, None, cap_in, use_graph=False, margin=args.margin).to(dev).eval()
    engine_g = EngineBackbone(eager, None, cap_in, use_graph=dev.type == "cuda", margin=args.margin).to(dev).eval()
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    variants = [("eager", eager), ("engine", engine_nog), ("engine_graph", engine_g)]
    for name in [d for d in args.dtypes.split(",") if d and d != "fp32"]:
        e = EngineBackbone(eager, None, cap_in, use_graph=dev.type == "cuda", margin=args.margin,
                           dtype=dtypes[name]).to(dev).eval()
        variants.append((f"engine_graph_{name}", e))

    def run(mod, b):
        bb = model.vfe(dict(b))
        return mod(bb)

    # correctness + counts
    worst = 0.0
    from cmfiou_core.engine.sparse import linear_keys
    for name, b in batches:
        with torch.no_grad():
            ref = run(eager, b)
            got = run(engine_g, b)
        assert engine_g.last_overflow == 0, f"{name}: capacity overflow {engine_g.last_overflow}"
        for key in [k for k in ref if k.startswith("multi_scale_3d_features")]:
            for lvl, a in ref[key].items():
                g = got[key][lvl]
                if a is None:
                    continue
                oa = torch.argsort(linear_keys(a.indices, a.spatial_shape))
                og = torch.argsort(linear_keys(g.indices, g.spatial_shape))
                if not torch.equal(a.indices[oa], g.indices[og]):
                    raise SystemExit(f"{name} {key} {lvl}: index sets differ ({len(oa)} vs {len(og)})")
                fa, fg = a.features[oa].float(), g.features[og].float()
                worst = max(worst, float((fa - fg).abs().max() / max(1.0, float(fa.abs().max()))))
    print(f"engine == eager on {len(batches)} frames: index sets identical, max rel feature diff {worst:.2e}")

    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    results = {}
    for label, mod in variants:
        torch.backends.cuda.matmul.allow_tf32 = label.endswith("tf32")
        times = []
        for i in range(args.warmup + args.frames):
            b = batches[i % len(batches)][1]
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                run(mod, b)
            sync()
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1000)
        b0 = batches[0][1]
        launches, kernel_ms = _kernel_launches(lambda: run(mod, b0)) if cuda else (float("nan"), float("nan"))
        results[label] = {"latency_ms": _percentiles(times), "kernel_launches_per_frame": launches,
                          "cuda_kernel_ms_per_frame": kernel_ms}
        if hasattr(mod, "engine"):
            results[label]["capacities"] = dict(sorted(mod.engine.caps.fixed.items()))
            results[label]["site_counts_last_frame"] = getattr(mod, "last_counts", None)
            if mod is not eager:
                with torch.no_grad():
                    ref = run(eager, batches[0][1])
                    got = run(mod, batches[0][1])
                a = ref["multi_scale_3d_features_mm"]["x_conv4"] if "multi_scale_3d_features_mm" in ref else \
                    ref["multi_scale_3d_features"]["x_conv4"]
                g = got["multi_scale_3d_features_mm"]["x_conv4"] if "multi_scale_3d_features_mm" in got else \
                    got["multi_scale_3d_features"]["x_conv4"]
                oa = torch.argsort(linear_keys(a.indices, a.spatial_shape))
                og = torch.argsort(linear_keys(g.indices, g.spatial_shape))
                results[label]["x_conv4_max_rel_diff_vs_eager"] = float(
                    (a.features[oa] - g.features[og]).abs().max() / a.features.abs().max())
        if args.profile_top and label == "engine" and cuda:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                with torch.no_grad():
                    run(mod, b0)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_top))
        print(f"{label:13s} p50 {results[label]['latency_ms']['p50']:7.2f} ms  p99 "
              f"{results[label]['latency_ms']['p99']:7.2f} ms  launches/frame {launches:7.0f}  "
              f"kernel {kernel_ms:6.2f} ms")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            run(engine_g, batches[0][1])
    report = {"what": "3D backbone alone (VFE out -> per-view spconv tensors), eager vs engine",
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "views": args.views,
              "frames": [n for n, _ in frames], "capacities": {"dilate_ratio": caps.dilate_ratio,
                                                                "down_ratio": caps.down_ratio},
              "captures": engine_g.captures, "max_rel_feature_diff": worst, "results": results,
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
    from cmfiou_core.provenance import write_report

    write_report(args.json, report, config=args.config, checkpoint=args.checkpoint or None, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
