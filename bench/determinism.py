#!/usr/bin/env python3
"""Where does the eager pipeline stop being reproducible? Runs each frame twice (same pipeline, same input) and
compares every module's output of the two runs, in call order.

Every call of every module of the model is recorded through forward hooks (plus the pipeline's ``voxelize`` batch).
Outputs are put in a canonical form before they are compared: a sparse tensor (``indices`` + ``features``) is sorted
by its (b, z, y, x) key, so that a different row order alone is not a difference. Per frame the report names the first
module call whose output differs, and per module the largest difference over the frames (absolute, and relative to
the output's largest magnitude).

``--deterministic`` runs both passes under ``torch.use_deterministic_algorithms(True, warn_only=True)`` (with
``CUBLAS_WORKSPACE_CONFIG=:4096:8``); the torch ops that have no deterministic CUDA implementation are listed from
torch's own warnings in either mode.

    python bench/determinism.py --device cuda --kitti KITTI/training --frames 4 --json out/determinism.json
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def canonical(x: Any) -> List[Tuple[str, Any]]:
    """Flatten a module output into (path, tensor) pairs; sparse tensors sorted by their voxel key."""
    import torch

    from cmfiou_core.engine.sparse import linear_keys

    out: List[Tuple[str, Any]] = []

    def walk(v, path):
        if isinstance(v, torch.Tensor):
            out.append((path, v.detach().clone()))
        elif hasattr(v, "features") and hasattr(v, "indices") and hasattr(v, "spatial_shape"):
            idx = v.indices.long()
            order = torch.argsort(linear_keys(idx, v.spatial_shape))
            out.append((path + ".indices", idx[order].clone()))
            out.append((path + ".features", v.features.detach()[order].clone()))
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k], f"{path}.{k}" if path else str(k))
        elif isinstance(v, (list, tuple)):
            for i, e in enumerate(v):
                walk(e, f"{path}[{i}]")

    walk(x, "")
    return out


def diff(a, b) -> Dict[str, Any]:
    """One recorded tensor of run 1 against run 2."""
    import torch

    if a.shape != b.shape:
        return {"same": False, "shape": [list(a.shape), list(b.shape)]}
    if a.numel() == 0:
        return {"same": True}
    if not a.dtype.is_floating_point:
        n = int((a != b).sum())
        return {"same": n == 0, "elements_differ": n}
    af, bf = a.double(), b.double()
    fin = torch.isfinite(af) & torch.isfinite(bf)
    d = (af - bf).abs().where(fin, torch.zeros_like(af))
    nan_mismatch = int((torch.isfinite(af) != torch.isfinite(bf)).sum())
    scale = float(af.abs().where(fin, torch.zeros_like(af)).max())
    mx = float(d.max())
    return {"same": mx == 0.0 and nan_mismatch == 0, "max_abs": mx, "max_rel": mx / scale if scale > 0 else 0.0,
            "elements_differ": int((d > 0).sum()), "nonfinite_mismatch": nan_mismatch}


def record(pipe, frame):
    """Run ``pipe(frame)`` with hooks on every module -> (list of (call name, canonical output), detections)."""
    calls: List[Tuple[str, List[Tuple[str, Any]]]] = []
    counts: Dict[str, int] = {}
    handles = []
    for name, mod in pipe.model.named_modules():
        if not name:
            continue

        def hook(m, inp, outp, name=name):
            k = counts.get(name, 0)
            counts[name] = k + 1
            calls.append((f"{name}#{k}", canonical(outp)))
        handles.append(mod.register_forward_hook(hook))

    def stage_hook(stage, batch):
        if stage == "voxelize":
            calls.append(("pipeline.voxelize", canonical({k: v for k, v in batch.items()})))
    pipe.stage_hooks.append(stage_hook)
    try:
        det = pipe(frame)
    finally:
        for h in handles:
            h.remove()
        pipe.stage_hooks.remove(stage_hook)
    return calls, det


def main(argv=None) -> int:
    from benchutil import pipeline_arg_parser

    from cmfiou_core.model.spconv_compat import ALGORITHM_NAMES, set_algorithm

    ap = pipeline_arg_parser(__doc__)
    ap.add_argument("--generated", type=int, default=0)
    ap.add_argument("--gen-dir", default="/tmp/determinism_gen")
    ap.add_argument("--frames", type=int, default=4, help="frames to check (the first N of the inputs)")
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True, warn_only=True) for both runs")
    ap.add_argument("--random-weights", action="store_true",
                    help="a model with seed-0 random weights instead of a checkpoint (reproducibility needs no "
                         "trained weights; for a device host that cannot carry the checkpoint)")
    ap.add_argument("--spconv-algo", choices=ALGORITHM_NAMES, default="native",
                    help="the spconv algorithm of every conv: native (what the model uses) or implicit_gemm (the "
                         "GPU wheels' default, MaskImplicitGemm)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before CUDA initialises

    import torch
    from bench_pipeline import load_frames

    from cmfiou_core.pipeline import Pipeline
    from cmfiou_core.provenance import write_report

    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device == "cpu":
        torch.set_num_threads(1)   # spconv's CPU kernels are reproducible with one thread only (project rule)
    frames = load_frames(args.kitti, args.generated, Path(args.gen_dir), args.frames)[:args.frames]
    if args.random_weights:
        from cmfiou_core.model.detector import build_model
        from cmfiou_core.model.model_config import load_config
        from cmfiou_core.pipeline import default_config

        cfg = load_config(args.config or default_config())
        torch.manual_seed(0)
        pipe = Pipeline(cfg, build_model(cfg), args.device, weights_loaded=False, engine="eager",
                        precision=args.precision)
    else:
        pipe = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="eager",
                                    precision=args.precision)

    set_algorithm(pipe.model, args.spconv_algo)
    nondet_ops: Dict[str, int] = {}
    per_module: Dict[str, Dict[str, Any]] = {}
    rows = []
    for fi, (fname, fr) in enumerate(frames):
        print(f"[determinism] frame {fi + 1}/{len(frames)} {fname}", flush=True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            c1, d1 = record(pipe, fr)
            c2, d2 = record(pipe, fr)
        for x in w:
            msg = str(x.message)
            if "deterministic" in msg:
                op = msg.split(" does not have")[0].strip()
                nondet_ops[op] = nondet_ops.get(op, 0) + 1
        first = None
        n_diff = 0
        if [n for n, _ in c1] != [n for n, _ in c2]:
            first = {"call": "call sequence differs", "run1": len(c1), "run2": len(c2)}
        for (n, outs1), (_, outs2) in zip(c1, c2):
            mod = n.split("#")[0]
            for (p, t1), (_, t2) in zip(outs1, outs2):
                r = diff(t1, t2)
                key = f"{mod}:{p}"
                agg = per_module.setdefault(key, {"calls": 0, "differ": 0, "max_abs": 0.0, "max_rel": 0.0,
                                                  "shape_mismatch": 0})
                agg["calls"] += 1
                if not r["same"]:
                    agg["differ"] += 1
                    n_diff += 1
                    if "shape" in r:
                        agg["shape_mismatch"] += 1
                    agg["max_abs"] = max(agg["max_abs"], r.get("max_abs", float(r.get("elements_differ", 0))))
                    agg["max_rel"] = max(agg["max_rel"], r.get("max_rel", 0.0))
                    if first is None:
                        first = {"call": n, "output": p, **r}
        same_det = (d1.boxes.shape == d2.boxes.shape and bool((d1.boxes == d2.boxes).all())
                    and bool((d1.scores == d2.scores).all()))
        rows.append({"frame": fname, "module_calls": len(c1), "outputs_differ": n_diff, "first_difference": first,
                     "detections_identical": same_det, "detections": [int(len(d1.scores)), int(len(d2.scores))]})
        print(f"  outputs differing: {n_diff}; first: {first}; detections identical: {same_det}", flush=True)
        del c1, c2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # modules in their first-call order, only those that ever differed
    differing = {k: v for k, v in per_module.items() if v["differ"]}
    report = {"what": "run-to-run differences of the eager pipeline, per module output (canonical order)",
              "deterministic_algorithms": bool(args.deterministic), "precision": args.precision,
              "random_weights": bool(args.random_weights), "spconv_algo": args.spconv_algo,
              "nondeterministic_torch_ops": nondet_ops, "frames": rows, "differing_outputs": differing,
              "outputs_checked": len(per_module)}
    print("non-deterministic torch ops (torch's warnings):", nondet_ops or "none", flush=True)
    for k, v in list(differing.items())[:40]:
        print(f"  {k}: differ {v['differ']}/{v['calls']} max_abs {v['max_abs']:.3g} max_rel {v['max_rel']:.3g}")
    write_report(args.json, report, config=args.config,
                 checkpoint="none" if args.random_weights else (args.checkpoint or None), device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
