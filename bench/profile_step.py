#!/usr/bin/env python3
"""Profile training steps and inference frames (cProfile cumulative + torch.profiler top ops) to find hot spots.

    python bench/profile_step.py --data GEN --device cuda [--mode train|infer] [--steps 3]
"""
import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", default="train", choices=("train", "infer"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=45)
    args = ap.parse_args()
    import torch
    import bench_train

    ns = argparse.Namespace(config=str(ROOT / "config/cmfiou_kitti.yaml"), data=args.data, device=args.device,
                            mode="step")
    cfg, model, ds, collate, prepare, dev = bench_train.build(ns)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.mode == "infer":
        from cmfiou_core.pipeline import Pipeline
        from bench_pipeline import load_frames
        pipe = Pipeline(cfg, model, dev)
        frames = load_frames([str(Path(args.data) / "training")], 0, Path("/tmp"), 4)

    def step(i):
        if args.mode == "train":
            b = prepare(collate([ds[2 * i], ds[2 * i + 1]]), dev)
            loss, tb = model(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            d = pipe(frames[i % len(frames)][1])
            print({k: round(v, 1) for k, v in d.timings_ms.items()})
        torch.cuda.synchronize()

    step(0)
    step(1)
    pr = cProfile.Profile()
    t = time.time()
    pr.enable()
    for i in range(args.steps):
        step(i + 2)
    pr.disable()
    print(f"{args.mode}: {(time.time() - t) / args.steps * 1e3:.0f} ms/step")
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(args.top)
    print("\n".join(l[:160] for l in s.getvalue().splitlines()[:args.top + 12]))
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print("\n".join(l[:160] for l in s.getvalue().splitlines()[:40]))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(args.steps + 2)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
