"""In-process soak (no ROS): run the Pipeline on replayed frames in a loop and watch the process memory.

Separates the possible causes of a growing detector RSS: Python objects (tracemalloc, gc object count), memory the
C allocator has handed out and not been given back (glibc ``mallinfo2``: ``in_use`` = allocated, ``free_held`` =
freed but kept by malloc in its arenas) and the resident set (``/proc/self/status`` VmRSS / RssAnon).
``--threaded`` runs the pipeline on a worker thread as the detector node does (glibc gives a thread its own arena);
``--vary`` randomly subsamples each cloud (variable-size tensors, the classic fragmentation pattern);
``--trim`` calls ``malloc_trim(0)`` after every frame (the mitigation measured against the default).

    python bench/soak_inprocess.py --frames 300 --data ../shared/kitti_samples/object/training --threaded --json s.json
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def proc_status_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k = line.split(":")[0]
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(line.split()[1]) / 1024.0
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_HAS_MI2 = hasattr(_libc, "mallinfo2")
if _HAS_MI2:
    _libc.mallinfo2.restype = _Mallinfo2


def malloc_mb() -> dict:
    """glibc heap, all arenas: in_use = allocated (incl. mmapped chunks), free_held = free but not returned."""
    if not _HAS_MI2:
        return {}
    m = _libc.mallinfo2()
    return {"malloc_in_use": (m.uordblks + m.hblkhd) / 2 ** 20, "malloc_free_held": m.fordblks / 2 ** 20,
            "malloc_arena": m.arena / 2 ** 20, "malloc_mmapped": m.hblkhd / 2 ** 20}


def slope(t_min, y) -> float:
    t, y = np.asarray(t_min, float), np.asarray(y, float)
    ok = np.isfinite(y)
    return float(np.polyfit(t[ok], y[ok], 1)[0]) if ok.sum() >= 3 else float("nan")


def load_frames(data: str):
    from PIL import Image

    from cmfiou_core.calib import Calibration
    from cmfiou_core.types import Frame

    root = Path(data)
    frames = []
    for f in sorted((root / "velodyne").glob("*.bin")):
        img = np.array(Image.open(root / "image_2" / f"{f.stem}.png").convert("RGB"))
        cal = Calibration.from_kitti_object_file(root / "calib" / f"{f.stem}.txt", img.shape[1], img.shape[0])
        pts = np.fromfile(f, np.float32).reshape(-1, 4)
        frames.append(Frame(pts, img, cal, index=f.stem))
    return frames


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="KITTI-layout folder with velodyne/ image_2/ calib/")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes (0: --frames only)")
    ap.add_argument("--config", default="")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--threaded", action="store_true", help="run the pipeline on one worker thread, like the node")
    ap.add_argument("--vary", action="store_true", help="random subsample 50-100%% of each cloud")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after every frame")
    ap.add_argument("--tracemalloc", action="store_true", help="trace Python allocations (slower)")
    ap.add_argument("--sample-every", type=int, default=5, help="frames between samples")
    ap.add_argument("--warmup-frames", type=int, default=20, help="frames excluded from the 'after warm-up' slope")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args(argv)

    import torch

    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.types import Frame

    torch.set_num_threads(1)
    frames = load_frames(ns.data)
    pipe = Pipeline.from_config(ns.config or None, checkpoint=ns.checkpoint or None, device="cpu")
    pipe.warmup()
    rng = np.random.default_rng(0)
    if ns.tracemalloc:
        tracemalloc.start(1)
    samples = []
    t0 = time.monotonic()
    state = {"i": 0, "err": None, "frame_ms": [], "trim_ms": []}
    print(f"{len(frames)} frames, threaded={ns.threaded} vary={ns.vary} trim={ns.trim} "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}", flush=True)

    def sample(i):
        gc.collect()
        s = {"frame": i, "t_min": (time.monotonic() - t0) / 60.0, **proc_status_mb(), **malloc_mb(),
             "gc_objects": len(gc.get_objects())}
        if ns.tracemalloc:
            s["py_traced_mb"] = tracemalloc.get_traced_memory()[0] / 2 ** 20
        samples.append(s)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}), flush=True)

    def loop():
        try:
            for i in range(ns.frames):
                if ns.minutes and time.monotonic() - t0 > ns.minutes * 60:
                    break
                f = frames[i % len(frames)]
                if ns.vary:
                    keep = rng.random(len(f.points)) < rng.uniform(0.5, 1.0)
                    f = Frame(f.points[keep], f.image, f.calib, index=f.index)
                t1 = time.perf_counter()
                pipe(f)
                t2 = time.perf_counter()
                state["frame_ms"].append((t2 - t1) * 1e3)
                if ns.trim:
                    _libc.malloc_trim(0)
                    state["trim_ms"].append((time.perf_counter() - t2) * 1e3)
                state["i"] = i + 1
                if (i + 1) % ns.sample_every == 0:
                    sample(i + 1)
        except Exception as e:  # noqa: BLE001
            state["err"] = f"{type(e).__name__}: {e}"

    sample(0)
    if ns.threaded:
        th = threading.Thread(target=loop, name="cmfiou_inference")
        th.start()
        th.join()
    else:
        loop()
    if state["err"]:
        print("error:", state["err"], file=sys.stderr)
    t = [s["t_min"] for s in samples]
    keys = [k for k in samples[-1] if k not in ("frame", "t_min")]
    after = [j for j, s in enumerate(samples) if s["frame"] >= ns.warmup_frames]
    half = [j for j, s in enumerate(samples) if s["frame"] >= samples[-1]["frame"] / 2]
    per_frame = lambda idx, k: float(np.polyfit([samples[j]["frame"] for j in idx],  # noqa: E731
                                                [samples[j][k] for j in idx], 1)[0]) if len(idx) >= 3 else float("nan")
    report = {
        "data": ns.data, "frames": state["i"], "minutes": t[-1], "threaded": ns.threaded, "vary": ns.vary,
        "trim": ns.trim, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX"), "error": state["err"],
        "frame_ms_median": float(np.median(state["frame_ms"])) if state["frame_ms"] else None,
        "trim_ms_median": float(np.median(state["trim_ms"])) if state["trim_ms"] else None,
        "first": samples[0], "last": samples[-1],
        "max": {k: max(s.get(k, float("nan")) for s in samples) for k in keys},
        "slope_mb_per_min_all": {k: slope(t, [s[k] for s in samples]) for k in keys if k != "gc_objects"},
        "slope_mb_per_min_after_warmup": {k: slope([t[j] for j in after], [samples[j][k] for j in after])
                                          for k in keys if k != "gc_objects"},
        "slope_mb_per_frame_last_half": {k: per_frame(half, k) for k in keys},
        "samples": samples,
    }
    from cmfiou_core.provenance import provenance

    report["provenance"] = provenance(ns.config, ns.checkpoint, "cpu")
    text = json.dumps(report, indent=1)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(text)
    print(json.dumps({k: report[k] for k in ("frames", "minutes", "frame_ms_median", "trim_ms_median", "max",
                                             "slope_mb_per_min_after_warmup",
                                             "slope_mb_per_frame_last_half")}, indent=1))
    return 0 if not state["err"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
