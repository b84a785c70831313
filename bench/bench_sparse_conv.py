"""Tile candidates of the fused sparse convolution (``engine.triton_conv``) on one real frame's convolutions.

The backbone engine (no CUDA graph) runs a frame once per engine dtype while every ``sparse_conv`` call is recorded
(its inputs, kernel map rows, weights and flags); each candidate tile then replays the frame's whole list of calls,
timed with CUDA events, and its outputs are compared with the current tile's. The torch path (gather -> one GEMM,
cuBLAS) is timed beside them. fp32 runs with TF32 products (``inference.precision: tf32``) unless --ieee.

    python bench/bench_sparse_conv.py --kitti KITTI/training --json docs/results/sparse_conv_tiles_h200.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# candidates beside the current TILES entry: (BM, BN, BK, warps, stages[, flags: 1 FLAT loop, 2 K-major weight,
# 4 fp32 as bf16 hi + lo pairs])
FP32_TILES = [(64, 64, 32, 4, 3), (64, 64, 32, 4, 3, 1), (64, 64, 32, 4, 3, 2), (64, 64, 32, 4, 3, 3),
              (128, 64, 32, 8, 3, 3), (64, 64, 16, 4, 4, 3), (64, 64, 32, 4, 3, 5), (64, 64, 32, 4, 3, 7),
              (128, 64, 32, 8, 3, 5)]
HALF_TILES = [(64, 64, 32, 4, 3), (64, 64, 32, 4, 3, 1), (128, 64, 32, 8, 3, 1), (64, 64, 64, 4, 3, 1),
              (128, 64, 64, 8, 3, 1)]


def record(pipe, batch, dtype):
    """The frame's sparse_conv calls through the backbone engine with feature dtype ``dtype`` (no graph)."""
    from cmfiou_core.engine import triton_conv
    from cmfiou_core.engine.runtime import EngineBackbone

    eng = EngineBackbone(pipe.model.backbone_3d, None, pipe.model.cfg.max_voxels(False), use_graph=False,
                         dtype=dtype).to("cuda").eval()
    calls, real = [], triton_conv.sparse_conv

    def rec(x, rows, weight, bias, relu=False, residual=None, count=None, tile=None, weight_t=None):
        calls.append(dict(x=x.clone(), rows=rows.clone(), weight=weight, bias=bias, relu=relu,
                          weight_t=(weight.t() if weight_t is None else weight_t).to(x.dtype).contiguous(),
                          residual=None if residual is None else residual.clone(),
                          count=None if count is None else count.clone()))
        return real(x, rows, weight, bias, relu=relu, residual=residual, count=count, tile=tile, weight_t=weight_t)

    triton_conv.sparse_conv = rec
    try:
        with torch.no_grad():
            for _ in range(2):           # the first run sizes the capacities, the second runs at them
                calls.clear()
                eng(pipe.model.vfe(dict(batch)))
    finally:
        triton_conv.sparse_conv = real
    return calls


def fused(c, tile):
    from cmfiou_core.engine import triton_conv
    return triton_conv.sparse_conv(c["x"], c["rows"], c["weight"], c["bias"], relu=c["relu"], residual=c["residual"],
                                   count=c["count"], tile=tile, weight_t=c["weight_t"])


def torch_path(c):
    from cmfiou_core.engine.sparse import gather_gemm
    return gather_gemm(c["x"], c["rows"], c["weight"], c["bias"], relu=c["relu"], residual=c["residual"])


def replay(calls, fn, reps):
    outs = [fn(c) for c in calls]           # compile / warm
    outs = [fn(c) for c in calls]
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        for c in calls:
            fn(c)
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps, outs


def main(argv=None) -> int:
    from bench_engine import _batches
    from bench_pipeline import load_frames

    from cmfiou_core.engine import triton_conv
    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.provenance import write_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "config" / "cmfiou_kitti.yaml"))
    ap.add_argument("--checkpoint", default="", help="'' = the bundled demo checkpoint")
    ap.add_argument("--kitti", action="append", default=[], help="KITTI object 'training' folder")
    ap.add_argument("--frame", type=int, default=0, help="index of the frame among the loaded ones")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tiles", type=int, default=0, help="only the first N candidates of each dtype (0: all)")
    ap.add_argument("--ieee", action="store_true", help="fp32 with IEEE products (inference.precision: fp32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_sparse_conv: needs CUDA (the fused kernel's tiles are GPU-specific)")
    frames = load_frames(args.kitti, 0, ROOT / "data", args.frame + 1)
    if not frames:
        raise SystemExit("no frames: give --kitti DIR")
    pipe = Pipeline.from_config(args.config, args.checkpoint or None, "cuda", engine="eager")
    (name, batch), = _batches(pipe, [frames[min(args.frame, len(frames) - 1)]])
    report = {"what": "fused sparse conv tiles, one frame's convolutions replayed", "frame": name,
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "reps": args.reps, "results": {}}
    best = {}
    for label, dtype, tiles in (("fp32-ieee" if args.ieee else "tf32", torch.float32, FP32_TILES),
                                ("bf16", torch.bfloat16, HALF_TILES)):
        # the current tile first (the others' reference), then the other candidates
        tiles = [triton_conv.TILES[dtype]] + [t for t in tiles if t != triton_conv.TILES[dtype]]
        tiles = tiles[:args.tiles] if args.tiles else tiles
        torch.backends.cuda.matmul.allow_tf32 = label == "tf32"
        calls = record(pipe, batch, dtype)
        if not calls:
            raise SystemExit(f"{label}: the engine made no fused-conv call (Triton missing?)")
        shapes = sorted({(c["rows"].shape[1], c["x"].shape[1], c["weight"].shape[1]) for c in calls})
        print(f"{label}: {len(calls)} convolutions, (K, Cin, Cout) {shapes}", flush=True)
        rows, ref = {}, None
        for tile in tiles + ["torch"]:
            if tile == "torch":
                ms, out = replay(calls, torch_path, args.reps)
            else:
                ms, out = replay(calls, lambda c, t=tile: fused(c, t), args.reps)
            if ref is None:
                ref_ms, ref = ms, out
            diff = max(float((a.float() - b.float()).abs().max() / max(1.0, float(b.float().abs().max())))
                       for a, b in zip(out, ref))
            key = "torch" if tile == "torch" else ",".join(map(str, tile))    # torch: gather + cuBLAS GEMM
            rows[key] = {"ms_per_frame": round(ms, 3), "max_rel_diff_vs_current": diff}
            print(f"  {label} {key:24s} {ms:8.3f} ms/frame  max rel diff vs current tile {diff:.2e}", flush=True)
        report["results"][label] = {"current": ",".join(map(str, triton_conv.TILES[dtype])), "tiles": rows,
                                    "shapes_k_cin_cout": shapes}
        ok = {k: v for k, v in rows.items() if v["max_rel_diff_vs_current"] < 1e-2}
        best[label] = min(ok, key=lambda k: ok[k]["ms_per_frame"])
        print(f"  {label} fastest tile: {best[label]} ({rows[best[label]]['ms_per_frame']} ms, current "
              f"{ref_ms:.3f} ms)", flush=True)
    report["fastest"] = best      # a TILES entry ("torch": FoldedConv's torch path)
    write_report(args.json, report, config=args.config, checkpoint=args.checkpoint or None, device="cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
