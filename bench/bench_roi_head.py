#!/usr/bin/env python3
"""Latency, aten-op count and host-sync count of the eval-mode RoI head forward (proposal layer + 3 refinement
stages x 2 modalities) and of the post-processing, alone, on one frame.

Inputs: the real backbone outputs of ``../shared/official_dense`` (KITTI frame, 15k/7k raw and 27k/9k pseudo
voxels at x_conv3/x_conv4, BEV map 200x176) and the RPN outputs of ``../shared/official_roi`` when present
(``$CMFIOU_SHARED``), else a synthetic frame of the same sizes (``--synthetic``). The head has its default random
initialisation (seed 0): the refinements stay small, so every stage pools around real voxels like a trained model.

Timing: CUDA events around each call (one sync after it) on the GPU, perf_counter on the CPU; warm-up excluded.
Counts (device independent, one call, ``cmfiou_core.opcount``): aten ops dispatched (all, and non-view ones ~
kernel launches) per section (``proposal``,
``s<t>.pool_raw``/``pool_mm``/``head``, ``final``, ``postprocess``) and host syncs with their source lines; NMS is
counted on its CUDA path (matrix mode) on any device. On CUDA the syncs are also counted with
``torch.cuda.set_sync_debug_mode``.

    python bench/bench_roi_head.py --device cpu --threads 1
    python bench/bench_roi_head.py --device cuda --iters 200 --json roi_head.json
    python bench/bench_roi_head.py --smoke --json -            # seconds, for the test suite
    python bench/bench_roi_head.py --engine static ...         # the static-shape engine (cmfiou_core.engine.roi)

``--kitti-frame ID``: the bundled demo checkpoint (real weights, its config's post-processing) on real KITTI frame ID
of ``$CMFIOU_KITTI_SAMPLES`` (default ../shared/kitti_samples), camera + LiDAR; the RoI head's inputs are taken at its
call inside ``Pipeline``.

``--engine static``: ``engine.roi.StaticRoIHead`` (same module, PaddedSparse inputs, capacity = voxel count rounded up
to a multiple of 4096) + ``engine.nms.post_process_static``; the PaddedSparse conversion is outside the timing.
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

from cmfiou_core.model.postprocess import post_process  # noqa: E402
from cmfiou_core.model.roi_head import RoIHead  # noqa: E402
from cmfiou_core.opcount import OpCounter, mark  # noqa: E402


def _sp(feat, ind, shape, B):
    import spconv.pytorch as spconv

    return spconv.SparseConvTensor(feat, ind, [int(x) for x in shape], B)


def real_inputs(shared: Path):
    dense, roi = shared / "official_dense" / "outputs.npz", shared / "official_roi" / "inputs.npz"
    if not (dense.is_file() and roi.is_file()):
        return None
    d, i = np.load(dense), np.load(roi)
    out = {"source": "official_dense/official_roi (KITTI frame)", "st_features_2d": torch.from_numpy(d["st_features_2d"]),
           "batch_box_preds": torch.from_numpy(i["proposal_batch_box_preds"]),
           "batch_cls_preds": torch.from_numpy(i["proposal_batch_cls_preds"])}
    for mod, key in (("raw", "multi_scale_3d_features"), ("mm", "multi_scale_3d_features_mm")):
        out[key] = {s: (torch.from_numpy(d[f"{mod}_{s}_features"]), torch.from_numpy(d[f"{mod}_{s}_indices"]),
                        d[f"{mod}_{s}_spatial_shape"]) for s in ("x_conv3", "x_conv4")}
    return out


def synthetic_inputs(seed=0, n_obj=20, anchors=64200, voxels=((15000, 7000), (27000, 9000))):
    """Voxels clustered around ``n_obj`` car-size objects + a ground layer; proposals = jittered objects + noise."""
    g = torch.Generator().manual_seed(seed)
    ctr = torch.stack([torch.rand(n_obj, generator=g) * 60 + 5, torch.rand(n_obj, generator=g) * 60 - 30,
                       torch.full((n_obj,), -1.0)], 1)
    out = {"source": f"synthetic ({n_obj} objects)"}
    for (n3, n4), key in zip(voxels, ("multi_scale_3d_features", "multi_scale_3d_features_mm")):
        d = {}
        for name, n, stride, shape in (("x_conv3", n3, 4, (21, 400, 352)), ("x_conv4", n4, 8, (10, 200, 176))):
            vs = 0.05 * stride
            k = n // 2
            obj = ctr[torch.randint(0, n_obj, (k,), generator=g)] + torch.randn(k, 3, generator=g) * \
                torch.tensor([1.5, 0.7, 0.5])
            bg = torch.stack([torch.rand(n - k, generator=g) * 70.4, torch.rand(n - k, generator=g) * 80 - 40,
                              torch.rand(n - k, generator=g) * 0.6 - 1.9], 1)
            xyz = torch.cat([obj, bg])
            zyx = torch.stack([(xyz[:, 2] + 3) / vs, (xyz[:, 1] + 40) / vs, xyz[:, 0] / vs], 1).floor().long()
            zyx = torch.minimum(zyx.clamp_min(0), torch.tensor(shape) - 1)
            zyx = torch.unique(zyx, dim=0)
            ind = torch.cat([torch.zeros(len(zyx), 1, dtype=torch.long), zyx], 1).int()
            d[name] = (torch.randn(len(ind), 64, generator=g), ind, shape)
        out[key] = d
    boxes = torch.zeros(1, anchors, 7)
    src = ctr[torch.randint(0, n_obj, (anchors,), generator=g)]
    boxes[0, :, :3] = src + torch.randn(anchors, 3, generator=g) * torch.tensor([2.0, 2.0, 0.2])
    boxes[0, :, 3:6] = torch.tensor([3.9, 1.6, 1.56]) * (1 + 0.1 * torch.randn(anchors, 3, generator=g)).abs()
    boxes[0, :, 6] = torch.rand(anchors, generator=g) * 6.28 - 3.14
    out["batch_box_preds"] = boxes
    out["batch_cls_preds"] = torch.randn(1, anchors, 3, generator=g)
    out["st_features_2d"] = torch.randn(1, 256, 200, 176, generator=g) * 0.1
    return out


def kitti_frame_inputs(fid: str, dev):
    """(head, batch, post-processing config) of the demo checkpoint on real KITTI frame ``fid``."""
    from PIL import Image

    from cmfiou_core.calib import Calibration
    from cmfiou_core.model.postprocess import PostProcessConfig
    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.types import Frame

    root = Path(os.environ.get("CMFIOU_KITTI_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "kitti_samples"))
    d = root / "object" / "training"
    img = np.array(Image.open(d / "image_2" / f"{fid}.png").convert("RGB"))
    cal = Calibration.from_kitti_object_file(d / "calib" / f"{fid}.txt", img.shape[1], img.shape[0])
    pts = np.fromfile(d / "velodyne" / f"{fid}.bin", np.float32).reshape(-1, 4)
    pipe = Pipeline.from_config(None, None, dev)
    seen = {}
    h = pipe.model.roi_head.register_forward_pre_hook(lambda m, args: seen.update({"in": dict(args[0])}))
    try:
        pipe(Frame(pts, img, cal))
    finally:
        h.remove()
    keys = ("batch_size", "st_features_2d", "batch_box_preds", "batch_cls_preds", "multi_scale_3d_features",
            "multi_scale_3d_features_mm")
    return pipe.model.roi_head, {k: seen["in"][k] for k in keys}, \
        PostProcessConfig.from_any(pipe.model.cfg.post_processing)


def make_batch(inp, dev):
    b = {"batch_size": 1, "st_features_2d": inp["st_features_2d"].to(dev),
         "batch_box_preds": inp["batch_box_preds"].to(dev), "batch_cls_preds": inp["batch_cls_preds"].to(dev)}
    for key in ("multi_scale_3d_features", "multi_scale_3d_features_mm"):
        b[key] = {s: _sp(f.to(dev), i.to(dev), sh, 1) for s, (f, i, sh) in inp[key].items()}
    return b


def fresh(batch):
    """Shallow copy with the RPN outputs (the head overwrites batch_box_preds/cls_preds)."""
    return dict(batch)


def count(head, batch, pp_cfg):
    with torch.no_grad(), OpCounter("proposal", cuda_paths=True) as oc:  # CUDA branches (NMS) on any device
        bd = head(fresh(batch))
        mark("postprocess")
        post_process(bd, pp_cfg)
    return oc


def static_runner(head, batch, pp_cfg, pair_capacity=None, pool_kernel="auto"):
    """() -> detections of the static engine on ``batch`` (inputs converted to PaddedSparse once, here)."""
    from cmfiou_core.engine.padded import PaddedSparse
    from cmfiou_core.engine.roi import StaticRoIHead
    from cmfiou_core.model.postprocess import PostProcessConfig

    st = StaticRoIHead(head, pair_capacity=pair_capacity, pool_kernel=pool_kernel)
    cfg = PostProcessConfig.from_any(pp_cfg)

    def padded(d):
        return {k: PaddedSparse.from_spconv(t, (t.indices.shape[0] // 4096 + 1) * 4096) for k, t in d.items()}

    raw, mm = padded(batch["multi_scale_3d_features"]), padded(batch["multi_scale_3d_features_mm"])
    args = (raw, mm, batch["st_features_2d"], batch["batch_box_preds"], batch["batch_cls_preds"])

    def head_call():
        return st(*args)

    def pp_call(out):
        return st.detect(out, cfg)
    return head_call, pp_call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (spconv's CPU path needs 1)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic frame even when the shared inputs exist")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic frame, 1 iteration (test suite)")
    ap.add_argument("--exact-layout", action="store_true", help="official per-row conv layout in the grid pooling")
    ap.add_argument("--engine", default="eager", choices=["eager", "static"],
                    help="eager RoIHead (default) or the static-shape engine.roi.StaticRoIHead")
    ap.add_argument("--pool-kernel", default="auto", choices=["auto", "triton", "torch"],
                    help="--engine static: grid pooling by the Triton kernel (auto: on CUDA) or the torch path")
    ap.add_argument("--kitti-frame", default=None, help="demo checkpoint on this real KITTI frame id (e.g. 000008)")
    ap.add_argument("--pair-capacity", type=int, default=None,
                    help="static engine: NMS candidate-pair capacity of the matrix walk (default: all pairs)")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path ('-' = stdout)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    if a.smoke:
        a.iters, a.warmup = 1, 0
        inp = synthetic_inputs(n_obj=4, anchors=2000, voxels=((1500, 700), (2700, 900)))
    else:
        shared = Path(os.environ.get("CMFIOU_SHARED", Path(__file__).resolve().parents[2] / "shared"))
        inp = None if a.synthetic else real_inputs(shared)
        inp = inp or synthetic_inputs()
    torch.manual_seed(0)
    head = RoIHead().to(dev).eval()
    batch = make_batch(inp, dev)
    pp_cfg = None  # official KITTI post-processing defaults
    if a.kitti_frame:
        head, batch, pp_cfg = kitti_frame_inputs(a.kitti_frame, dev)
        inp = {"source": f"demo checkpoint, real KITTI frame {a.kitti_frame}",
               **{k: {s: (None, t.indices) for s, t in batch[k].items()}
                  for k in ("multi_scale_3d_features", "multi_scale_3d_features_mm")}}
    if a.exact_layout:
        from cmfiou_core.model.grid_pool import use_exact_official_layout

        use_exact_official_layout(head)
    if a.engine == "static":
        head_call, pp_call = static_runner(head, batch, pp_cfg, a.pair_capacity, a.pool_kernel)
    else:
        def head_call():
            return head(fresh(batch))

        def pp_call(bd):
            return post_process(bd, pp_cfg)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t_head, t_pp = [], []
    with torch.no_grad():
        for it in range(a.warmup + a.iters):
            sync()
            if dev.type == "cuda":
                e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                e[0].record()
                bd = head_call()
                e[1].record()
                pp_call(bd)
                e[2].record()
                torch.cuda.synchronize()
                th, tp = e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])
            else:
                t0 = time.perf_counter()
                bd = head_call()
                t1 = time.perf_counter()
                pp_call(bd)
                t2 = time.perf_counter()
                th, tp = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            if it >= a.warmup:
                t_head.append(th)
                t_pp.append(tp)

    def one_call():
        with torch.no_grad():
            pp_call(head_call())

    cuda_syncs = cuda_sync_messages(one_call) if dev.type == "cuda" else None

    if a.engine == "static":
        with torch.no_grad(), OpCounter("proposal", cuda_paths=True) as oc:
            pp_call(head_call())
    else:
        oc = count(head, batch, pp_cfg)
    ops = dict(oc.ops)
    syncs = oc.sync_counts()
    stages = sorted({k.split(".")[0] for k in ops if k.startswith("s") and "." in k})
    per_stage = {s: {"ops": oc.n_ops(s + "."), "kernels": oc.n_kernels(s + "."), "syncs": oc.n_syncs(s + ".")}
                 for s in stages}
    head_sections = [k for k in ops if k != "postprocess"]
    out = {
        "source": inp["source"], "engine": a.engine, "pool_kernel": a.pool_kernel, "pair_capacity": a.pair_capacity,
        "device": str(dev),
        "device_name": device_name(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "iters": a.iters, "warmup": a.warmup, "smoke": a.smoke, "exact_layout": a.exact_layout,
        "voxels": {k: {s: int(v[1].shape[0]) for s, v in inp[k].items()}
                   for k in ("multi_scale_3d_features", "multi_scale_3d_features_mm")},
        "ms": {"roi_head": p50_p95_mean(t_head), "postprocess": p50_p95_mean(t_pp)},
        "aten_ops": ops, "kernel_ops": dict(oc.kernels), "host_syncs": syncs, "per_stage": per_stage,
        "roi_head_totals": {"ops": sum(ops[k] for k in head_sections),
                            "kernels": sum(oc.kernels.get(k, 0) for k in head_sections),
                            "syncs": sum(v for k, v in syncs.items() if k != "postprocess")},
        "postprocess_totals": {"ops": ops.get("postprocess", 0), "kernels": oc.kernels.get("postprocess", 0),
                               "syncs": syncs.get("postprocess", 0)},
        "sync_sites": oc.sync_sites(), "cuda_syncs_per_call": None if cuda_syncs is None else len(cuda_syncs),
        "cuda_sync_messages": cuda_syncs,
    }
    print(f"# {a.engine} engine; {out['source']}; {out['device']} ({out['device_name']}), threads {out['threads']}, "
          f"{a.iters} iters after {a.warmup} warm-up")
    for k, v in out["ms"].items():
        print(f"{k:12s} p50 {v['p50']:9.2f} ms  p95 {v['p95']:9.2f} ms")
    print(f"{'section':16s} {'aten ops':>9s} {'non-view':>9s} {'syncs':>6s}")
    for k in ops:
        print(f"{k:16s} {ops[k]:9d} {oc.kernels.get(k, 0):9d} {syncs.get(k, 0):6d}")
    rt, pt = out["roi_head_totals"], out["postprocess_totals"]
    print(f"roi_head total: {rt['ops']} ops ({rt['kernels']} non-view), {rt['syncs']} syncs; "
          f"postprocess: {pt['ops']} ops ({pt['kernels']} non-view), {pt['syncs']} syncs")
    for s, n in out["sync_sites"].items():
        print(f"  {n:4d} x {s}")
    if cuda_syncs is not None:
        print(f"CUDA syncs in one head + post-processing call (sync debug mode): {len(cuda_syncs)}")
    from cmfiou_core.provenance import provenance  # random-weight RoIHead (seed 0): no config, no checkpoint

    if a.kitti_frame:  # the bundled demo checkpoint with its config
        write_json(out, a.json, provenance(None, None, a.device))
    else:
        write_json(out, a.json, provenance(None, None, a.device, resolve_default_checkpoint=False))
    return out


if __name__ == "__main__":
    main()
