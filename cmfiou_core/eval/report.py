"""Evaluation report of a replayed bag: KITTI AP (when ground truth is present), latency per stage, dropped/skipped
frames -> dict (JSON), printed table, PNG plots (PR curves, latency histogram; matplotlib Agg), self-contained HTML.

Frame accounting: every frame of the bag is evaluated. A *dropped* frame (no detector output arrived) and a *skipped*
frame (the predictor failed / produced no output for it) count as an empty detection set: all its objects are false
negatives; the frame is never removed from the evaluation.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .kitti_eval import EvalResult, evaluate
from .kitti_io import parse_kitti_text


@dataclass
class FrameResult:
    index: str
    stamp_ns: int
    result_text: str  # KITTI result lines ("" = no detections)
    timings_ms: Dict[str, float] = field(default_factory=dict)
    status: str = "ok"  # ok | dropped | skipped
    error: str = ""
    lidar_only: bool = False  # detected without camera / depth completion (pseudo branch empty)
    lidar_only_reason: str = ""


def latency_stats(frames: Sequence[FrameResult]) -> Dict[str, Dict[str, float]]:
    stages: Dict[str, List[float]] = {}
    for f in frames:
        if f.status != "ok":
            continue
        for k, v in f.timings_ms.items():
            stages.setdefault(k, []).append(float(v))
    out = {}
    for k, v in stages.items():
        a = np.asarray(v)
        out[k] = {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                  "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}
    return out


def build_report(frames: Sequence[FrameResult], labels: Sequence[Optional[str]], meta: dict) -> dict:
    """``labels[i]``: label_2 text of frame i or None. AP is computed when every frame has labels."""
    rep = dict(meta)
    n = len(frames)
    rep["frames"] = {"total": n, "ok": sum(f.status == "ok" for f in frames),
                     "dropped": sum(f.status == "dropped" for f in frames),
                     "skipped": sum(f.status == "skipped" for f in frames),
                     "dropped_indices": [f.index for f in frames if f.status == "dropped"],
                     "skipped_indices": [f.index for f in frames if f.status == "skipped"],
                     "errors": {f.index: f.error for f in frames if f.error},
                     "lidar_only": sum(f.lidar_only for f in frames),
                     "lidar_only_frames": {f.index: f.lidar_only_reason or "reason not reported"
                                           for f in frames if f.lidar_only}}
    rep["latency_ms"] = latency_stats(frames)
    res = None
    if n and all(lb is not None for lb in labels):
        gt = [parse_kitti_text(lb, f"{f.index}/label_2") for f, lb in zip(frames, labels)]
        dt = [parse_kitti_text(f.result_text, f"{f.index}/result", is_result=True) for f in frames]
        res = evaluate(gt, dt)
        rep["ap"] = res.to_json(0)
        rep["ap_overlap_set_1"] = res.to_json(1)
        rep["num_valid_gt"] = res.num_valid_gt
        rep["ap_ceiling"] = res.ceiling_json(0)  # perfect predictions on this ground truth (small-set cap)
        rep["warnings"] = res.small_set_warnings()
    else:
        rep["ap"] = None
        rep["ap_note"] = "no ground truth in the bag (or not for every frame): AP not computed"
    rep["_eval"] = res
    return rep


def format_table(rep: dict) -> str:
    lines = [f"bag: {rep.get('bag')}  mode: {rep.get('mode')}  predictor: {rep.get('predictor')}"]
    fr = rep["frames"]
    lines.append(f"frames: {fr['total']} total, {fr['ok']} ok, {fr['dropped']} dropped, {fr['skipped']} skipped "
                 "(dropped/skipped frames are evaluated as empty detection sets)")
    for idx, why in fr.get("lidar_only_frames", {}).items():
        lines.append(f"frame {idx} ran LiDAR-only (without depth completion): {why}")
    if rep.get("ap"):
        ceil = rep.get("ap_ceiling") or {}
        lines.append("AP (%; first overlap set: Car 0.7, Ped 0.5, Cyc 0.5)      easy   moderate   hard"
                     + ("   ceiling (perfect predictions)" if ceil else ""))
        for curve in ("R40", "R11"):
            for c, d in rep["ap"][curve].items():
                for m in ("3d", "bev", "bbox", "aos"):
                    v = d[m]
                    if v[0] is None:
                        continue
                    line = f"  {curve} {c:<10} {m:<4}                                {v[0]:7.2f} {v[1]:8.2f} {v[2]:8.2f}"
                    cv = ceil.get(curve, {}).get(c, {}).get(m)
                    if cv:
                        line += f"   {cv[0]:6.2f} / {cv[1]:6.2f} / {cv[2]:6.2f}"
                    lines.append(line)
        lines += rep.get("warnings", [])
    else:
        lines.append(rep.get("ap_note", "AP not computed"))
    if rep["latency_ms"]:
        lines.append("latency (ms)          n     mean      p50      p95      p99      max")
        for k, s in rep["latency_ms"].items():
            lines.append(f"  {k:<16} {s['n']:5d} {s['mean']:8.2f} {s['p50']:8.2f} {s['p95']:8.2f} {s['p99']:8.2f} "
                         f"{s['max']:8.2f}")
    return "\n".join(lines) + "\n"


def _png_pr(res: Optional[EvalResult]) -> Optional[bytes]:
    if res is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res.classes), figsize=(5 * len(res.classes), 4), squeeze=False)
    for ax, c in zip(axes[0], res.classes):
        for m, style in (("3d", "-"), ("bev", "--"), ("bbox", ":")):
            for d, name in enumerate(("easy", "moderate", "hard")):
                p, r = res.precision[c][m][0, d], res.recall[c][m][0, d]
                k = int(np.count_nonzero(r))
                if k:
                    ax.plot(r[:k], p[:k], style, label=f"{m} {name}")
        ax.set_title(f"{c} (min overlap set 0)")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _png_latency(frames: Sequence[FrameResult]) -> Optional[bytes]:
    stages: Dict[str, List[float]] = {}
    for f in frames:
        if f.status == "ok":
            for k, v in f.timings_ms.items():
                stages.setdefault(k, []).append(v)
    if not stages:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, v in stages.items():
        ax.hist(v, bins=30, alpha=0.5, label=k)
    ax.set_xlabel("ms")
    ax.set_ylabel("frames")
    ax.set_title("latency per stage")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_report(rep: dict, frames: Sequence[FrameResult], out_dir, write_results: bool = True) -> Dict[str, Path]:
    """Write report.json, pr_curves.png, latency.png, report.html (and results/<index>.txt) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    res = rep.get("_eval")
    clean = {k: v for k, v in rep.items() if not k.startswith("_")}
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(clean, indent=1) + "\n")
    imgs = {}
    for key, png in (("pr_curves", _png_pr(res)), ("latency", _png_latency(frames))):
        if png is not None:
            p = out / f"{key}.png"
            p.write_bytes(png)
            paths[key] = p
            imgs[key] = base64.b64encode(png).decode()
    if write_results:
        rd = out / "results"
        rd.mkdir(exist_ok=True)
        for f in frames:
            (rd / f"{f.index}.txt").write_text(f.result_text)
    body = [f"<h1>cmfiou bag evaluation</h1><pre>{html.escape(format_table(rep))}</pre>"]
    for key, b64 in imgs.items():
        body.append(f'<h2>{key}</h2><img src="data:image/png;base64,{b64}"/>')
    body.append(f"<h2>report.json</h2><pre>{html.escape(json.dumps(clean, indent=1))}</pre>")
    paths["html"] = out / "report.html"
    paths["html"].write_text("<!doctype html><html><head><meta charset='utf-8'><title>cmfiou bag evaluation</title>"
                             "</head><body>" + "".join(body) + "</body></html>\n")
    return paths
