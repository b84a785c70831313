#!/usr/bin/env python3
"""Per-stage latency of the pseudo-point generator (projection, completion, lifting, thinning, total) on one
KITTI-size frame: a real sample (``$CMFIOU_KITTI_SAMPLES`` or ``../shared/kitti_samples``, frame 000008, 1242x375)
when available, else a synthetic 64-beam scan + random image. Warm-up iterations are excluded; p50/p95 in ms.

Stage times come from the generator itself (CUDA events on GPU with one sync at the end, perf_counter on CPU);
``wall`` is the host-side time of the whole call (it ends with the generator's single host sync).

Also reported, for one call after the timing loop: the number of aten ops dispatched per stage (at this image size
the GPU stage is launch-bound, so this is the figure to cut; it is the same on any device up to the device-specific
branches) and the ops that may synchronise a CUDA stream, both counted by :class:`cmfiou_core.opcount.OpCounter`
(the project's one op/sync counter; its classification is conservative, e.g. every ``torch.tensor(data)`` counts as
a host->device copy). On CUDA the syncs are also counted exactly with ``torch.cuda.set_sync_debug_mode``.

    python bench/bench_depth.py --device cpu --threads 1
    python bench/bench_depth.py --device cuda --iters 200 --json out.json
    python bench/bench_depth.py --device cuda --method penet --penet-random   # network timing, random weights
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import cuda_sync_messages, device_name, p50_p95_mean, write_json  # noqa: E402

from cmfiou_core.calib import Calibration  # noqa: E402
from cmfiou_core.depth import DepthConfig, PseudoPointGenerator, input_point_discard  # noqa: E402


def load_frame(samples: Path, fid: str):
    obj = samples / "object" / "training"
    if not (obj / "velodyne" / f"{fid}.bin").is_file():
        return None
    from PIL import Image

    pts = np.fromfile(obj / "velodyne" / f"{fid}.bin", dtype=np.float32).reshape(-1, 4)
    img = np.array(Image.open(obj / "image_2" / f"{fid}.png").convert("RGB"))
    return pts, img, Calibration.from_kitti_object_file(obj / "calib" / f"{fid}.txt"), f"kitti object {fid}"


def synthetic_frame(seed: int = 0):
    """HDL-64-like scan (64 beams x 1800 azimuths, ground plane + random walls) and a random 1242x375 image."""
    g = np.random.default_rng(seed)
    elev = np.deg2rad(np.linspace(2.0, -24.8, 64))[:, None]
    az = np.deg2rad(np.linspace(-180, 180, 1800, endpoint=False))[None, :]
    rng = np.where(elev < -0.01, np.minimum(1.73 / np.sin(-elev + 1e-6), 80.0), 80.0) * np.ones_like(az)
    rng = np.minimum(rng, g.uniform(5, 80, size=rng.shape) + 100 * (g.random(rng.shape) < 0.7))
    x, y, z = rng * np.cos(elev) * np.cos(az), rng * np.cos(elev) * np.sin(az), rng * np.sin(elev)
    pts = np.stack([x, y, z, g.random(x.shape)], -1).reshape(-1, 4).astype(np.float32)
    P2 = np.array([[721.5377, 0, 609.5593, 44.85728], [0, 721.5377, 172.854, 0.2163791], [0, 0, 1, 0.002745884]])
    Tr = np.array([[0, -1, 0, 0], [0, 0, -1, -0.08], [1, 0, 0, -0.27]], float)
    img = g.integers(0, 256, size=(375, 1242, 3), dtype=np.uint8)
    return pts, img, Calibration(P2, np.eye(3), Tr, 1242, 375), "synthetic 64-beam"


def count_ops(gen, P, I, calib):
    """({stage: aten ops dispatched}, ["stage: op"] host syncs) for one generator call, counted with
    :class:`cmfiou_core.opcount.OpCounter` on the code path of this device; stages follow ``StageTimer.mark``."""
    import cmfiou_core.timing as timing
    from cmfiou_core.opcount import OpCounter

    order = {"start": "projection", "projection": "completion", "completion": "lifting", "lifting": "thinning",
             "thinning": "after"}
    orig = timing.StageTimer.mark
    with OpCounter(section="projection", where=False, cuda_paths=False) as oc:
        def mark(self, name):
            orig(self, name)
            oc.section = order.get(name, name)

        timing.StageTimer.mark = mark
        try:
            gen(P, I, calib)
        finally:
            timing.StageTimer.mark = orig
    counts = {k: v for k, v in oc.ops.items() if k != "after"}
    counts["total"] = sum(counts.values())
    return counts, [f"{s}: {n}" for s, _kind, n, _w in oc.syncs if s != "after"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--method", default="ipbasic", choices=["ipbasic", "penet"])
    ap.add_argument("--penet-checkpoint", default=None)
    ap.add_argument("--penet-random", action="store_true", help="time PENet with random weights (no checkpoint)")
    ap.add_argument("--crop-official", action="store_true")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--frame", default="000008")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path ('-' = stdout)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    samples = Path(os.environ.get("CMFIOU_KITTI_SAMPLES", Path(__file__).resolve().parents[2] / "shared" /
                                  "kitti_samples"))
    fr = None if a.synthetic else load_frame(samples, a.frame)
    pts, img, calib, source = fr if fr is not None else synthetic_frame()

    cfg = DepthConfig.from_dict({"method": a.method, "crop_official": a.crop_official,
                                 "penet": {"checkpoint": a.penet_checkpoint}})
    model = None
    if a.method == "penet" and not a.penet_checkpoint:
        if not a.penet_random:
            sys.exit("--method penet needs --penet-checkpoint (or --penet-random for timing only)")
        from cmfiou_core.depth.penet import build_penet

        torch.manual_seed(0)
        model = build_penet()
    gen = PseudoPointGenerator(cfg, penet_model=model)
    P = torch.from_numpy(pts).to(dev)
    I = torch.from_numpy(img).to(dev)
    g = torch.Generator().manual_seed(0)

    stages, wall, disc = {}, [], []
    n_raw = n_ps = n_disc = 0
    for it in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        res = gen(P, I, calib)
        t1 = time.perf_counter()
        sub = input_point_discard(res.pseudo_rows, cfg.discard.rate, cfg.discard.bin_num, cfg.discard.max_dis, g)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if it >= a.warmup:
            for k, v in res.timings_ms.items():
                stages.setdefault(k, []).append(v)
            wall.append((t1 - t0) * 1e3)
            disc.append((t2 - t1) * 1e3)
        n_raw, n_ps, n_disc = res.raw_rows.shape[0], res.pseudo_rows.shape[0], sub.shape[0]

    # count host syncs inside one generator call (expected: 1, the final compaction)
    syncs = cuda_sync_messages(lambda: gen(P, I, calib)) if dev.type == "cuda" else None

    ops, sync_ops = count_ops(gen, P, I, calib)
    out = {
        "aten_ops_per_call": ops, "sync_ops_per_call": sync_ops,
        "cuda_syncs_per_call": None if syncs is None else len(syncs), "cuda_sync_messages": syncs,
        "source": source, "image": [int(img.shape[1]), int(img.shape[0])], "points_in": int(pts.shape[0]),
        "raw_rows": int(n_raw), "pseudo_rows": int(n_ps), "pseudo_after_discard": int(n_disc),
        "device": str(dev), "device_name": device_name(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "method": a.method, "crop_official": a.crop_official, "iters": a.iters, "warmup": a.warmup,
        "ms": {k: p50_p95_mean(v) for k, v in stages.items()},
    }
    out["ms"]["wall"] = p50_p95_mean(wall)
    out["ms"]["discard (input_point_discard)"] = p50_p95_mean(disc)
    print(f"# {source} {out['image'][0]}x{out['image'][1]}, {out['points_in']} pts -> raw {n_raw}, pseudo {n_ps} "
          f"({n_disc} after discard); {out['device']} ({out['device_name']}), threads {out['threads']}, "
          f"method {a.method}, {a.iters} iters after {a.warmup} warm-up")
    print(f"{'stage':32s} {'p50 ms':>9s} {'p95 ms':>9s}")
    for k, v in out["ms"].items():
        print(f"{k:32s} {v['p50']:9.2f} {v['p95']:9.2f}")
    print("aten ops per call: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
    print(f"host-sync ops in one call: {len(sync_ops)} {sync_ops}" + (" (on CPU, nonzero is the CPU-only compaction "
          "branch)" if dev.type == "cpu" else ""))
    if syncs is not None:
        print(f"host syncs inside one generator call (sync debug mode): {len(syncs)} (expected 1: the final "
              f"compaction)")
    from cmfiou_core.provenance import provenance

    write_json(out, a.json, provenance(None, a.penet_checkpoint, a.device, resolve_default_checkpoint=False))
    return out


if __name__ == "__main__":
    main()
