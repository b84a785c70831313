#!/usr/bin/env python3
"""Per-frame detections of the eager pipeline vs the static-shape engine (``Pipeline(engine='graph')``).

For every frame, detections of the two pipelines (same config and checkpoint) are matched greedily by BEV centre
distance (same class). Reports per frame: counts, matched pairs, max centre / size / heading difference of matched
boxes, max score difference, unmatched detections above a score. Writes JSON (with provenance).

    python bench/engine_agreement.py --device cuda --kitti KITTI/training --generated 8 --json out/agree.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def match(a, b, max_dist=1.0):
    """Greedy same-class matching of Detections a, b by BEV centre distance -> list of (i, j, dist)."""
    pairs, used = [], set()
    order = np.argsort(-a.scores) if len(a.scores) else []
    for i in order:
        best, bj = max_dist, -1
        for j in range(len(b.scores)):
            if j in used or b.labels[j] != a.labels[i]:
                continue
            d = float(np.hypot(*(a.boxes[i, :2] - b.boxes[j, :2])))
            if d < best:
                best, bj = d, j
        if bj >= 0:
            used.add(bj)
            pairs.append((int(i), bj, best))
    return pairs


def bev(boxes) -> np.ndarray:
    """LiDAR boxes (M, 7) ``[x, y, z, dx, dy, dz, heading]`` (heading counter-clockwise from +x) -> (M, 5) float64 in
    the convention of ``cmfiou_core.eval.rotated_iou`` (KITTI camera BEV, whose corner rotation turns the other way:
    its angle is minus the LiDAR heading)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 7)
    return np.stack([b[:, 0], b[:, 1], b[:, 3], b[:, 4], -b[:, 6]], 1)


def off_bar(pa, pb, rotated_iou_paired):
    """The equivalence bar on paired LiDAR boxes (M, 7): -> (off, centre, iou), off = neither centre within 1 cm
    (max abs over x, y, z) nor BEV IoU >= 0.99."""
    centre = np.abs(pa[:, :3] - pb[:, :3]).max(1)
    iou = rotated_iou_paired(bev(pa), bev(pb))
    return (centre > 0.01) & (iou < 0.99), centre, iou


def within_bar(box, label, dets, rotated_iou_paired) -> bool:
    """Does Detections ``dets`` hold a box of class ``label`` within the equivalence bar of ``box``?"""
    cand = dets.boxes[dets.labels == label]
    if not len(cand):
        return False
    off, _, _ = off_bar(np.repeat(np.asarray(box)[None], len(cand), 0), cand, rotated_iou_paired)
    return bool((~off).any())


def compare(frames, pa, pb, score, rotated_iou_paired, keep=None):
    """Run pipelines pa and pb on every frame; -> (per-frame rows, worst values). ``keep``: a dict that receives
    (fr, a, b) of every frame with a pair off the bar or an unmatched detection above ``score``."""
    rows, worst = [], {"centre_m": 0.0, "size_m": 0.0, "heading": 0.0, "score": 0.0, "unmatched": 0, "pairs_off": 0,
                       "min_bev_iou": 1.0}
    for name, fr in frames:
        a, b = pa(fr), pb(fr)
        pairs = match(a, b)
        ia = {i for i, _, _ in pairs}
        ib = {j for _, j, _ in pairs}
        lone_a = [i for i in range(len(a.scores)) if i not in ia and a.scores[i] >= score]
        lone_b = [j for j in range(len(b.scores)) if j not in ib and b.scores[j] >= score]
        un_a, un_b = len(lone_a), len(lone_b)
        r = {"frame": name, "a": int(len(a.scores)), "b": int(len(b.scores)), "matched": len(pairs),
             "unmatched_a": un_a, "unmatched_b": un_b, "_unmatched_a": lone_a, "_unmatched_b": lone_b}
        if pairs:
            i, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            r["max_centre_m"] = float(np.abs(a.boxes[i, :3] - b.boxes[j, :3]).max())
            r["max_size_m"] = float(np.abs(a.boxes[i, 3:6] - b.boxes[j, 3:6]).max())
            r["max_heading"] = float(np.abs(np.angle(np.exp(1j * (a.boxes[i, 6] - b.boxes[j, 6])))).max())
            r["max_score"] = float(np.abs(a.scores[i] - b.scores[j]).max())
            # the equivalence bar: every matched pair within 1 cm or at BEV IoU >= 0.99
            off, centre, iou = off_bar(a.boxes[i], b.boxes[j], rotated_iou_paired)
            r["min_bev_iou"] = float(iou.min())
            r["pairs_off"] = int(off.sum())
            # each pair off the bar: scores of both sides, centre difference (m), BEV IoU
            r["off"] = [[round(float(a.scores[i[k]]), 4), round(float(b.scores[j[k]]), 4), round(float(centre[k]), 4),
                         round(float(iou[k]), 4)] for k in np.nonzero(off)[0]]
            r["_off_pairs"] = [(int(i[k]), int(j[k])) for k in np.nonzero(off)[0]]
            worst["pairs_off"] += r["pairs_off"]
            worst["min_bev_iou"] = min(worst["min_bev_iou"], r["min_bev_iou"])
            for k, w in (("centre_m", "max_centre_m"), ("size_m", "max_size_m"), ("heading", "max_heading"),
                         ("score", "max_score")):
                worst[k] = max(worst[k], r[w])
        worst["unmatched"] += un_a + un_b
        if keep is not None and (r.get("pairs_off", 0) or un_a or un_b):
            keep[name] = (fr, a, b)
        rows.append(r)
    return rows, worst


def rounding_envelope(kept, rows, noisy, draws, score, rotated_iou_paired):
    """For each frame in ``kept`` (A = the eager pipeline, B = the other side): is every difference of B from A one
    that rounding-level noise on the eager model's own backbone output also makes? ``noisy`` (the eager pipeline with
    ``_BackboneNoise``) runs up to ``draws`` seeds on the frame. A pair off the bar counts as inside the envelope when
    some draw holds B's box within the bar; an unmatched B box likewise; an unmatched A box when some draw has no
    box of its class within the bar of it. -> {"inside": n, "outside": n, "items": [...]}."""
    out = {"draws_per_frame": draws, "inside": 0, "outside": 0, "items": []}
    by_name = {r["frame"]: r for r in rows}
    for name, (fr, a, b) in kept.items():
        r = by_name[name]
        todo = [("pair_off", i, j) for i, j in r.get("_off_pairs", [])]
        todo += [("unmatched_b", None, j) for j in r.get("_unmatched_b", [])]
        todo += [("unmatched_a", i, None) for i in r.get("_unmatched_a", [])]
        found = {k: None for k in range(len(todo))}
        for seed in range(draws):
            if all(v is not None for v in found.values()):
                break
            noisy.stage_hooks[-1].seed = seed
            d = noisy(fr)
            for k, (kind, i, j) in enumerate(todo):
                if found[k] is not None:
                    continue
                if kind == "unmatched_a":
                    hit = not within_bar(a.boxes[i], a.labels[i], d, rotated_iou_paired)
                else:
                    hit = within_bar(b.boxes[j], b.labels[j], d, rotated_iou_paired)
                if hit:
                    found[k] = seed
        for k, (kind, i, j) in enumerate(todo):
            side, idx = (a, i) if kind == "unmatched_a" else (b, j)
            item = {"frame": name, "kind": kind,
                    "score_b" if side is b else "score_a": round(float(side.scores[idx]), 4),
                    "box": [round(float(x), 3) for x in side.boxes[idx]], "reproduced_by_draw": found[k]}
            out["items"].append(item)
            out["inside" if found[k] is not None else "outside"] += 1
    return out


class _BackboneNoise:
    """Stage hook: after ``backbone_3d``, every sparse tensor in the batch (its multi-scale features, per modality)
    gets features x (1 + eps N(0, 1)), drawn from ``seed`` and the frame's order of tensors (a tensor reachable
    under two keys is perturbed once)."""

    def __init__(self, eps: float, seed: int = 0):
        self.eps, self.seed = float(eps), seed

    def __call__(self, stage, batch):
        if stage != "backbone_3d":
            return
        import torch

        g = torch.Generator().manual_seed(self.seed)
        done = {}

        def perturb(t):
            if not hasattr(t, "replace_feature") or not hasattr(t, "features"):
                return t
            if id(t) not in done:
                f = t.features
                noise = torch.randn(f.shape, generator=g).to(device=f.device, dtype=f.dtype)
                done[id(t)] = t.replace_feature(f * (1 + self.eps * noise))
            return done[id(t)]

        for k, v in list(batch.items()):
            if isinstance(v, dict):
                batch[k] = {kk: perturb(vv) for kk, vv in v.items()}
            else:
                batch[k] = perturb(v)


def main(argv=None) -> int:
    from benchutil import pipeline_arg_parser

    from cmfiou_core.model.spconv_compat import ALGORITHM_NAMES, set_algorithm

    ap = pipeline_arg_parser(__doc__)
    ap.add_argument("--generated", type=int, default=8)
    ap.add_argument("--gen-dir", default="/tmp/agree_gen")
    ap.add_argument("--score", type=float, default=0.3, help="unmatched detections are counted above this score")
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                    help="CUDA products of both pipelines: fp32 = IEEE (spconv's own; the equivalence check), tf32 / "
                         "bf16 = the engine's fast settings (the eager one then runs TF32 / bf16 autocast)")
    ap.add_argument("--compare", default="eager:graph",
                    help="comma list of A:B pairs of eager, graph, graph_eager_front (the engine after the eager "
                         "front), eager_perturbed (weights x (1 + 1e-6 N(0,1))), eager_engine_backbone (eager with "
                         "the engine's sparse backbone only), eager_backbone_noise (eager, the backbone's output features x (1 + "
                         "--noise N(0,1)), --noise-seeds draws); eager:eager runs the eager pipeline "
                         "twice (its run-to-run noise)")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True, warn_only=True) (CUBLAS_WORKSPACE_CONFIG=:4096:8): "
                         "torch's deterministic CUDA kernels, e.g. for eager:eager")
    ap.add_argument("--eager-spconv-algo", choices=ALGORITHM_NAMES, default="native",
                    help="the eager pipelines' spconv algorithm: native (what the model builds) or implicit_gemm (the "
                         "GPU wheels' default, which the model used before; not reproducible on the GPU)")
    ap.add_argument("--noise", type=float, default=1e-6,
                    help="eager_backbone_noise: relative size of the noise on the backbone's output features")
    ap.add_argument("--noise-seeds", type=int, default=8, help="eager_backbone_noise: draws (one comparison each)")
    ap.add_argument("--envelope", type=int, default=0, metavar="DRAWS",
                    help="for the first comparison (A = eager): check each pair off the bar and each unmatched "
                         "detection against the eager model's own rounding envelope, up to DRAWS draws of "
                         "eager_backbone_noise per such frame (a difference rounding noise also makes is a near-tie "
                         "of the model, not an engine defect)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before CUDA initialises
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    names = ("eager", "graph", "graph_eager_front", "eager_perturbed", "eager_engine_backbone", "eager_backbone_noise")
    for comp in args.compare.split(","):
        sides = comp.split(":")
        if len(sides) != 2 or any(n not in names for n in sides):
            ap.error(f"--compare: {comp!r} is not A:B with A, B in {', '.join(names)}")

    from bench_pipeline import load_frames

    from cmfiou_core.eval.rotated_iou import rotated_iou_paired
    from cmfiou_core.pipeline import Pipeline

    frames = load_frames(args.kitti, args.generated, Path(args.gen_dir), 1000)
    eager = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="eager", precision=args.precision)
    graph = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="graph", precision=args.precision)
    # graph engine after the EAGER front (a stage hook makes Pipeline take eager_front + FrameGraph): separates the
    # static front's share of a difference from the engine's
    graph_ef = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="graph",
                                    precision=args.precision) if "graph_eager_front" in args.compare else None
    if graph_ef is not None:
        graph_ef.stage_hooks.append(lambda name, batch: None)
    # the eager model with every weight scaled by (1 + 1e-6 N(0, 1)): how far rounding-level changes move the
    # detections (the scale of two fp32 implementations' differences)
    perturbed = None
    if "eager_perturbed" in args.compare:
        import torch

        perturbed = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="eager",
                                         precision=args.precision)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for prm in perturbed.model.parameters():
                if prm.dtype.is_floating_point:
                    prm.mul_(1 + 1e-6 * torch.randn(prm.shape, generator=g).to(prm.device))

    for p in (eager, perturbed):
        if p is not None:
            set_algorithm(p.model, args.eager_spconv_algo)
    # the eager pipeline with only its sparse backbone (S2D + ResVC) replaced by the engine's (engine.runtime
    # use_engine, no CUDA graph); BEV, RPN, proposal layer, RoI head and post-processing stay eager: separates the
    # backbone's share of an engine-vs-eager difference from the rest of FrameGraph's
    eager_eb = None
    if "eager_engine_backbone" in args.compare:
        import torch

        from cmfiou_core.engine.runtime import use_engine

        eager_eb = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="eager",
                                        precision=args.precision)
        use_engine(eager_eb.model, use_graph=False, dtype=eager_eb.amp or torch.float32)
    # the eager pipeline with every sparse backbone output feature scaled by (1 + NOISE N(0, 1)) (a stage hook after
    # backbone_3d; one draw per --noise-seeds seed): does a rounding-level difference in the backbone's output, the
    # size of the engine's, move this frame's detections? (an engine-vs-eager pair off that the same noise also
    # makes is a near-tie downstream: proposal NMS, top-k or the RoI head's selection, not an engine defect)
    noisy = None
    if "eager_backbone_noise" in args.compare or args.envelope:
        noisy = Pipeline.from_config(args.config, args.checkpoint, args.device, engine="eager",
                                     precision=args.precision)
        set_algorithm(noisy.model, args.eager_spconv_algo)
        noisy.stage_hooks.append(_BackboneNoise(args.noise))
    if args.envelope and not args.compare.startswith("eager:"):
        ap.error("--envelope: the first --compare pair must be eager:B")
    runs = {"eager": eager, "graph": graph, "graph_eager_front": graph_ef, "eager_perturbed": perturbed,
            "eager_engine_backbone": eager_eb, "eager_backbone_noise": noisy}
    report = {"what": "per-frame detections of pairs of pipelines (eager spconv / engine=graph)",
              "score_threshold_for_unmatched": args.score, "precision": args.precision,
              "deterministic_algorithms": bool(args.deterministic),
              "eager_spconv_algo": args.eager_spconv_algo, "comparisons": {}}
    for n, comp in enumerate(args.compare.split(",")):
        an, bn = comp.split(":")
        for seed in range(args.noise_seeds) if "eager_backbone_noise" in (an, bn) else [None]:
            key = comp
            if seed is not None:
                noisy.stage_hooks[-1].seed = seed
                key = f"{comp}@seed{seed}"
            kept = {} if (n == 0 and args.envelope) else None
            rows, worst = compare(frames, runs[an], runs[bn], args.score, rotated_iou_paired, keep=kept)
            entry = {"frames": rows, "worst": worst, "matched_pairs": int(sum(r["matched"] for r in rows))}
            if kept is not None:
                env = rounding_envelope(kept, rows, noisy, args.envelope, args.score, rotated_iou_paired)
                env["noise"] = args.noise
                entry["rounding_envelope"] = env
                worst["outside_rounding_envelope"] = env["outside"]
                print(key, "rounding envelope:", json.dumps({k: env[k] for k in ("inside", "outside")}),
                      json.dumps(env["items"]), flush=True)
            for r in rows:
                for k in ("_off_pairs", "_unmatched_a", "_unmatched_b"):
                    r.pop(k, None)
            report["comparisons"][key] = entry
            print(key, "worst:", json.dumps(worst), flush=True)
    first = next(iter(report["comparisons"].values()))
    report.update(frames=first["frames"], worst=first["worst"])      # the headline comparison
    from cmfiou_core.provenance import write_report

    write_report(args.json, report, config=args.config, checkpoint=args.checkpoint or None, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
