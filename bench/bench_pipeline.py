#!/usr/bin/env python3
"""End-to-end latency benchmark of the inference path the node runs (``cmfiou_core.pipeline.Pipeline``).

Per-stage timings come from the pipeline's own CUDA events (GPU) / perf_counter (CPU): message conversion (when rclpy
and the cmfiou_ros converters are importable), host->device, depth stages, preprocessing, voxelization, VFE, 3D
backbone, BEV, RPN, RoI head, post-processing, device->host, message building. Warm-up frames are excluded; p50/p95/p99
over the measured frames; peak GPU memory. Writes JSON and a Markdown table.

Examples::

    python bench/bench_pipeline.py --device cuda --frames 200 --kitti ../shared/kitti_samples/object/training \
        --generated 16 --checkpoint models/cmfiou_synthetic_demo_fp16.pt --json out/bench.json --md out/bench.md
    python bench/bench_pipeline.py --device cpu --frames 2 --warmup 1 --generated 1   # smoke run (CI)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _captures(pipe) -> Dict[str, int]:
    """CUDA graphs captured so far by the pipeline's engine parts (graph engine only)."""
    out = {}
    for name, obj in (("front", getattr(pipe, "_front", None)), ("frame_graph", getattr(pipe, "_frame_graph", None)),
                      ("backbone", getattr(getattr(pipe, "_frame_graph", None), "backbone", None))):
        if obj is not None and hasattr(obj, "captures"):
            out[name] = int(obj.captures)
    return out


def load_frames(kitti: List[str], generated: int, gen_dir: Path, max_frames: int):
    """Real KITTI object frames (every frame of each folder) and generated scenes -> list of (name, Frame)."""
    from PIL import Image

    from cmfiou_core.calib import Calibration
    from cmfiou_core.types import Frame

    frames = []

    def add_folder(root: Path, tag: str, limit: int):
        ids = sorted(p.stem for p in (root / "velodyne").glob("*.bin"))[:limit]
        for i in ids:
            img = np.array(Image.open(root / "image_2" / f"{i}.png").convert("RGB"))
            cal = Calibration.from_kitti_object_file(root / "calib" / f"{i}.txt", img.shape[1], img.shape[0])
            pts = np.fromfile(root / "velodyne" / f"{i}.bin", np.float32).reshape(-1, 4)
            frames.append((f"{tag}/{i}", Frame(pts, img, cal, index=i)))

    for k in kitti:   # frames named <folder above training>/<id>: kitti/000003, seed2027/000003
        add_folder(Path(k), Path(k).resolve().parent.name or "kitti", max_frames)
    if generated > 0:
        from cmfiou_core.data.synthetic import generate_dataset

        out = gen_dir / f"bench_{generated}"
        if not (out / "training" / "velodyne").is_dir() or \
                len(list((out / "training" / "velodyne").glob("*.bin"))) < generated:
            generate_dataset(out, num_frames=generated, seed=1234)
        add_folder(out / "training", "generated", generated)
    if not frames:
        raise SystemExit("no frames: give --kitti DIR and/or --generated N")
    return frames


def percentiles(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def profile_frames(step, frames: int, top: int = 0) -> Dict[str, float]:
    """Run ``step(i)`` for ``frames`` frames under torch.profiler: kernel launches and kernel time per frame, and the
    GPU-busy share = the union of the kernels' intervals over the wall time (a CUDA graph replay counts its kernels)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(frames):
            step(i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:             # union of the kernel intervals (us)
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    kernel_us = sum(e - s for s, e in spans)
    if top:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top))
    return {"frames": frames, "kernel_launches_per_frame": len(spans) / frames,
            "kernel_ms_per_frame": kernel_us / 1e3 / frames, "gpu_busy_ms_per_frame": busy / 1e3 / frames,
            "wall_ms_per_frame": wall * 1e3 / frames, "gpu_busy_share": busy / 1e6 / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "config" / "cmfiou_kitti.yaml"))
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=200, help="measured frames (frames are cycled)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--kitti", action="append", default=[], help="KITTI object 'training' folder (repeatable)")
    ap.add_argument("--generated", type=int, default=0, help="also use N generated scenes")
    ap.add_argument("--gen-dir", default=str(ROOT / "data" / "generated"))
    ap.add_argument("--engine", choices=("eager", "graph"), default="eager",
                    help="eager spconv modules, or the static-shape engine (engine.frame: one CUDA graph per frame)")
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default=None,
                    help="CUDA: IEEE fp32, TF32 products, or bf16 sparse backbone (default: the config's "
                         "inference.precision)")
    ap.add_argument("--views", choices=("config", "1", "3"), default="config",
                    help="override the config's test views: 1 = identity, 3 = the official X_TRANS views")
    ap.add_argument("--no-messages", action="store_true", help="skip ROS message conversion even if available")
    ap.add_argument("--profile", type=int, default=5, help="CUDA: frames under torch.profiler (kernel launches per "
                    "frame, kernel time, GPU-busy share); 0 = off")
    ap.add_argument("--profile-top", type=int, default=0, help="CUDA: print the N heaviest kernels")
    ap.add_argument("--verbose", action="store_true", help="print every frame's latency as it runs (stderr)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)

    import torch

    from cmfiou_core.model.model_config import OFFICIAL_X_TRANS, TestViewsConfig
    from cmfiou_core.pipeline import Pipeline

    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True   # TF32 switches: the pipeline's inference.precision (--precision)
    # frames first: generating scenes forks worker processes, which must happen before CUDA is initialised
    frames = load_frames(args.kitti, args.generated, Path(args.gen_dir), max(args.frames, 1))
    pipe = Pipeline.from_config(args.config, args.checkpoint, args.device, engine=args.engine,
                                precision=args.precision)
    if args.views != "config":
        pipe.views = (TestViewsConfig() if args.views == "1" else OFFICIAL_X_TRANS).params()

    conv = None
    if not args.no_messages:
        try:  # message conversion is part of what the node pays; measured when rclpy + our converters exist
            from cmfiou_ros import convert as conv  # noqa: F811
            conv.xyzi_to_pointcloud2(np.zeros((1, 4), np.float32))
        except Exception as e:  # noqa: BLE001
            print(f"[bench] ROS message conversion not measured ({type(e).__name__}: {e})", file=sys.stderr)
            conv = None
    msgs = {}
    if conv is not None:
        for name, fr in frames:
            msgs[name] = (conv.xyzi_to_pointcloud2(fr.points, 1, "velodyne"), conv.rgb_to_image(fr.image, 1))

    from cmfiou_core.types import Frame

    def run_one(name, fr):
        stages: Dict[str, float] = {}
        t0 = time.perf_counter()
        if conv is not None:
            pc, im = msgs[name]
            pts = conv.pointcloud2_to_xyzi(pc)
            rgb = conv.image_to_rgb(im)
            fr = Frame(pts[0] if isinstance(pts, tuple) else pts, rgb, fr.calib, stamp_ns=1)
            stages["msg_in"] = (time.perf_counter() - t0) * 1e3
        det = pipe(fr)
        stages.update({k: v for k, v in det.timings_ms.items() if k != "total"})
        if conv is not None:
            t1 = time.perf_counter()
            conv.detections_to_detection3d_array(det)
            conv.detections_to_scores_msg(det)
            stages["msg_out"] = (time.perf_counter() - t1) * 1e3
        stages["end_to_end"] = (time.perf_counter() - t0) * 1e3
        return stages, len(det)

    for i in range(args.warmup):
        t = time.perf_counter()
        run_one(*frames[i % len(frames)])
        if args.verbose:
            print(f"[bench] warm-up frame {i}: {(time.perf_counter() - t) * 1e3:.1f} ms", file=sys.stderr, flush=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    per_stage: Dict[str, List[float]] = {}
    ndet = []
    per_frame = []
    for i in range(args.frames):
        name = frames[i % len(frames)][0]
        c0 = _captures(pipe)
        st, n = run_one(*frames[i % len(frames)])
        ndet.append(n)
        c1 = _captures(pipe)
        # a frame that captured a CUDA graph (a new capacity bucket) pays the capture: named in the tail
        per_frame.append({"frame": name, "end_to_end_ms": round(st["end_to_end"], 3),
                          "captures": {k: c1[k] - c0[k] for k in c1 if c1[k] != c0[k]}})
        if args.verbose and (i < 5 or i % 20 == 0):
            print(f"[bench] frame {i}: {st['end_to_end']:.1f} ms", file=sys.stderr, flush=True)
        for k, v in st.items():
            per_stage.setdefault(k, []).append(v)
    prof_stats = None
    if args.device.startswith("cuda") and args.profile > 0:
        prof_stats = profile_frames(lambda i: run_one(*frames[i % len(frames)]), args.profile, args.profile_top)
    result = {
        "label": args.label, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "config": args.config,
        "checkpoint": args.checkpoint, "engine": args.engine, "views": len(pipe.views), "frames": args.frames,
        "warmup": args.warmup,
        "inputs": sorted({n.split("/")[0] for n, _ in frames}), "num_inputs": len(frames),
        "mean_detections": float(np.mean(ndet)) if ndet else 0.0,
        "peak_gpu_mem_mb": (torch.cuda.max_memory_allocated() / 2 ** 20) if args.device.startswith("cuda") else None,
        "stages": {k: percentiles(v) for k, v in per_stage.items()},
        "profile": prof_stats,
        "graph_captures_after_warmup": {k: sum(f["captures"].get(k, 0) for f in per_frame) for k in _captures(pipe)},
        "per_frame": per_frame,
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    lines = ["| stage | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
    for k, s in result["stages"].items():
        lines.append(f"| {k} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} |")
    md = (f"**{result['label'] or 'pipeline'}** — {result['device_name']} ({args.device}), {result['date']}, "
          f"{result['views']} view(s), {args.frames} frames after {args.warmup} warm-up, inputs {result['inputs']}, "
          f"peak GPU memory {result['peak_gpu_mem_mb'] and round(result['peak_gpu_mem_mb'])} MB"
          + (f", {prof_stats['kernel_launches_per_frame']:.0f} kernel launches/frame, GPU busy "
             f"{100 * prof_stats['gpu_busy_share']:.0f}% (profiler, {prof_stats['frames']} frames)" if prof_stats else "")
          + "\n\n" + "\n".join(lines))
    print(md)
    if args.json:
        from cmfiou_core.provenance import provenance

        result["provenance"] = provenance(args.config, args.checkpoint, args.device)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
